"""The one evaluation registry (spec 7): cached features -> result dict, used by the workflow and the tests alike.

The features job runs the frozen teacher once per checkpoint (``extract_eval_features``) and caches what every
benchmark needs: per classification split the normalised CLS of the last blocks and the mean patch token, per dense
split the final-norm patch tokens with their masks. ``evaluate(name, feats, kwargs, rasa_head)`` then runs one
benchmark on that cache; ``run_benchmark`` chains both for a backbone and sample iterables. RASA is linear on the
final-norm patch tokens, so applying the head to cached tokens equals
``forward_features(x, rasa_head=head)["patch_token_rasa"]``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable, Mapping

from torch import nn

from franca.eval.result import write_eval_json

logger = logging.getLogger(__name__)

__all__ = ["BENCHMARKS", "DENSE_BENCHMARKS", "evaluate", "extract_eval_features", "run_benchmark", "write_eval_json"]

CLASSIFICATION_BENCHMARKS = ("knn", "linear", "logreg")
DENSE_BENCHMARKS = ("hummingbird", "linseg", "overcluster", "position_probe")
BENCHMARKS = (*CLASSIFICATION_BENCHMARKS, *DENSE_BENCHMARKS)
DEFAULT_N_LAST_BLOCKS = (1, 4)  # linear_probe's default grid (spec 7.2)


def linear_blocks(linear_kwargs: Mapping | None) -> int:
    """How many last blocks the features job caches: the largest of the linear grid's ``n_last_blocks_list``."""
    return max((linear_kwargs or {}).get("n_last_blocks_list") or DEFAULT_N_LAST_BLOCKS)


def extract_eval_features(
    backbone: nn.Module,
    classification: Mapping[str, Iterable[dict]],
    dense: Mapping[str, Iterable[dict]],
    geometry: Mapping,
    n_last_blocks: int,
    init: nn.Module | None = None,
    baseline_splits: Iterable[str] = ("train", "val"),
) -> dict:
    """{"linear": {split: linear features}, "dense": {split: patch features}} of the given sample iterables; with
    ``init``, also {"baselines": {"init" | "pixels": {split: {features, labels}}}} of the ``baseline_splits``,
    computed on the same decoded batches as the linear features (one pass over each split)."""
    from franca.eval.features import extract_patch_features

    linear, refs = {}, {}
    for split, samples in classification.items():
        linear[split], ref = _classification_pass(
            backbone, samples, geometry, n_last_blocks, init if split in baseline_splits else None
        )
        if ref is not None:
            refs[split] = ref
    out = {
        "linear": linear,
        "dense": {s: extract_patch_features(backbone, samples, **geometry) for s, samples in dense.items()},
    }
    if init is not None:
        from franca.eval.baselines import BASELINES

        out["baselines"] = {name: {split: ref[name] for split, ref in refs.items()} for name in BASELINES}
    return out


def _classification_pass(backbone, samples, geometry: Mapping, n_last_blocks: int, init) -> tuple[dict, dict | None]:
    """(linear features, baseline features of the same batches or None) of one split, decoded once."""
    from franca.eval.baselines import baseline_batch_features, collect_baselines
    from franca.eval.features import extract_linear_features

    refs, labels = [], []

    def reference(batch: dict) -> None:
        refs.append(baseline_batch_features(init, batch))
        labels.append(batch["labels"])

    hook = reference if init is not None else None
    linear = extract_linear_features(backbone, samples, n_last_blocks=n_last_blocks, on_batch=hook, **geometry)
    return linear, (collect_baselines(refs, labels) if init is not None else None)


def _dense_tokens(feats: Mapping, rasa_head: Callable | None, name: str) -> tuple:
    dense, head = feats["dense"], rasa_head or (lambda x: x)
    for split in ("train", "val"):
        if split in dense and dense[split]["segs"] is None and name != "position_probe":
            raise ValueError(f"{name}: the {split} samples carry no 'seg' masks")
    return tuple(head(dense[s]["patch_tokens"]) if s in dense else None for s in ("train", "val"))


def evaluate(name: str, feats: Mapping, kwargs: Mapping | None, rasa_head: Callable | None = None) -> dict:
    """One benchmark on cached features -> {"metrics", "details"}. Imports only that benchmark's module."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    module = importlib.import_module(f"franca.eval.{name}")
    kw = dict(kwargs or {})
    if name in CLASSIFICATION_BENCHMARKS:
        if rasa_head is not None:
            logger.warning("%s uses the CLS token; the RASA head (patch tokens only) has no effect", name)
        lin = feats["linear"]
        if name == "linear":
            return module.linear_probe(lin["train"], lin["val"], lin.get("test"), **kw)
        tr, va = lin["train"], lin["val"]  # last block's normalised CLS = x_norm_clstoken
        fn = module.knn_classify if name == "knn" else module.logreg_eval
        return fn(tr["cls_tokens"][:, -1], tr["labels"], va["cls_tokens"][:, -1], va["labels"], **kw)
    dense, n_cls = feats["dense"], feats.get("num_classes")
    if name == "position_probe":
        return module.evaluate_position_probe(
            dense["train"]["patch_tokens"], dense["val"]["patch_tokens"], rasa_head=rasa_head, **kw
        )
    if n_cls is None:
        raise KeyError(f"benchmark {name!r} needs 'num_classes' (number of segmentation classes)")
    tr, va = _dense_tokens(feats, rasa_head, name)
    if name == "overcluster":
        return module.overcluster_eval(va, dense["val"]["segs"], int(n_cls), **kw)
    fn = module.hummingbird_eval if name == "hummingbird" else module.linseg_eval
    return fn(tr, dense["train"]["segs"], va, dense["val"]["segs"], int(n_cls), **kw)


def run_benchmark(
    name: str,
    backbone: nn.Module,
    splits: Mapping[str, Iterable[dict]],
    cfg: Mapping,
    rasa_head: Callable | None = None,
) -> dict:
    """Extract what benchmark ``name`` needs from ``splits`` ("train", "val", optionally "test"; each iterable is
    consumed once), then :func:`evaluate` it. ``cfg``: ``resize_size``, ``crop_size``, ``batch_size``, ``device``,
    ``num_classes`` (dense benchmarks) and a sub-dict of keyword arguments per benchmark name."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    needed = ("val",) if name == "overcluster" else ("train", "val")
    missing = [s for s in needed if s not in splits]
    if missing:
        raise KeyError(f"benchmark {name!r} needs the splits {missing} (got {sorted(splits)})")
    if name in ("hummingbird", "linseg", "overcluster") and "num_classes" not in cfg:
        raise KeyError(f"benchmark {name!r} needs 'num_classes' (number of segmentation classes)")
    geometry = {
        "resize_size": int(cfg.get("resize_size", 256)),
        "crop_size": int(cfg.get("crop_size", 224)),
        "batch_size": int(cfg.get("batch_size", 64)),
        "device": cfg.get("device", "cpu"),
    }
    kw = cfg.get(name, {})
    if name in CLASSIFICATION_BENCHMARKS:
        cls, dense = {s: splits[s] for s in (*needed, "test") if s in splits}, {}
    else:
        cls, dense = {}, {s: splits[s] for s in needed}
    feats = extract_eval_features(backbone, cls, dense, geometry, linear_blocks(cfg.get("linear")))
    return evaluate(name, {**feats, "num_classes": cfg.get("num_classes")}, kw, rasa_head)
