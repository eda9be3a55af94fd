"""`franca <stage>`: every workflow stage as a command (Snakemake rules only call these).

    franca data {fetch,shard,dedup}   data phases (franca/data)
    franca pretrain | highres         SSL training (franca/train)
    franca features | rasa | eval     frozen-backbone features, RASA, evaluations (franca/eval, franca/rasa)
    franca paper                      tables, figures, index.html (franca/paper)
    franca audit PATH                 walk provenance from an artifact back to the sources, verifying hashes
    franca restore                    after `dvc pull`: verify hashes, restore file times so nothing reruns
    franca plan                       jobs, FLOPs, GPU-hours and storage of a preset before submitting
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> module under franca.stages with `add_arguments(parser)` and `run(args) -> int`
COMMANDS = {
    "data": "data",
    "pretrain": "train",
    "resize-pos-embed": "train",
    "highres": "train",
    "features": "evaluate",
    "rasa": "evaluate",
    "eval": "evaluate",
    "paper": "paper",
    "audit": "audit",
    "restore": "restore",
    "plan": "plan",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="franca", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        stage = importlib.import_module(f"franca.stages.{module}")
        stage.add_arguments(name, sub.add_parser(name, help=stage.HELP[name]))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
