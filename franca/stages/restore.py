"""`franca restore`: dvc pull, verify, restore file times in dependency order."""

from __future__ import annotations

import argparse


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-pull", action="store_true", help="files are already there; only verify and set times")
    parser.add_argument("--remote", default=None, help="DVC remote name (default: the repo's default remote)")
    parser.add_argument("--roots", nargs="+", default=["data", "results"])
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from franca import restore

    if not args.no_pull:
        restore.dvc_pull(args.remote)
    n = restore.restore_times(args.roots, verify=True)
    print(f"restored and verified {n} files")
    return 0
