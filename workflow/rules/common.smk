# Helpers shared by the rules. Every job is handed its resolved config slice as a file input (work/config/, written
# here when the DAG is built and only when its content changes: that file is the job's rerun trigger), its data as
# {input}, its destination as {output} and its thread budget as {threads}. Each experiment's own config decides its
# datasets, benchmarks and resources.
import functools
import os
from pathlib import Path

from franca import config as fc
from franca import workflow_hooks as hooks
from franca.data.units import list_units
from franca.plan import rule_resources, unit_resources

PRESET = config["preset"]
OVERRIDES = tuple(config.get("overrides", []))
EXPERIMENTS = config["experiments"]
CONFIGS = "work/config"
os.environ.setdefault("FRANCA_TRACKING_URI", config.get("tracking_uri", "sqlite:///mlflow.db"))
os.environ.setdefault("FRANCA_MLFLOW_EXPERIMENT", config.get("mlflow_experiment", "franca-repro"))

RUNS = [(exp, seed) for exp, spec in EXPERIMENTS.items() for seed in spec["seeds"]]
# a bad key stops the run here; an experiment's own `overrides` apply after the global ones
CFG = {
    (e, s): fc.compose_validated(PRESET, e, s, OVERRIDES + tuple(EXPERIMENTS[e].get("overrides", [])), Path(CONFIGS, "composed"))
    for e, s in RUNS
}


def cfg(exp, seed=None):
    """Resolved config of one experiment x seed (its first seed when none is given)."""
    return CFG[(exp, int(seed) if seed is not None else EXPERIMENTS[exp]["seeds"][0])]


def _write_job_configs():
    """{work/config/<exp>/s<seed>/<job>.json | data/<dataset>.json | dedup/<dataset>.json: written path} for every
    run (content-addressed files, franca.config.write_slice); a dataset or dedup that two experiments configure
    differently is an error (give one of them another name)."""
    owner = {}
    for (exp, seed), full in CFG.items():
        for path, obj in fc.job_files(full, CONFIGS, exp, seed).items():
            if path in owner and owner[path][1] != obj:
                raise fc.ConfigError(
                    f"{path}: experiments {owner[path][0]!r} and {exp!r} configure it differently; give the dataset "
                    "another name in one of them"
                )
            owner[path] = (exp, obj)
    return {str(path): str(fc.write_slice(path, obj)) for path, (_, obj) in owner.items()}


JOB_CONFIGS = _write_job_configs()
DATASETS = sorted({Path(p).stem for p in JOB_CONFIGS if Path(p).parent.name == "data"})


def config_file(path):
    """The written (content-addressed) config file of a job, by its plain name under work/config/."""
    return JOB_CONFIGS[path]


def job_config(name):
    """The config file of a per-run job (`eval`, `features`, ...) as an input function."""
    return lambda w: config_file(f"{CONFIGS}/{w.exp}/s{w.seed}/{name}.json")


def run_config(w):
    return config_file(f"{CONFIGS}/{w.exp}/s{w.seed}/run.json")


def _resources(stage, w):
    """One rule_resources call per job, however many resource keys and the threads ask for it."""
    if "unit" in w.keys():  # a unit job: sized by its dataset's largest unit (franca.plan.unit_resources)
        return _unit_job_resources(stage, w.dataset)
    run = (w.exp, int(w.seed)) if "exp" in w.keys() else RUNS[0]
    return _job_resources(stage, *run, int(w.get("stage", 1)))


@functools.lru_cache(maxsize=None)
def _unit_job_resources(stage, dataset):
    return unit_resources(cfg(*RUNS[0]), stage, fc.read_slice(config_file(f"{CONFIGS}/data/{dataset}.json")), units_of(dataset))


@functools.lru_cache(maxsize=None)
def _job_resources(stage, exp, seed, index):
    full = cfg(exp, seed)
    if stage in ("pretrain", "highres"):
        return rule_resources(fc.stage_config(full, stage, index), stage)
    return rule_resources(full, stage)


def resources_of(stage):
    """Snakemake resources of a stage, per experiment (and per pretrain stage index); read by the SLURM profile."""
    kinds = set()
    for full in CFG.values():
        sc = fc.stage_config(full, stage, 1) if stage in ("pretrain", "highres") else full
        kinds.add(tuple(sorted(rule_resources(sc, stage))))
    if len(kinds) > 1:
        raise fc.ConfigError(f"the experiments need different kinds of resources for {stage}; run them separately")
    return {key: (lambda w, key=key: _resources(stage, w)[key]) for key in kinds.pop()}


def threads_of(stage):
    """The job's thread budget: the CPUs its resources ask for (capped by --cores)."""
    return lambda w: _resources(stage, w)["cpus_per_task"]


