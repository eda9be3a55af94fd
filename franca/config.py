"""Hydra composition of the stage configs.

One primary config (`config/franca.yaml`) composed with a preset (scale), an experiment (method variant), a seed and
free overrides gives the full config. Each stage reads only its slice (`stage_config`): that slice is what the
workflow puts in a rule's params, so editing a YAML value reruns exactly the stages whose slice changed. Keys under
`run` (workers, checkpoint period, progress bars) are orchestration: they never change results and are excluded.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

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
    return copy.deepcopy(_compose_cached(str(config_dir()), preset, experiment, int(seed), tuple(overrides)))


@functools.lru_cache(maxsize=256)
def _compose_cached(cdir: str, preset: str, experiment: str, seed: int, overrides: tuple[str, ...]) -> dict[str, Any]:
    args = [f"preset={preset}", f"experiment={experiment}", f"seed={seed}", *overrides]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=cdir, version_base="1.3"):
            cfg = hydra_compose(config_name=PRIMARY, overrides=args)
    except Exception as err:  # hydra raises several types; all mean a bad override or group option
        raise ConfigError(f"cannot compose config with overrides {args}: {err}") from err
    finally:
        GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg, resolve=True)


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
        return {"rasa": cfg["rasa"], "data": cfg["data"]["rasa"], "seed": cfg["seed"]}
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
    """(dataset, split) that each classification split (train, val, test) of the features stage reads.

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
    names = {data[role]["dataset"] for role in ("pretrain", "highres", "rasa")} | set(eval_datasets(cfg))
    names |= {ref.split(":")[0] for ref in [data["dedup"]["train"], *data["dedup"]["eval"]]}
    for name in sorted(names):
        dataset_config(cfg, name)
    return sorted(names)


def canonical_json(obj: Any) -> str:
    """Stable text of a config slice: the rule params that trigger reruns."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def stage_args(preset: str, experiment: str, seed: int, overrides: Sequence[str]) -> list[str]:
    """Command-line arguments that make a `franca` stage compose the same config as the workflow."""
    args = ["--preset", preset, "--experiment", experiment, "--seed", str(seed), "--threads", "1"]
    for override in overrides:
        args += ["--override", override]
    return args


def validate(cfg: Mapping) -> None:
    """Check a composed config against workflow/schemas/method.schema.yaml plus cross-key rules."""
    import jsonschema
    import yaml

    rel_path = Path("workflow", "schemas", "method.schema.yaml")
    path = config_dir().parent / rel_path
    path = path if path.exists() else Path(__file__).resolve().parent.parent / rel_path
    schema = yaml.safe_load(path.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(cfg), key=lambda e: list(e.path))
    if errors:
        raise ConfigError(_schema_error(errors[0], rel_path))
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
