"""`franca <stage>`: every workflow stage as a command (Snakemake rules only call these).

franca data {fetch,shard,dedup}   data phases (franca/data)
franca pretrain | highres         SSL training (franca/train)
franca features | rasa | eval     frozen-backbone features, RASA, evaluations (franca/eval, franca/rasa)
franca paper                      tables, figures, index.html (franca/paper)
franca audit PATH                 walk provenance from an artifact back to the sources, verifying hashes
franca restore                    after `dvc pull`: verify hashes, restore file times so nothing reruns
franca config                     the job config files that the stages read (--config FILE)
franca plan                       jobs, FLOPs, GPU-hours and storage of a preset before submitting
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys

# subcommand -> (module under franca.stages with `add_arguments(name, parser)`, help)
COMMANDS = {
    "config": ("configs", "write the job config files of a preset x experiment x seed (for runs by hand)"),
    "data": ("data", "data phases: fetch | shard | dedup"),
    "pretrain": ("train", "SSL pretraining stage; resumes from work/ckpt/ when killed"),
    "resize-pos-embed": ("train", "offline step of the high-res fine-tune: teacher pos_embed to the new grid"),
    "highres": ("train", "high-resolution fine-tune from a resized checkpoint (spec 4, stage 2)"),
    "features": ("evaluate", "frozen-teacher features of the evaluation sets (cached once per checkpoint)"),
    "rasa": ("evaluate", "RASA positional debiasing head on frozen patch tokens (spec 5)"),
    "eval": ("evaluate", "one benchmark on cached features: knn | linear | logreg | hummingbird | linseg | ..."),
    "paper": ("paper", "tables, figures and index.html from a results tree"),
    "audit": ("audit", "verify the provenance chain of an artifact back to its sources"),
    "restore": ("restore", "after cloning: dvc pull, verify, restore file times"),
    "plan": ("plan", "jobs, FLOPs, GPU-hours and storage of a preset before submitting"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Only the invoked command's module is imported (fast start, no heavy imports for `franca audit`)."""
    parser = argparse.ArgumentParser(prog="franca", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text)
        if name == command:
            importlib.import_module(f"franca.stages.{module}").add_arguments(name, child)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("franca").info("command: %s", shlex.join(["franca", *argv]))  # rerun by hand from the log
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