def train_launcher(stage):
    """`franca`, `torchrun ... -m franca.cli` (one node, several processes) or `srun torchrun` (several nodes)."""

    def get(w):
        nodes, nproc = fc.launch_shape(fc.stage_config(cfg(w.exp, w.seed), stage, int(w.get("stage", 1))))
        if nodes == 1 and nproc == 1:
            return "franca"
        torchrun = f"torchrun --nnodes {nodes} --nproc_per_node {nproc}"
        if nodes == 1:
            return f"{torchrun} --standalone -m franca.cli"
        rdzv = "--rdzv_backend c10d --rdzv_endpoint $(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1):29500"
        return f"srun --ntasks-per-node 1 {torchrun} {rdzv} --rdzv_id $SLURM_JOB_ID -m franca.cli"

    return get


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


def manifest_dir(dataset):
    """The dataset's index: a partitioned parquet dataset, one file per work unit (franca.data.manifest.read_manifest)."""
    return f"data/{dataset}/manifest"


# --- work units (franca.data.units): computed here, at DAG build, from cheap metadata; written content-addressed ----


@functools.cache
def units_file(dataset):
    """work/config/units/<dataset>-<sha12>.json: the dataset's unit list (input of its fetch and shard jobs)."""
    ds = fc.read_slice(config_file(f"{CONFIGS}/data/{dataset}.json"))
    return str(fc.write_slice(f"{CONFIGS}/units/{dataset}.json", list_units(ds)))


@functools.cache
def units_of(dataset):
    return fc.read_slice(units_file(dataset))


def unit_names(dataset):
    return [u["unit"] for u in units_of(dataset)]


def unit_inputs(w):
    """Config and unit list of a unit's fetch job, plus the URL part its rows come from (a change reruns it)."""
    entry = units_of(w.dataset)[int(w.unit[1:])]
    inputs = {"config": config_file(f"{CONFIGS}/data/{w.dataset}.json"), "units": units_file(w.dataset)}
    if entry["kind"] == "url_rows":
        inputs["part"] = entry["part"]
    return inputs


def gather_inputs(w):
    units = [f"data/{w.dataset}/units/{u}" for u in unit_names(w.dataset)]
    return {
        "config": config_file(f"{CONFIGS}/data/{w.dataset}.json"),
        "shards": [f"{u}/shards" for u in units],
        "manifests": [f"{u}/manifest.parquet" for u in units],
    }


def dedup_dir(w):
    return f"data/dedup/{fc.dedup_dataset(cfg(w.exp, w.seed))}"


def tags(rule):
    """`--tag rule=<rule> --tag <wildcard>=<value> ...`: the job's MLflow tags."""
    return lambda w: " ".join([f"--tag rule={rule}", *(f"--tag {k}={v}" for k, v in dict(w).items())])


def workflow_onstart():
    hooks.onstart(config, local_exec=workflow.local_exec)


def workflow_onsuccess():
    hooks.onsuccess(config)


def workflow_onerror():
    hooks.onerror(config)


# --- input/output helpers of the rules ------------------------------------------------------------------


def dedup_inputs(w):
    """Manifests and shards of the datasets that dedup `{dataset}` reads (its config names them)."""
    full = next(c for c in CFG.values() if fc.dedup_dataset(c) == w.dataset)
    names = fc.dedup_datasets(full)
    return {
        "config": config_file(f"{CONFIGS}/dedup/{w.dataset}.json"),
        "manifests": [manifest_dir(n) for n in names],
        "shards": [shard_dir(n) for n in names],
    }


def training_inputs(stage):
    """Config, shards, kept.txt (when the stage trains on the deduplicated dataset) and the init checkpoint."""

    def get(w):
        full = cfg(w.exp, w.seed)
        index = int(w.stage) if stage == "pretrain" else 1
        dataset = fc.stage_config(full, stage, index)["data"]["dataset"]
        name = f"pretrain{index}" if stage == "pretrain" else stage
        inputs = {"config": config_file(f"{CONFIGS}/{w.exp}/s{w.seed}/{name}.json"), "shards": shard_dir(dataset)}
        if dataset == fc.dedup_dataset(full):
            inputs["kept"] = f"{dedup_dir(w)}/kept.txt"
        if stage == "highres":
            inputs["init"] = checkpoint_path(w.exp, w.seed, "pretrain")
        elif index > 1:
            inputs["init"] = f"results/pretrain/{w.exp}/s{w.seed}/stage{index - 1}/checkpoint.pt"
        return inputs

    return get


def optional(flag, key):
    """`--<flag> {input.<key>}` when the rule's input has that key, else nothing."""
    return lambda w, input: f"--{flag} {input[key]}" if key in input.keys() else ""


# --- dedup fan-out (workflow/rules/dedup.smk) ---


def dedup_config(dataset):
    """The composed config of the (first) experiment whose dedup trains on `dataset`."""
    return next(c for c in CFG.values() if fc.dedup_dataset(c) == dataset)


def dedup_fan_out(dataset):
    return dedup_config(dataset)["data"]["dedup"].get("fan_out")


def dedup_manifest(w):
    """The train dataset's manifest, as the dedup job reads it (`dedup_inputs`)."""
    return next(p for p in dedup_inputs(w)["manifests"] if p.split("/")[1] == w.dataset)


