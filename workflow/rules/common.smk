# Helpers shared by the rules: config composition, file lists, the `franca` command line, hooks.
import os
import shlex

from franca import config as fc
from franca import workflow_hooks as hooks
from franca.plan import rule_resources

PRESET = config["preset"]
OVERRIDES = tuple(config.get("overrides", []))
EXPERIMENTS = config["experiments"]
os.environ.setdefault("FRANCA_TRACKING_URI", config.get("tracking_uri", "sqlite:///mlflow.db"))
os.environ.setdefault("FRANCA_MLFLOW_EXPERIMENT", config.get("mlflow_experiment", "franca-repro"))


def cfg(exp, seed=0):
    """Full resolved config of one experiment x seed (cached; a bad key or value stops the run here)."""
    return fc.compose(PRESET, exp, int(seed), OVERRIDES)


BASE = cfg(next(iter(EXPERIMENTS)))
DATASETS = fc.used_datasets(BASE)
RUNS = [(exp, seed) for exp, spec in EXPERIMENTS.items() for seed in spec["seeds"]]
for _exp, _seed in RUNS:
    fc.validate(cfg(_exp, _seed))


BENCHMARKS = list(BASE["eval"]["benchmarks"])
DENSE = set(BASE["eval"]["dense_benchmarks"])


def train_resources(stage):
    """Resources of a training rule from its stage config (GPUs, nodes, runtime); read by the SLURM profile."""
    return rule_resources(fc.stage_config(BASE, stage), stage)


def train_launcher(stage):
    """`franca`, `torchrun ... -m franca.cli` (one node, several processes) or `srun torchrun` (several nodes)."""
    nodes, nproc = fc.launch_shape(fc.stage_config(BASE, stage))
    if nodes == 1 and nproc == 1:
        return "franca"
    torchrun = f"torchrun --nnodes {nodes} --nproc_per_node {nproc}"
    if nodes == 1:
        return f"{torchrun} --standalone -m franca.cli"
    rdzv = "--rdzv_backend c10d --rdzv_endpoint $(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1):29500"
    return f"srun --ntasks-per-node 1 {torchrun} {rdzv} --rdzv_id $SLURM_JOB_ID -m franca.cli"


def n_stages(exp):
    return fc.n_pretrain_stages(cfg(exp))


def checkpoint_kinds(exp):
    return ["pretrain", "highres"] if EXPERIMENTS[exp]["highres"] else ["pretrain"]


def checkpoint_path(exp, seed, ckpt):
    if ckpt == "highres":
        return f"results/highres/{exp}/s{seed}/checkpoint.pt"
    return f"results/pretrain/{exp}/s{seed}/stage{n_stages(exp)}/checkpoint.pt"


def shard_dir(dataset):
    return f"data/{dataset}/shards"


def dataset_of(role, exp="__base__"):
    data = (BASE if exp == "__base__" else cfg(exp))["data"]
    return data[role]["dataset"]


def params_of(stage, index=None):
    """Rule params: the stage's resolved config slice, so editing one YAML value reruns exactly what it affects."""

    def get(wildcards):
        wc = dict(wildcards)
        full = cfg(wc.get("exp", next(iter(EXPERIMENTS))), wc.get("seed", 0))
        idx = int(wc["stage"]) if index is None and "stage" in wc else (index or 1)
        return fc.canonical_json(fc.stage_config(full, stage, idx))

    return get


def franca_args(wildcards):
    """`--preset/--experiment/--seed/--override` so that the stage composes the same config as the DAG."""
    wc = dict(wildcards)
    args = fc.stage_args(PRESET, wc.get("exp", next(iter(EXPERIMENTS))), int(wc.get("seed", 0)), OVERRIDES)
    return " ".join(shlex.quote(a) for a in args)


# Every job runs `franca` from the environment that runs snakemake (shell: "FRANCA_RULE=<rule> franca ..."); the
# rule name and the stage arguments become MLflow tags.
TRAIN_LAUNCH = train_launcher("pretrain")
HIGHRES_LAUNCH = train_launcher("highres")


def workflow_onstart():
    hooks.onstart(config, local_exec=workflow.local_exec)


def workflow_onsuccess():
    hooks.onsuccess(config)


def workflow_onerror():
    hooks.onerror(config)


# --- input/output helpers of the rules ------------------------------------------------------------------


def pretrain_inputs(wildcards):
    stage = int(wildcards.stage)
    inputs = {"kept": "data/dedup/kept.txt", "shards": shard_dir(dataset_of("pretrain", wildcards.exp))}
    if stage > 1:
        inputs["init"] = f"results/pretrain/{wildcards.exp}/s{wildcards.seed}/stage{stage - 1}/checkpoint.pt"
    return inputs


def eval_shards(wildcards):
    """Shards of the features job: the classification train set, its val/test set (`val_dataset` when given) and
    the dense set (fc.eval_datasets), plus the RASA role's dataset."""
    full = cfg(wildcards.exp)
    names = set(fc.eval_datasets(full)) | {full["data"]["rasa"]["dataset"]}
    return [shard_dir(name) for name in sorted(names)]


def eval_outputs(exp, seed, ckpt):
    out = [f"results/eval/{exp}/s{seed}/{ckpt}/{bench}.json" for bench in BENCHMARKS]
    if EXPERIMENTS[exp]["rasa"]:
        out += [f"results/eval/{exp}/s{seed}/{ckpt}/{bench}_rasa.json" for bench in DENSE_LIST]
    return out


def eval_params(benches):
    def get(wildcards):
        full = cfg(wildcards.exp, wildcards.seed)
        return fc.canonical_json({b: fc.stage_config(full, f"eval:{b}") for b in benches})

    return get


DENSE_LIST = [bench for bench in BENCHMARKS if bench in DENSE]


def paper_inputs(wildcards):
    """Every file `franca paper` reads (it reads nothing else): a listed file is an expected result."""
    inputs = {"dedup": "data/dedup/report.json", "metrics": [], "evals": [], "rasa": [], "pca": []}
    inputs["manifests"] = [f"data/{dataset}/manifest.parquet" for dataset in DATASETS]
    for exp, seed in RUNS:
        for stage in range(1, n_stages(exp) + 1):
            inputs["metrics"].append(f"results/pretrain/{exp}/s{seed}/stage{stage}/metrics.jsonl")
        for ckpt in checkpoint_kinds(exp):
            if ckpt == "highres":
                inputs["metrics"].append(f"results/highres/{exp}/s{seed}/metrics.jsonl")
            inputs["evals"] += eval_outputs(exp, seed, ckpt)
            inputs["pca"].append(f"results/features/{exp}/s{seed}/{ckpt}/pca.pt")
            if EXPERIMENTS[exp]["rasa"]:
                inputs["rasa"].append(f"results/rasa/{exp}/s{seed}/{ckpt}/report.json")
    return inputs
