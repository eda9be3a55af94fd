"""`franca data dedup-eval-index | dedup-unit | dedup-block`: the fan-out half of dedup (issue 17 item 4).

Used when the dedup config has ``fan_out: {bands, block_bits}`` (workflow/rules/dedup.smk): the eval sets' index is
built once, each work unit checks its images against it and writes its band index, each (band, block) job writes the
candidate pairs it owns, and ``franca data dedup --fan-out DIR`` reads all of them (franca/data/dedup.py).
Without ``fan_out`` the same functions run inside the one ``franca data dedup`` job.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from franca import provenance
from franca.stages.common import add_job_args, add_pairs_arg, job, parse_pairs, start

OPTION_KEYS = ("hamming_threshold", "eval_hamming_threshold", "eval_similarity_threshold", "verify_threshold")
OPTION_KEYS += ("eval_verify_threshold", "layout_threshold", "normalized_layout_threshold", "pixel_threshold")


def add_arguments(sub) -> None:
    """The three subcommands, under ``franca data``."""
    index = sub.add_parser("dedup-eval-index", help="the eval sets' descriptors, once (dedup fan-out)")
    add_pairs_arg(index, "--manifest", "PATH", "manifest (file or directory) of each dataset dedup names")
    index.add_argument("--out", required=True, help="eval_index.parquet")
    unit = sub.add_parser("dedup-unit", help="one unit: eval contamination and band index (dedup fan-out)")
    unit.add_argument("--manifest", required=True, help="the unit's manifest partition")
    unit.add_argument("--unit", required=True, help="u%%06d")
    unit.add_argument("--eval-index", required=True)
    unit.add_argument("--out", required=True)
    block = sub.add_parser("dedup-block", help="candidate pairs of one (band, block) job (dedup fan-out)")
    block.add_argument("--units-dir", required=True, help="directory of the dedup-unit outputs")
    block.add_argument("--manifest", required=True, help="the dataset's manifest: names its units")
    block.add_argument("--band", type=int, required=True)
    block.add_argument("--block", type=int, required=True)
    block.add_argument("--out", required=True, help="pairs parquet")
    for child, func in ((index, run_eval_index), (unit, run_unit), (block, run_block)):
        add_job_args(child)
        child.set_defaults(func=func)


def plan_of(dd: dict):
    """The band plan of a dedup config with ``fan_out`` (threshold: the loosest within-train Hamming test)."""
    from franca.data.bands import BandPlan

    if not dd.get("fan_out"):
        raise SystemExit("dedup config has no fan_out: {bands, block_bits}; the fan-out jobs need one")
    loose = max(dd["hamming_threshold"], -1 if dd.get("verify_threshold") is None else dd["verify_threshold"])
    return BandPlan(loose, dd["fan_out"]["bands"], dd["fan_out"].get("block_bits", 0))


def run_eval_index(args: argparse.Namespace) -> int:
    from franca.data.dedup import write_eval_index

    dd = start(args)
    paths = parse_pairs(args.manifest, "--manifest")
    train_ds, train_split = dd["train"].split(":")
    evals = [ref.split(":") for ref in dd["eval"]]
    out = Path(args.out)
    record = f"{out.stem}.{provenance.FILENAME}"  # beside other jobs' outputs
    with job("dedup_eval_index", args, dd, out.parent, inputs=sorted(set(paths.values())), record=record) as current:
        current.outputs = [out]
        manifests = sorted({paths[name] for name, _ in evals})  # the train set's only where it holds eval splits
        n = write_eval_index(paths.get(train_ds), manifests, train_split, sorted({s for _, s in evals}), out)
    print(f"eval index: {n} images -> {out}")
    return 0


def run_unit(args: argparse.Namespace) -> int:
    from franca.data.dedup import dedup_unit

    dd = start(args)
    plan = plan_of(dd)
    train_ds, train_split = dd["train"].split(":")
    options = {k: dd[k] for k in OPTION_KEYS if k in dd}
    with job("dedup_unit", args, dd, args.out, inputs=[args.manifest, args.eval_index], tags={"unit": args.unit}):
        dedup_unit(args.manifest, int(args.unit.lstrip("u")), train_ds, args.eval_index, args.out,
                   train_split=train_split, n_bands=plan.bands, block_bits=plan.block_bits,
                   descriptor=dd.get("descriptor", "phash"), **options)  # fmt: skip
    return 0


def unit_dirs(units_dir: str | Path, manifest: str | Path) -> list[Path]:
    """The dedup-unit output directory of every unit of a manifest (``units_dir/u%06d``)."""
    from franca.data.dedup import manifest_parts

    return [Path(units_dir) / f"u{u:06d}" for u, _ in manifest_parts(manifest)]


def run_block(args: argparse.Namespace) -> int:
    from franca.data.dedup import dedup_block

    dd = start(args)
    plan = plan_of(dd)
    dirs = unit_dirs(args.units_dir, args.manifest)
    out = Path(args.out)
    record = f"{out.stem}.{provenance.FILENAME}"  # one directory holds every block's pairs
    with job("dedup_block", args, dd, out.parent, inputs=[d / "bands.npy" for d in dirs], record=record) as current:
        current.outputs = [out]
        n = dedup_block(dirs, plan, args.band, args.block, out)
    print(f"band {args.band} block {args.block}: {n} pairs -> {out}")
    return 0
