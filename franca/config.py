"""Hydra composition of the stage configs.

One primary config (`config/franca.yaml`) composed with a preset (scale), an experiment (method variant), a seed and
free overrides gives the full config. Each stage reads only its slice (`stage_config`): that slice is what the
workflow puts in a rule's params, so editing a YAML value reruns exactly the stages whose slice changed. Keys under
`run` (workers, checkpoint period, progress bars) are orchestration: they never change results and are excluded.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PRIMARY = "franca"


def config_dir() -> Path:
    """FRANCA_CONFIG_DIR, else ./config of the workflow being run, else the one beside the package."""
    if os.environ.get("FRANCA_CONFIG_DIR"):
        return Path(os.environ["FRANCA_CONFIG_DIR"]).resolve()
    local = Path.cwd() / "config"
    packaged = Path(__file__).resolve().parent.parent / "config"
    return local.resolve() if (local / f"{PRIMARY}.yaml").exists() else packaged


STAGES = ("pretrain", "highres", "rasa", "features")
_BENCH_LISTS = ("benchmarks", "dense_benchmarks")
# Method keys every training stage reads (spec 1-4); `data_key` names the dataset role of the stage.
_TRAIN_KEYS = ("model", "dino", "ibot", "masking", "crops", "teacher", "optim", "train", "seed", "experiment_name")


class ConfigError(ValueError):
    """A config value or override is invalid; the message names the key."""


def compose(preset: str, experiment: str, seed: int = 0, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Full resolved config (plain dict) for one preset x experiment x seed."""
    from omegaconf import OmegaConf  # with hydra, only where a config is composed: jobs and cached DAGs skip them

    cfg = copy.deepcopy(_compose_cached(str(config_dir()), preset, experiment, tuple(overrides)))
    if not any(o.split("=", 1)[0].lstrip("+~") == "seed" for o in overrides):
        cfg.seed = int(seed)  # seeds of one experiment share a composition; `${seed}` resolves below
    return OmegaConf.to_container(cfg, resolve=True)


@functools.lru_cache(maxsize=64)
def _compose_cached(cdir: str, preset: str, experiment: str, overrides: tuple[str, ...]):
    """The unresolved composition (DictConfig); every seed of an experiment resolves its own copy."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    args = [f"preset={preset}", f"experiment={experiment}", *overrides]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=cdir, version_base="1.3"):
            return hydra_compose(config_name=PRIMARY, overrides=args)
    except Exception as err:  # hydra raises several types; all mean a bad override or group option
        raise ConfigError(f"cannot compose config with overrides {args}: {err}") from err
    finally:
        GlobalHydra.instance().clear()


def compose_validated(
    preset: str, experiment: str, seed: int, overrides: Sequence[str], cache_dir: str | Path | None = None
) -> dict[str, Any]:
    """compose() + validate(); with ``cache_dir``, the result is kept there keyed by the sha256 of everything it
    depends on (every file of the config dir, the method schema, this module, the arguments), so a no-op dry run
    of the workflow reads JSON instead of composing with Hydra again."""
    if cache_dir is None:
        cfg = compose(preset, experiment, seed, overrides)
        validate(cfg)
        return cfg
    key = hashlib.sha256(_inputs_digest().encode())
    key.update(canonical_json([preset, experiment, int(seed), list(overrides)]).encode())
    path = Path(cache_dir) / f"{key.hexdigest()[:32]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    cfg = compose_validated(preset, experiment, seed, overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(cfg))
    os.replace(tmp, path)
    return cfg


@functools.lru_cache(maxsize=1)
def _inputs_digest() -> str:
    files = sorted(p for p in config_dir().rglob("*") if p.is_file()) + [_schema_path(), Path(__file__)]
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def merge(base: Mapping, override: Mapping) -> dict:
    """Recursive dict merge; `override` wins. Neither input is modified."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def n_pretrain_stages(cfg: Mapping) -> int:
    return len(cfg["pretrain"]["stages"])


def train_seed(cfg: Mapping[str, Any]) -> int:
    """The seed a training stage builds its model and RNGs with: ``train.seed``, else the run's ``seed`` (0)."""
    seed = (cfg.get("train") or {}).get("seed")
    return int(cfg.get("seed", 0) if seed is None else seed)


