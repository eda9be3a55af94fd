"""`franca paper`: tables, figures and index.html of a results tree (franca/paper), with provenance."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default="results")
    parser.add_argument("--out", default="results/paper")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--experiments", required=True, help="JSON: {name: {seeds, highres, rasa}}")
    parser.add_argument("--reference", default=None, help="published numbers (default config/reference/)")
    parser.add_argument("--dense-dataset", default=None, help="data.dense.dataset of the run (reference table)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from franca import config as fc
    from franca.paper.build import build_paper
    from franca.stages.common import job

    experiments = json.loads(args.experiments)
    reference = Path(args.reference) if args.reference else fc.config_dir() / "reference" / "paper_readme.yaml"
    out = Path(args.out)
    cfg = {"preset": args.preset, "experiments": experiments, "dense_dataset": args.dense_dataset}
    with job("paper", args, cfg, out, inputs=[], tags={"preset": args.preset}) as current:
        started = time.time()
        summary = build_paper(
            Path(args.results),
            out,
            experiments=experiments,
            preset=args.preset,
            reference_yaml=reference,
            dense_dataset=args.dense_dataset,
        )
        current.inputs = [Path(p) for p in summary["inputs"]] + [reference]
        current.extra["build_s"] = round(time.time() - started, 2)
        current.extra["notes"] = summary.get("notes", [])
    return 0
