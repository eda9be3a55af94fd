"""`franca data dedup-eval-index | dedup-unit | dedup-bands | dedup-block`: the fan-out half of dedup (issue 17 item 4).

Used when the dedup config has ``fan_out: {bands, block_bits}`` (workflow/rules/dedup.smk): the eval sets' index is
built once, each work unit checks its images against it and writes its band index, one light job lists every unit's
band index with its sha256 (``bands.json``: each block job depends on that one file, not on every unit's files, so
the DAG has units + blocks edges instead of units x blocks), each (band, block) job writes the candidate pairs it
owns, and ``franca data dedup --fan-out DIR`` reads all of them (franca/data/dedup.py).
Without ``fan_out`` the same functions run inside the one ``franca data dedup`` job.
"""

from __future__ import annotations

import argparse
import json
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
    bands = sub.add_parser("dedup-bands", help="every unit's band index with its sha256, in one file (dedup fan-out)")
    block = sub.add_parser("dedup-block", help="candidate pairs of one (band, block) job (dedup fan-out)")
    for child in (bands, block):
        child.add_argument("--units-dir", required=True, help="directory of the dedup-unit outputs")
        child.add_argument("--manifest", required=True, help="the dataset's manifest: names its units")
    bands.add_argument("--out", required=True, help="bands.json")
    block.add_argument("--bands-index", required=True, help="the bands.json of dedup-bands")
    block.add_argument("--band", type=int, required=True)
    block.add_argument("--block", type=int, required=True)
    block.add_argument("--out", required=True, help="pairs parquet")
    for child, func in ((index, run_eval_index), (unit, run_unit), (bands, run_bands), (block, run_block)):
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


INDEX_FILES = ("bands.npy", "offsets.npy")  # what dedup_block reads of each unit


def run_bands(args: argparse.Namespace) -> int:
    """bands.json: {path: file record (sha256, signature)} of every unit's index files, hashes taken from the
    dedup-unit records where the files are unchanged."""
    dd = start(args)
    files = [d / name for d in unit_dirs(args.units_dir, args.manifest) for name in INDEX_FILES]
    out = Path(args.out)
    with job("dedup_bands", args, dd, out.parent, inputs=files, record=f"{out.stem}.{provenance.FILENAME}") as current:
        known = provenance.known_hashes(files)
        index = {provenance.rel(p): provenance.file_record(p, known) for p in files}
        provenance.atomic_write_text(out, json.dumps(index, indent=1, sort_keys=True))
        current.outputs = [out]
    print(f"band index of {len(files) // len(INDEX_FILES)} units -> {out}")
    return 0


def checked_unit_dirs(bands_index: str | Path, units_dir: str | Path, manifest: str | Path) -> list[Path]:
    """The unit directories of ``manifest``, each of whose index files ``bands_index`` lists with the same sha256
    (re-hashed only when its signature changed); a missing or changed file is named."""
    index = json.loads(Path(bands_index).read_text())
    dirs = unit_dirs(units_dir, manifest)
    for path in (d / name for d in dirs for name in INDEX_FILES):
        listed = index.get(provenance.rel(path))
        if listed is None:
            raise SystemExit(f"{bands_index} does not list {path}: rerun the dedup_bands job")
        if provenance.file_record(path, index)["sha256"] != listed["sha256"]:
            raise SystemExit(f"{path} changed after {bands_index} was written: rerun the dedup_bands job")
    return dirs


def run_block(args: argparse.Namespace) -> int:
    from franca.data.dedup import dedup_block

    dd = start(args)
    plan = plan_of(dd)
    dirs = checked_unit_dirs(args.bands_index, args.units_dir, args.manifest)
    out = Path(args.out)
    record = f"{out.stem}.{provenance.FILENAME}"  # one directory holds every block's pairs
    with job("dedup_block", args, dd, out.parent, inputs=[args.bands_index], record=record) as current:
        current.outputs = [out]
        n = dedup_block(dirs, plan, args.band, args.block, out)
    print(f"band {args.band} block {args.block}: {n} pairs -> {out}")
    return 0