def stage_config(cfg: Mapping, stage: str, index: int = 1) -> dict[str, Any]:
    """The slice of `cfg` that determines the results of `stage` (pretrain stage `index` is 1-based)."""
    if stage == "pretrain":
        stages = cfg["pretrain"]["stages"]
        if not 1 <= index <= len(stages):
            raise ConfigError(f"pretrain stage {index} does not exist: pretrain.stages has {len(stages)} entries")
        out = merge({k: cfg[k] for k in _TRAIN_KEYS}, stages[index - 1] or {})
        out["data"] = cfg["data"]["pretrain"]
        return out
    if stage == "highres":
        out = merge({k: cfg[k] for k in _TRAIN_KEYS}, cfg.get("highres") or {})
        out["model"]["img_size"] = out["crops"]["global_crops_size"]  # pos_embed is resized to the new grid
        out["data"] = cfg["data"]["highres"]
        return out
    if stage == "rasa":
        return {"rasa": cfg["rasa"], "seed": cfg["seed"]}  # trained on the features job's dense tokens
    if stage == "features":
        keys = [k for k, v in cfg["eval"].items() if not isinstance(v, Mapping) and k not in _BENCH_LISTS]
        return {"eval": {k: cfg["eval"][k] for k in keys}, "data": _eval_data(cfg)}
    if stage.startswith("eval:"):
        bench = stage.split(":", 1)[1]
        if bench not in cfg["eval"]["benchmarks"]:
            raise ConfigError(f"config key eval.benchmarks: no benchmark {bench!r} (have {cfg['eval']['benchmarks']})")
        return {"eval": {bench: cfg["eval"].get(bench, {})}, "data": _eval_data(cfg)}
    raise ConfigError(f"unknown stage {stage!r}; expected one of {STAGES} or eval:<benchmark>")


def _eval_data(cfg: Mapping) -> dict[str, Any]:
    return {k: cfg["data"][k] for k in ("classification", "dense")}


def dataset_config(cfg: Mapping, name: str) -> dict[str, Any]:
    datasets = cfg["data"]["datasets"]
    if name not in datasets:
        raise ConfigError(f"data.datasets has no dataset {name!r} (known: {sorted(datasets)})")
    return dict(datasets[name])


def classification_sources(cfg: Mapping) -> dict[str, tuple[str, str]]:
    """(dataset, split) that each classification split (train, val, test) of the features stage reads; ``cfg`` is the
    full config or the features job's slice (both hold ``data.classification``).

    train comes from ``data.classification.dataset``; val and test from ``val_dataset`` when it is given, else from
    the same dataset (ImageNet protocol, spec 7.1-7.3: fit on the train set, report on the official val set).
    """
    cls = cfg["data"]["classification"]
    held_out = cls.get("val_dataset") or cls["dataset"]
    return {"train": (cls["dataset"], cls["train"]), "val": (held_out, cls["val"]), "test": (held_out, cls["test"])}


def eval_datasets(cfg: Mapping) -> list[str]:
    """Datasets whose shards the features stage reads: the classification sources and the dense dataset."""
    names = {name for name, _ in classification_sources(cfg).values()} | {cfg["data"]["dense"]["dataset"]}
    return sorted(names)


def used_datasets(cfg: Mapping) -> list[str]:
    """Datasets some stage reads: only these are fetched. A name missing from data.datasets raises ConfigError."""
    data = cfg["data"]
    names = {data[role]["dataset"] for role in ("pretrain", "highres")} | set(eval_datasets(cfg))
    names |= {ref.split(":")[0] for ref in [data["dedup"]["train"], *data["dedup"]["eval"]]}
    for name in sorted(names):
        dataset_config(cfg, name)
    return sorted(names)


def canonical_json(obj: Any) -> str:
    """Stable text of a config slice: the rule params that trigger reruns."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def dataset_job_config(cfg: Mapping, name: str) -> dict[str, Any]:
    """What the fetch and shard jobs of dataset ``name`` read: its entry, with ``classes_from`` resolved to the
    other tree's root (``classes_from_root``)."""
    ds = dataset_config(cfg, name)
    if ds.get("classes_from"):
        other = dataset_config(cfg, ds["classes_from"])
        if ds["source"] != "folder" or other["source"] != "folder":
            raise ConfigError(f"data.datasets.{name}.classes_from={ds['classes_from']!r} needs two `source: folder`")
        ds["classes_from_root"] = other["root"]
    return ds


def dedup_dataset(cfg: Mapping) -> str:
    """The training dataset that ``data.dedup`` deduplicates (its job and outputs are named after it)."""
    return cfg["data"]["dedup"]["train"].split(":")[0]


def dedup_datasets(cfg: Mapping) -> list[str]:
    """Datasets whose manifests the dedup job reads: its train set and every eval set."""
    dd = cfg["data"]["dedup"]
    return sorted({ref.split(":")[0] for ref in [dd["train"], *dd["eval"]]})


def run_job_configs(cfg: Mapping) -> dict[str, dict[str, Any]]:
    """Every job config of one experiment x seed, by file stem: pretrain<i>, highres, features, rasa, eval (every
    benchmark, the dense ones also with the RASA head) and run (orchestration, never a trigger)."""
    benches = cfg["eval"]["benchmarks"]
    out = {f"pretrain{i}": stage_config(cfg, "pretrain", i) for i in range(1, n_pretrain_stages(cfg) + 1)}
    out |= {stage: stage_config(cfg, stage) for stage in ("highres", "features", "rasa")}
    out["eval"] = {"eval": {b: cfg["eval"].get(b) or {} for b in benches}}
    out["run"] = dict(cfg["run"])
    return out