def dedup_unit_names(dataset):
    """The work units of the train dataset (issue 17 contract: `franca.data.units.list_units`, helper units)."""
    from franca.data.units import list_units

    return [u["unit"] for u in list_units(fc.dataset_job_config(dedup_config(dataset), dataset))]


def dedup_fan_out_inputs(w):
    """The inputs of `dedup`: manifests, shards, config, and with fan_out the eval index and every job's output."""
    inputs = dedup_inputs(w)
    fan = dedup_fan_out(w.dataset)
    if fan:
        root = f"data/dedup/{w.dataset}/fan_out"
        inputs["eval_index"] = f"{root}/eval_index.parquet"
        inputs["units"] = [f"{root}/units/{u}/unit_report.json" for u in dedup_unit_names(w.dataset)]
        blocks = range(2 ** fan.get("block_bits", 0))
        inputs["blocks"] = [f"{root}/blocks/b{b}-p{p}.parquet" for b in range(fan["bands"]) for p in blocks]
    return inputs


def dedup_eval_inputs(w):
    """The eval index's inputs: the config, and the manifests and shards of the eval datasets only (not the train
    set's, unless it holds eval splits), so that unit jobs start while the train set is still being sharded."""
    evals = {ref.split(":")[0] for ref in dedup_config(w.dataset)["data"]["dedup"]["eval"]}
    inputs = dedup_inputs(w)
    return {k: v if k == "config" else [p for p in v if p.split("/")[1] in evals] for k, v in inputs.items()}


def manifest_args(w, input):
    return " ".join(f"--manifest {p.split('/')[1]}={p}" for p in input.manifests)


def eval_baselines(w):
    """Whether the features job also extracts the random-init and raw-pixel references (eval.baselines)."""
    return bool(cfg(w.exp, w.seed)["eval"].get("baselines", False))


def eval_shards(w):
    """Shard directories of the features job: the classification and dense datasets of its experiment."""
    return {f"shards_{name}": shard_dir(name) for name in fc.eval_datasets(cfg(w.exp, w.seed))}


def shards_args(w, input):
    return " ".join(f"--shards {k[len('shards_'):]}={v}" for k, v in input.items() if k.startswith("shards_"))


def benchmarks(exp, dense_only=False):
    ev = cfg(exp)["eval"]
    return [b for b in ev["benchmarks"] if not dense_only or b in ev["dense_benchmarks"]]


def _eval_groups():
    """[(benchmarks, dense benchmarks run again with the RASA head (none without RASA), experiments)] of the distinct
    kinds of evaluate job (one rule each), the first experiment's kind first."""
    groups = {}
    for exp in EXPERIMENTS:
        dense = benchmarks(exp, dense_only=True) if EXPERIMENTS[exp]["rasa"] else []
        groups.setdefault((tuple(benchmarks(exp)), tuple(dense)), []).append(exp)
    return [(list(b), list(d), exps) for (b, d), exps in groups.items()]


def rasa_eval_args(dense):
    """The evaluate job's RASA arguments: the dense benchmarks to run again with the head, and the head."""
    if not dense:
        return ""
    return lambda w, input: f"--rasa-benchmarks {' '.join(dense)} --rasa-head {input.head} "


EVAL_GROUPS = _eval_groups()


def eval_outputs(exp, seed, ckpt):
    out = [f"results/eval/{exp}/s{seed}/{ckpt}/{bench}.json" for bench in benchmarks(exp)]
    if EXPERIMENTS[exp]["rasa"]:
        out += [f"results/eval/{exp}/s{seed}/{ckpt}/{bench}_rasa.json" for bench in benchmarks(exp, dense_only=True)]
    return out


def paper_inputs(wildcards):
    """Every file `franca paper` reads (it reads nothing else): a listed file is an expected result."""
    inputs = {"dedup": [], "metrics": [], "evals": [], "rasa": [], "pca": []}
    inputs["manifests"] = [manifest_dir(dataset) for dataset in DATASETS]
    for exp, seed in RUNS:
        inputs["dedup"].append(f"data/dedup/{fc.dedup_dataset(cfg(exp, seed))}/report.json")
        for stage in range(1, n_stages(exp) + 1):
            inputs["metrics"].append(f"results/pretrain/{exp}/s{seed}/stage{stage}/metrics.jsonl")
        for ckpt in checkpoint_kinds(exp):
            if ckpt == "highres":
                inputs["metrics"].append(f"results/highres/{exp}/s{seed}/metrics.jsonl")
            inputs["evals"] += eval_outputs(exp, seed, ckpt)
            inputs["pca"].append(f"results/features/{exp}/s{seed}/{ckpt}/pca.pt")
            if EXPERIMENTS[exp]["rasa"]:
                inputs["rasa"].append(f"results/rasa/{exp}/s{seed}/{ckpt}/report.json")
    inputs["dedup"] = sorted(set(inputs["dedup"]))
    return inputs
