"""A fake results tree shaped like a tiny run, with known numbers (the paper aggregates; the science is tested
elsewhere): eval JSONs, 9-round RASA reports, 100-iteration training logs, ``pca.pt`` with 64 px images, a dedup
report and a manifest, each with its ``provenance.json``. ``fake_inputs`` lists the files as ``paper_inputs`` does."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from franca.paper.collect import PaperInputs

EXPERIMENTS = {
    "franca": {"seeds": [0, 1], "highres": True, "rasa": True},
    "dinov2": {"seeds": [0, 1], "highres": True, "rasa": True},
    "mrl_only": {"seeds": [0], "highres": False, "rasa": True},
    "cyclic_only": {"seeds": [0], "highres": False, "rasa": False},
}
EXP_OFFSET = {"franca": 0.10, "dinov2": 0.0, "mrl_only": 0.04, "cyclic_only": 0.06}
CKPT_OFFSET = {"pretrain": 0.0, "highres": 0.02}
N_CLASSES = 10
RASA_ROUNDS = 9
ITERATIONS = 100


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
INIT_KNN, PIXELS_KNN = 0.15, 0.80  # k-NN of the random-init backbone (+ 0.01 per seed) and of raw pixels
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
                        if bench == "knn" and ckpt == "pretrain":  # the features job's references (--baselines)
                            values |= {"init_top1_k20": INIT_KNN + 0.01 * seed, "pixels_top1_k20": PIXELS_KNN}
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
                        for r in range(RASA_ROUNDS)
                    ]
                    _write_json(results / "rasa" / exp / f"s{seed}" / ckpt / "report.json", rounds)
                feats = results / "features" / exp / f"s{seed}" / ckpt
                feats.mkdir(parents=True, exist_ok=True)
                torch.save(_pca_content(rng), feats / "pca.pt")  # as franca.stages.evaluate.run_features writes it
                _provenance(feats, "features", f"run-feat-{exp}-{seed}-{ckpt}", root)
            stage = results / "pretrain" / exp / f"s{seed}" / "stage1"
            stage.mkdir(parents=True, exist_ok=True)
            lines = [
                {
                    "iteration": i,
                    "total_loss": 5.0 - 0.01 * i,
                    "dino_local_crops_loss": 2.0 - 0.004 * i,
                    "dino_global_crops_loss": 1.9 - 0.004 * i,
                    "koleo_loss": -0.1 - 0.001 * i,
                    "ibot_loss": 1.0 - 0.002 * i,
                    "lr": 0.1,
                }
                for i in range(ITERATIONS)
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
                hr_lines = [{"iteration": i, "total_loss": 4.0 - 0.01 * i, "ibot_loss": 0.8} for i in range(20)]
                (hr / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in hr_lines) + "\n")
                _provenance(hr, "highres", f"run-hr-{exp}-{seed}", root)
    _write_data(root)
    return results


def _pca_content(rng: np.random.Generator) -> dict:
    """4 images of 64 px (a disc on a gradient) and patch tokens (4, 8, 8, 32) that follow the disc."""
    yy, xx = np.mgrid[0:64, 0:64]
    images, tokens = [], []
    for _ in range(4):
        cy, cx, r = rng.integers(16, 48), rng.integers(16, 48), rng.integers(8, 16)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        img = np.stack([xx * 3, yy * 3, np.full_like(xx, 90)], -1).astype(np.uint8)
        img[disc] = rng.integers(0, 255, 3, dtype=np.uint8)
        images.append(img)
        patch = disc.reshape(8, 8, 8, 8).mean(axis=(1, 3))  # (8, 8) fraction of the disc per patch
        tokens.append(patch[..., None] * rng.normal(size=32) + 0.1 * rng.normal(size=(8, 8, 32)))
    return {
        "pca_images": torch.from_numpy(np.stack(images)),
        "pca_patch_tokens": torch.from_numpy(np.stack(tokens)).float(),
    }


def _write_data(root: Path) -> None:
    """data/synth/manifest.parquet (2,000 train, 200 val, 200 test; 7 failed rows) and data/dedup/report.json."""
    splits = ["train"] * 2000 + ["val"] * 200 + ["test"] * 200
    manifest = pd.DataFrame(
        {
            "key": [f"{i:06d}" for i in range(len(splits) + 7)],
            "status": ["ok"] * len(splits) + ["failed"] * 7,
            "split": splits + ["train"] * 7,
            "source": ["synthetic"] * (len(splits) + 7),
            "license": ["CC0-1.0"] * (len(splits) + 7),
        }
    )
    (root / "data" / "synth").mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(root / "data" / "synth" / "manifest.parquet")
    report = {
        "train_manifest": "data/synth/manifest.parquet",
        "n_train": 2000,
        "kept": 1920,
        "removed": {"eval_copy": 20, "exact_duplicate": 20, "near_duplicate": 40},
    }
    _write_json(root / "data" / "dedup" / "report.json", report)
    _provenance(root / "data" / "dedup", "dedup", "run-dedup", root)


def fake_inputs(root: Path, experiments: dict | None = None, benchmarks: tuple = tuple(BENCH_METRICS)) -> PaperInputs:
    """The files of the fake run as ``paper_inputs`` (workflow/rules/common.smk) lists them for ``experiments``
    and ``benchmarks`` (a listed file that the tree lacks is an expected result that failed)."""
    experiments, results = experiments or EXPERIMENTS, root / "results"
    inputs = PaperInputs(dedup=[root / "data/dedup/report.json"], manifests=[root / "data/synth/manifest.parquet"])
    for exp, entry in experiments.items():
        for seed in entry["seeds"]:
            inputs.metrics.append(results / f"pretrain/{exp}/s{seed}/stage1/metrics.jsonl")
            for ckpt in ["pretrain", "highres"] if entry["highres"] else ["pretrain"]:
                if ckpt == "highres":
                    inputs.metrics.append(results / f"highres/{exp}/s{seed}/metrics.jsonl")
                run = f"{exp}/s{seed}/{ckpt}"
                inputs.evals += [results / f"eval/{run}/{b}.json" for b in benchmarks]
                if entry["rasa"]:
                    inputs.evals += [results / f"eval/{run}/{b}_rasa.json" for b in benchmarks if b in DENSE]
                    inputs.rasa.append(results / f"rasa/{run}/report.json")
                inputs.pca.append(results / f"features/{run}/pca.pt")
    return inputs
