"""`franca paper`: tables, figures and index.html from the result files the `paper` rule hands it (franca/paper).

It reads exactly the files given on its command line (``paper_inputs`` in ``workflow/rules/common.smk`` lists
them), never a directory listing, so the command in ``logs/paper.log`` can be rerun by hand.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--evals", nargs="*", default=[], help="eval JSONs results/eval/{exp}/s{seed}/{ckpt}/*.json")
    parser.add_argument("--metrics", nargs="*", default=[], help="training metrics.jsonl of every stage")
    parser.add_argument("--rasa", nargs="*", default=[], help="RASA reports results/rasa/.../report.json")
    parser.add_argument("--pca", nargs="*", default=[], help="PCA images results/features/.../pca.pt")
    parser.add_argument("--dedup", nargs="*", default=[], help="dedup reports data/dedup/.../report.json")
    parser.add_argument("--manifests", nargs="*", default=[], help="data/{dataset}/manifest.parquet (header)")
    parser.add_argument("--out", default="results/paper")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--experiments", required=True, help="JSON: {name: {seeds, highres, rasa}}")
    parser.add_argument("--reference", default=None, help="published numbers (default config/reference/)")
    parser.add_argument("--dense-dataset", default=None, help="data.dense.dataset of the run (reference table)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from franca import config as fc
    from franca.paper.build import build_paper
    from franca.paper.collect import PaperInputs
    from franca.stages.common import job

    experiments = json.loads(args.experiments)
    reference = Path(args.reference) if args.reference else fc.config_dir() / "reference" / "paper_readme.yaml"
    inputs = PaperInputs(args.evals, args.metrics, args.rasa, args.pca, args.dedup, args.manifests)
    out = Path(args.out)
    cfg = {"preset": args.preset, "experiments": experiments, "dense_dataset": args.dense_dataset}
    with job("paper", args, cfg, out, inputs=[], tags={"preset": args.preset}) as current:
        started = time.time()
        summary = build_paper(
            inputs,
            out,
            experiments=experiments,
            preset=args.preset,
            reference_yaml=reference,
            dense_dataset=args.dense_dataset,
        )
        current.inputs = [Path(p) for p in summary["inputs"]]
        current.extra["build_s"] = round(time.time() - started, 2)
        current.extra["notes"] = summary.get("notes", [])
    return 0
