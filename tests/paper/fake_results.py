"""A small fake results tree with known numbers (the paper stage aggregates; the science is tested elsewhere)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

EXPERIMENTS = {
    "franca": {"seeds": [0, 1], "highres": True, "rasa": True},
    "dinov2": {"seeds": [0, 1], "highres": True, "rasa": True},
    "mrl_only": {"seeds": [0], "highres": False, "rasa": True},
    "cyclic_only": {"seeds": [0], "highres": False, "rasa": False},
}
EXP_OFFSET = {"franca": 0.10, "dinov2": 0.0, "mrl_only": 0.04, "cyclic_only": 0.06}
CKPT_OFFSET = {"pretrain": 0.0, "highres": 0.02}
N_CLASSES = 10


def metric_value(exp: str, seed: int, ckpt: str, bench: str, metric: str, rasa: bool = False) -> float:
    """The known value every fake eval JSON holds (fractions, like the eval modules write)."""
    base = {
        "top1_k20": 0.40,
        "top5_k20": 0.80,
        "top1": 0.45,
        "top1_holdout_selected": 0.43,
        "miou": 0.30,
        "miou_k10": 0.20,
        "miou_k30": 0.26,
        "miou_k100": 0.33,
        "r2": 0.90,
    }[metric]
    if bench == "logreg":
        base += 0.01
    if bench == "linseg":
        base += 0.05
    value = base + EXP_OFFSET[exp] + CKPT_OFFSET[ckpt] + 0.02 * seed + (0.03 if rasa else 0.0)
    return 0.90 - 0.8 * value if (metric == "r2" and rasa) else value


BENCH_METRICS = {
    "knn": ["top1_k20", "top5_k20"],
    "linear": ["top1", "top1_holdout_selected"],
    "logreg": ["top1"],
    "hummingbird": ["miou"],
    "linseg": ["miou"],
    "overcluster": ["miou_k10", "miou_k30", "miou_k100"],
    "position_probe": ["r2"],
}
DENSE = ("hummingbird", "linseg", "overcluster", "position_probe")
# one deliberately missing file: dinov2 seed 1 highres linseg
MISSING = {("dinov2", 1, "highres", "linseg")}


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _provenance(folder: Path, stage: str, run_id: str, root: Path, config: dict | None = None) -> None:
    outputs = {
        p.relative_to(root).as_posix(): {"sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in folder.iterdir()
    }
    _write_json(
        folder / "provenance.json",
        {
            "stage": stage,
            "outputs": outputs,
            "inputs": {},
            "config": config or {},
            "code": {"git_commit": f"commit{run_id}", "dirty": False},
            "mlflow_run_id": run_id,
        },
    )


def write_fake_tree(root: Path) -> Path:
    """Write results/ and data/ under ``root``; returns results/."""
    results = root / "results"
    rng = np.random.default_rng(0)
    for exp, entry in EXPERIMENTS.items():
        for seed in entry["seeds"]:
            ckpts = ["pretrain", "highres"] if entry["highres"] else ["pretrain"]
            for ckpt in ckpts:
                folder = results / "eval" / exp / f"s{seed}" / ckpt
                for bench, metrics in BENCH_METRICS.items():
                    if (exp, seed, ckpt, bench) in MISSING:
                        continue
                    for rasa in (False, True) if (bench in DENSE and entry["rasa"]) else (False,):
                        values = {m: metric_value(exp, seed, ckpt, bench, m, rasa) for m in metrics}
                        if bench == "position_probe" and rasa:  # as franca.eval.position_probe writes it
                            values = {"r2": metric_value(exp, seed, ckpt, bench, "r2"), "r2_rasa": values["r2"]}
                        details = {"n_classes": N_CLASSES} if bench == "overcluster" else {}
                        _write_json(
                            folder / f"{bench}{'_rasa' if rasa else ''}.json",
                            {
                                "benchmark": bench,
                                "checkpoint": "x.pt",
                                "rasa": rasa,
                                "metrics": values,
                                "details": details,
                            },
                        )
                _provenance(folder, "eval", f"run-{exp}-{seed}-{ckpt}", root)
                if entry["rasa"]:
                    rounds = [
                        {
                            "round": r,
                            "r2_x": 0.9,
                            "r2_x_pos": 0.9 - 0.01 * r,
                            "r2_x_no_pos": 0.5 / (r + 1) + 0.01 * seed,
                            "cos_x_no_pos_x": 0.99 - 0.01 * r,
                        }
                        for r in range(3)
                    ]
                    _write_json(results / "rasa" / exp / f"s{seed}" / ckpt / "report.json", rounds)
                feats = results / "features" / exp / f"s{seed}" / ckpt / "features.pt"
                feats.parent.mkdir(parents=True, exist_ok=True)
                torch.save(
                    {
                        "pca_images": torch.from_numpy(rng.integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)),
                        "pca_patch_tokens": torch.randn(3, 4, 4, 8),
                    },
                    feats,
                )
            stage = results / "pretrain" / exp / f"s{seed}" / "stage1"
            stage.mkdir(parents=True, exist_ok=True)
            lines = [
                {
                    "iteration": i,
                    "total_loss": 5.0 - 0.01 * i,
                    "dino_local_crops_loss": 2.0,
                    "ibot_loss": 1.0,
                    "lr": 0.1,
                }
                for i in range(0, 50, 10)
            ]
            (stage / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
            cfg = {
                "crops": {"global_crops_size": 32},
                "model": {"patch_size": 4},
                "ibot": {"mask_ratio_min_max": [0.1, 0.5]},
            }
            _provenance(stage, "pretrain", f"run-pre-{exp}-{seed}", root, cfg)
            if entry["highres"]:
                hr = results / "highres" / exp / f"s{seed}"
                hr.mkdir(parents=True, exist_ok=True)
                (hr / "metrics.jsonl").write_text(json.dumps({"iteration": 0, "total_loss": 4.0}) + "\n")
    _write_json(
        root / "data" / "dedup" / "report.json",
        {"kept": 90, "removed_by_reason": {"exact": 4, "near": 3, "eval_overlap": 2}},
    )
    return results
