# The two commands of the README:  `make paper` (the tiny paper) and `make test` (the test suite).
# Both create the pinned environment in .venv/ on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= all

.PHONY: paper test env lint clean-results

env: $(VENV)/.installed

$(VENV)/.installed: envs/requirements.lock envs/install-lock.sh pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	bash envs/install-lock.sh $(BIN)/pip envs/requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

paper: env
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --cores $(CORES) --profile workflow/profiles/local

# Two xdist workers by default (tests/conftest.py: one work unit per module, the cluster tests as one,
# the longest queued first);
# TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
test: env
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --no-loadscope-reorder

lint: env
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --lint

clean-results:
	rm -rf results data work logs mlflow.db mlartifacts .snakemake
