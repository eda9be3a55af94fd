"""Scheduling of the suite over pytest-xdist workers (`make test` runs `-n 2 --no-loadscope-reorder`).

Each test module is one work unit, so a module-scoped fixture (the tiny paper of tests/workflow/test_e2e.py, the
trained model of tests/train/test_learning.py) runs once, on one worker. The cluster tests are one unit: they share
the session fixtures of tests/cluster/conftest.py and the one local SLURM, whose job counts they assert.
The longest units are queued first (the end-to-end workflow, then the cluster tests), so that the other worker runs
the rest of the suite beside them; much of their time is spent waiting on SLURM's queue and on loopback servers,
which is what the second worker fills. Without xdist nothing here applies and the order is unchanged.

(xdist's own `--dist loadgroup` cannot be used: it renames `item._nodeid`, which pytest 9 no longer reads.)
"""

from __future__ import annotations

import pytest

FIRST = ("tests/workflow/test_e2e.py", "cluster")  # queued in this order, before every other unit


def _unit(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return "cluster" if path.startswith("tests/cluster/") else path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # only in xdist workers (they collect; the controller does not)
        return
    rank = {unit: i for i, unit in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(_unit(item.nodeid), len(FIRST)))  # stable: the rest keep their order


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pytest-xdist not installed: the suite runs in one process
    LoadScopeScheduling = None

if LoadScopeScheduling is not None:

    class ModuleUnits(LoadScopeScheduling):
        """xdist's module scheduling, with every cluster test in one unit."""

        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    def pytest_xdist_make_scheduler(config: pytest.Config, log) -> ModuleUnits:
        return ModuleUnits(config, log)
