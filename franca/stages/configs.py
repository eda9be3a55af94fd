"""`franca config`: the job config files of one preset x experiment x seed, for running stages by hand.

The workflow writes the same files (franca.config.job_files) under work/config/ when it builds its DAG; every stage
command then reads only the file its rule hands it (`--config FILE`).
"""

from __future__ import annotations

import argparse


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="tiny | small | paper_* (config/preset/)")
    parser.add_argument("--experiment", default="franca", help="config/experiment/<name>.yaml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", action="append", default=[], help="Hydra override key=value (repeatable)")
    parser.add_argument("--out", default="work/config", help="root directory of the written files")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from franca import config as fc

    cfg = fc.compose(args.preset, args.experiment, args.seed, tuple(args.override))
    fc.validate(cfg)
    for path, obj in fc.job_files(cfg, args.out, args.experiment, args.seed).items():
        print(fc.write_slice(path, obj))
    return 0
