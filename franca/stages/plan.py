"""`franca plan`: the job table, FLOPs, GPU-hours and storage of a preset (franca/plan.py), before submitting."""

from __future__ import annotations

import argparse


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    from franca import plan

    plan.add_arguments(parser)
    parser.set_defaults(func=plan.run)