def job_files(cfg: Mapping, root: str | Path, experiment: str, seed: int) -> dict[Path, dict[str, Any]]:
    """{path: config} of every job of one experiment x seed: ``<root>/<experiment>/s<seed>/<stem>.json`` (see
    :func:`run_job_configs`), ``<root>/data/<dataset>.json`` (fetch, shard) and ``<root>/dedup/<dataset>.json``."""
    root = Path(root)
    files = {root / experiment / f"s{seed}" / f"{stem}.json": obj for stem, obj in run_job_configs(cfg).items()}
    files |= {root / "data" / f"{name}.json": dataset_job_config(cfg, name) for name in used_datasets(cfg)}
    files[root / "dedup" / f"{dedup_dataset(cfg)}.json"] = dict(cfg["data"]["dedup"])
    return files


def write_slice(path: str | Path, obj: Any) -> Path:
    """Write a job's config file, content-addressed: ``<stem>-<sha256[:12]>.json`` beside ``path``; returns its path.

    A file is never rewritten, so a dry run with other overrides, or a second invocation, cannot change what a
    running job reads. A change of content is a new input path, which Snakemake's input trigger reruns. New files
    get mtime 0: a recreated file (fresh clone, deleted work/) carries no news by its time alone.
    """
    path, text = Path(path), canonical_json(obj) + "\n"
    target = path.with_name(f"{path.stem}-{hashlib.sha256(text.encode()).hexdigest()[:12]}{path.suffix}")
    if target.is_file() and target.read_text() == text:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.utime(tmp, ns=(0, 0))
    os.replace(tmp, target)
    return target


def read_slice(path: str | Path) -> dict[str, Any]:
    """A job's config file (written by the workflow, or by `franca config` for a run by hand)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read the job config {path}: {err}") from err


def _schema_path() -> Path:
    rel_path = Path("workflow", "schemas", "method.schema.yaml")
    path = config_dir().parent / rel_path
    return path if path.exists() else Path(__file__).resolve().parent.parent / rel_path


def validate(cfg: Mapping) -> None:
    """Check a composed config against workflow/schemas/method.schema.yaml plus cross-key rules."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(_schema_path().read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(cfg), key=lambda e: list(e.path))
    if errors:
        raise ConfigError(_schema_error(errors[0], Path("workflow", "schemas", "method.schema.yaml")))
    for stage in ["highres", *[f"pretrain{i}" for i in range(1, n_pretrain_stages(cfg) + 1)]]:
        sc = stage_config(cfg, "highres") if stage == "highres" else stage_config(cfg, "pretrain", int(stage[8:]))
        patch = sc["model"]["patch_size"]
        for key in ("global_crops_size", "local_crops_size"):
            if sc["crops"][key] % patch:
                raise ConfigError(
                    f"config key crops.{key}: {sc['crops'][key]} ({stage}) is not a multiple of "
                    f"model.patch_size {patch}"
                )
        if sc["optim"]["warmup_iters"] > sc["optim"]["iterations"]:
            raise ConfigError(f"config key optim.warmup_iters ({stage}) exceeds optim.iterations")


def _schema_error(error, schema_path: Path) -> str:
    """Message of a schema error: the key path, and for an unknown key the config files that set it."""
    where = ".".join(str(p) for p in error.absolute_path) or "<root>"
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        known = set(error.schema.get("properties", {}))
        unknown = sorted(str(k) for k in error.instance if k not in known)
        if unknown:
            key = unknown[0] if where == "<root>" else f"{where}.{unknown[0]}"
            files = [str(p.relative_to(config_dir().parent)) for p in _files_setting(unknown[0])]
            found = f"set in {', '.join(files)}" if files else "set by an override"
            return f"config key {key}: unknown key ({found}; the keys allowed are listed in {schema_path})"
    return f"config key {where}: {error.message} ({schema_path})"


def _files_setting(key: str) -> list[Path]:
    """Config files with ``key:`` as a YAML key (block or flow style)."""
    pattern = re.compile(rf"(^\s*(-\s+)?|[{{,]\s*){re.escape(key)}\s*:", re.MULTILINE)
    return [p for p in sorted(config_dir().rglob("*.yaml")) if pattern.search(p.read_text())]


def launch_shape(stage_cfg: Mapping) -> tuple[int, int]:
    """(nodes, processes per node) of a training stage: world_size split over gpus_per_node (CPU: one node)."""
    train = stage_cfg["train"]
    world = int(train.get("world_size", 1))
    per_node = int(train.get("gpus_per_node", 0)) or world
    if world % per_node:
        raise ConfigError(f"config key train.world_size {world} is not a multiple of train.gpus_per_node {per_node}")
    return world // per_node, per_node
