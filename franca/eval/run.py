"""One entry point per benchmark: backbone + sample splits -> result dict -> metrics JSON (docs/interfaces.md).

``run_benchmark(name, backbone, splits, cfg, rasa_head=None)`` extracts what the benchmark needs with
``franca.eval.features`` and calls the tensor-level evaluation.  ``splits`` maps "train" / "val" (and optionally
"test") to sample iterables (``franca.data.shards.iter_samples``); each is consumed once.
``cfg`` keys: ``resize_size``, ``crop_size``, ``batch_size``, ``device``, ``num_classes`` (dense benchmarks),
and a sub-dict per benchmark name with the keyword arguments of its evaluation function, e.g.
``{"knn": {"ks": [10, 20]}, "overcluster": {"mask_size": 32}}``.
Dense benchmarks and the position probe use ``rasa_head`` (a RASAHead) on the patch tokens when given; the
backbone applies it (``forward_features(x, rasa_head=...)["patch_token_rasa"]``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

from torch import nn

from franca.eval.features import extract_cls_features, extract_linear_features, extract_patch_features
from franca.eval.hummingbird import hummingbird_eval
from franca.eval.knn import knn_classify
from franca.eval.linear import linear_probe
from franca.eval.linseg import linseg_eval
from franca.eval.logreg import logreg_eval
from franca.eval.overcluster import overcluster_eval
from franca.eval.position_probe import evaluate_position_probe
from franca.eval.result import write_eval_json

logger = logging.getLogger(__name__)

__all__ = ["BENCHMARKS", "DENSE_BENCHMARKS", "run_benchmark", "write_eval_json"]

DENSE_BENCHMARKS = ("hummingbird", "linseg", "overcluster", "position_probe")


def _geometry(cfg: Mapping) -> dict:
    return {
        "resize_size": int(cfg.get("resize_size", 256)),
        "crop_size": int(cfg.get("crop_size", 224)),
        "batch_size": int(cfg.get("batch_size", 64)),
        "device": cfg.get("device", "cpu"),
    }


def _knn(backbone, splits, cfg, rasa_head):
    geo = _geometry(cfg)
    tr, va = (extract_cls_features(backbone, splits[s], **geo) for s in ("train", "val"))
    return knn_classify(tr["features"], tr["labels"], va["features"], va["labels"], **dict(cfg.get("knn", {})))


def _logreg(backbone, splits, cfg, rasa_head):
    geo = _geometry(cfg)
    tr, va = (extract_cls_features(backbone, splits[s], **geo) for s in ("train", "val"))
    return logreg_eval(tr["features"], tr["labels"], va["features"], va["labels"], **dict(cfg.get("logreg", {})))


def _linear(backbone, splits, cfg, rasa_head):
    geo = _geometry(cfg)
    kw = dict(cfg.get("linear", {}))
    n_blocks = max(kw.get("n_last_blocks_list", (1, 4)))
    feats = {
        s: extract_linear_features(backbone, splits[s], n_last_blocks=n_blocks, **geo)
        for s in ("train", "val", "test")
        if s in splits
    }
    return linear_probe(feats["train"], feats["val"], feats.get("test"), **kw)


def _patches(backbone, splits, cfg, rasa_head, split):
    return extract_patch_features(backbone, splits[split], rasa_head=rasa_head, **_geometry(cfg))


def _num_classes(cfg: Mapping, name: str) -> int:
    if "num_classes" not in cfg:
        raise KeyError(f"eval config for {name!r} needs 'num_classes' (number of segmentation classes)")
    return int(cfg["num_classes"])


def _dense(fn: Callable, name: str):
    def run(backbone, splits, cfg, rasa_head):
        tr, va = (_patches(backbone, splits, cfg, rasa_head, s) for s in ("train", "val"))
        for split, feats in (("train", tr), ("val", va)):
            if feats["segs"] is None:
                raise ValueError(f"{name}: the {split} samples carry no 'seg' masks")
        return fn(
            tr["patch_tokens"],
            tr["segs"],
            va["patch_tokens"],
            va["segs"],
            _num_classes(cfg, name),
            **dict(cfg.get(name, {})),
        )

    return run


def _overcluster(backbone, splits, cfg, rasa_head):
    va = _patches(backbone, splits, cfg, rasa_head, "val")
    if va["segs"] is None:
        raise ValueError("overcluster: the val samples carry no 'seg' masks")
    return overcluster_eval(
        va["patch_tokens"], va["segs"], _num_classes(cfg, "overcluster"), **dict(cfg.get("overcluster", {}))
    )


def _position_probe(backbone, splits, cfg, rasa_head):
    tr, va = (_patches(backbone, splits, cfg, None, s)["patch_tokens"] for s in ("train", "val"))
    return evaluate_position_probe(tr, va, rasa_head=rasa_head, **dict(cfg.get("position_probe", {})))


BENCHMARKS: dict[str, Callable] = {
    "knn": _knn,
    "linear": _linear,
    "logreg": _logreg,
    "hummingbird": _dense(hummingbird_eval, "hummingbird"),
    "linseg": _dense(linseg_eval, "linseg"),
    "overcluster": _overcluster,
    "position_probe": _position_probe,
}


def run_benchmark(
    name: str,
    backbone: nn.Module,
    splits: Mapping[str, Iterable[dict]],
    cfg: Mapping,
    rasa_head: Callable | None = None,
) -> dict:
    """Run benchmark ``name`` -> {"metrics": {flat floats}, "details": {...}}."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    missing = [s for s in ("train", "val") if s not in splits and not (name == "overcluster" and s == "train")]
    if missing:
        raise KeyError(f"benchmark {name!r} needs the splits {missing} (got {sorted(splits)})")
    if rasa_head is not None and name not in DENSE_BENCHMARKS:
        logger.warning("%s uses the CLS token; the RASA head (patch tokens only) has no effect", name)
    return BENCHMARKS[name](backbone, splits, cfg, rasa_head)
