"""`franca data fetch | shard | dedup`: the data phases (franca/data) with tracking and provenance.

fetch acquires raw bytes (generated for the tiny preset, downloaded from a URL table, or ingested from a class
folder, ImageNet-21K tars or a VOC-style segmentation tree) into `data/<ds>/raw/<split>/`; shard rewrites them into
canonical shards plus the manifest; dedup decides which training samples are kept.

Work units (issue 17, ``franca.data.units``): with ``--units UNITS_JSON --unit U`` fetch and shard run on one unit
(`data/<ds>/raw/U`, `data/<ds>/units/U`); a URL unit keeps its progress in ``<--state-dir>/<ds>/U/<identity[:16]>/``
(default work/fetch), keyed by the dataset config, the unit entry, its rows' sha256 and the code digest, and
appears in its declared output only when complete. `gather` links every unit's shards and manifest
into the dataset's handle: `data/<ds>/shards/` and the partitioned `data/<ds>/manifest/`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

from franca.stages import dedup_jobs
from franca.stages.common import add_job_args, add_pairs_arg, job, parse_pairs, start

log = logging.getLogger(__name__)


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True)
    fetch = sub.add_parser("fetch", help="generate / download / ingest a dataset into raw shards")
    fetch.add_argument("--dataset", required=True)
    fetch.add_argument("--out", required=True)
    shard = sub.add_parser("shard", help="canonical shards + manifest from raw shards")
    shard.add_argument("--dataset", required=True)
    shard.add_argument("--raw", required=True)
    shard.add_argument("--out", required=True)
    shard.add_argument("--workers", type=int, default=1)
    for child in (fetch, shard):
        child.add_argument("--units", default=None, help="the dataset's unit list (work/config/units/<ds>-*.json)")
        child.add_argument("--unit", default=None, help="the work unit of this job (u%%06d); needs --units")
    fetch.add_argument("--state-dir", default="work/fetch", help="root of the units' rolling fetch state")
    gather = sub.add_parser("gather", help="the dataset handle: links to every unit's shards and manifest")
    gather.add_argument("--dataset", required=True)
    gather.add_argument("--unit-dirs", nargs="+", required=True, help="data/<ds>/units/<unit> of every unit, in order")
    gather.add_argument("--out", required=True, help="data/<ds>: writes shards/ and manifest/ there")
    dedup = sub.add_parser("dedup", help="exact, near and eval-copy duplicates -> kept keys, report, data card")
    add_pairs_arg(dedup, "--manifest", "PATH", "manifest of each dataset the dedup config names (repeatable)")
    dedup.add_argument("--out", required=True, help="directory of kept.txt, report.json, datacard.md")
    dedup.add_argument("--fan-out", default=None, help="dir of eval_index.parquet, units/U/, blocks/ (fan_out config)")
    for child, func in ((fetch, run_fetch), (shard, run_shard), (dedup, run_dedup), (gather, run_gather)):
        add_job_args(child)
        child.set_defaults(func=func)
    dedup_jobs.add_arguments(sub)


def _unit(args: argparse.Namespace) -> dict | None:
    """The entry of ``--unit`` in ``--units`` (None without them)."""
    if (args.units is None) != (args.unit is None):
        raise SystemExit("--units and --unit go together")
    if args.units is None:
        return None
    from franca.data.units import unit_of

    return unit_of(json.loads(Path(args.units).read_text()), args.unit)


def run_fetch(args: argparse.Namespace) -> int:
    ds, entry = start(args), _unit(args)
    out, part, listing = Path(args.out), _local_part(entry), None
    external = [p for p in (ds.get("url_list"), ds.get("root")) if p]
    if entry is not None and entry["kind"] == "url_rows":
        external = [entry["part"], args.units]
    elif part is not None:  # provenance hashes this unit's files, not the whole tree (listed once, for both)
        listing = None if "tars" in part else _folder_listing(ds)
        external = [*_unit_files(ds, part, listing), args.units]
    tags = {"dataset": args.dataset, **({"unit": entry["unit"]} if entry else {})}
    with job("fetch", args, ds, out, inputs=external, tags=tags) as current:
        if entry is not None and entry["kind"] == "url_rows":
            summary = _fetch_unit(ds, entry, out, args)
        else:
            summary = _acquire(ds, out, class_names=_class_names_from(ds), part=part, listing=listing)
        current.extra["fetch_report"] = summary
        current.extra["sources"] = [
            {
                "dataset": args.dataset,
                "source": ds["source"],
                "location": ds.get("url_list") or ds.get("root") or "generated",
                "license": ds.get("license", "unknown"),
                **({"unit": entry} if entry else {}),
            }
        ]
    return 0


def _fetch_unit(ds: dict, entry: dict, out: Path, args: argparse.Namespace) -> dict:
    """One URL unit: fetch into its rolling state (identity-keyed), then publish the complete raw dir into ``out``.
    The state is kept after publishing (hard links): a forced rerun retries only transient failures."""
    from franca.data import units
    from franca.stages.train import rolling_dir

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request: 600 M lines at paper scale
    rows = units.read_unit_rows(entry, ds.get("url_col", "url"))
    state = rolling_dir(args.state_dir, Path(args.dataset) / entry["unit"], units.unit_identity(ds, entry, rows))
    log.info("unit %s: %d rows, state %s", entry["unit"], len(rows), state)
    try:
        report = units.fetch_unit(ds, entry, rows, state)
    except ValueError as err:  # the success-rate floor: a clear message, no traceback, nothing published
        raise SystemExit(f"{args.dataset} {err}") from err
    units.publish(state / "train", out / "train")
    return report


def _local_part(entry: dict | None) -> dict | None:
    """The unit entry when it is part of a local tree (a ``folder`` range or a ``tar`` group); None for no unit, a
    URL unit or a whole-tree unit."""
    return entry if entry is not None and ("start" in entry or "tars" in entry) else None


def _folder_listing(ds: dict) -> tuple[list[dict], list[str]]:
    from franca.data import sources

    return sources.list_folder(ds["root"], _class_names_from(ds))


def _unit_files(ds: dict, part: dict, listing: tuple[list[dict], list[str]] | None) -> list[Path]:
    """The source files of one unit of a local tree: its tars, or its range of the folder ``listing``."""
    if "tars" in part:
        return [Path(ds["root"]) / name for name in part["tars"]]
    return [Path(item["source"]) for item in listing[0][int(part["start"]) : int(part["stop"])]]


def _class_names_from(ds: dict) -> list[str] | None:
    """Label mapping of a folder dataset that shares another's (``classes_from``: a val tree takes the train tree's
    sorted class folders, so that a class missing from val does not shift the labels of the others). The workflow
    resolves the other tree's root into ``classes_from_root``."""
    if not ds.get("classes_from"):
        return None
    from franca.data import sources

    return sources.folder_class_names(ds["classes_from_root"])


def _acquire(
    ds: dict, out: Path, class_names: list[str] | None = None, part: dict | None = None, listing: tuple | None = None
) -> dict:
    """The whole set, or one work unit's part of a local tree (``part``: a ``folder`` range, with the tree's
    ``listing`` when the caller has it, or a ``tar`` group)."""
    source = ds["source"]
    if source == "synth":
        from franca.data import synthetic

        tmp = out / "_generated"
        summary = synthetic.generate(
            tmp,
            seed=ds["seed"],
            n_train=ds["n_train"],
            n_val=ds["n_val"],
            n_test=ds["n_test"],
            image_size=ds["image_size"],
            n_classes=ds["n_classes"],
            shard_size=ds["shard_size"],
            position_bias=ds["position_bias"],
            style=ds.get("style", "shapes"),
            **ds.get("duplicates", {}),
        )
        for tar in sorted((tmp / "shards").glob("*.tar")):  # raw/<split>/<split>-%06d.tar
            split = tar.name.split("-")[0]
            (out / split).mkdir(parents=True, exist_ok=True)
            tar.rename(out / split / tar.name)
        shutil.rmtree(tmp)
        return {k: v for k, v in summary.items() if k not in ("out_dir", "manifest")}
    if source == "urls":  # every fetch_urls option is a dataset key (max_bytes, backoff, ...); others fail
        from franca.data.fetch import fetch_urls
        from franca.data.units import fetch_options

        return fetch_urls(ds["url_list"], out / "train", **fetch_options(ds))
    from franca.data import sources

    if source == "folder":
        opts = {k: ds[k] for k in ("max_bytes", "holdout") if k in ds}
        dest = out if "holdout" in ds else out / "train"  # raw/train/ and raw/<holdout split>/
        opts.update(unit=part, listing=listing)
        return sources.ingest_folder(ds["root"], dest, shard_size=ds["shard_size"], class_names=class_names, **opts)
    if source == "in21k_tars":
        tars = part["tars"] if part else None
        return sources.ingest_imagenet21k_tars(ds["root"], out / "train", shard_size=ds["shard_size"], tars=tars)
    if source == "folder_seg":  # raw/<split>/ per id list (train, val), image + seg.png per sample
        keys = ("splits", "num_classes", "ignore_index", "image_dir", "mask_dir", "list_dir", "license")
        return sources.ingest_folder_seg(
            ds["root"], out, shard_size=ds["shard_size"], **{k: ds[k] for k in keys if k in ds}
        )
    raise ValueError(f"data.datasets: unknown source {source!r} (synth | urls | folder | in21k_tars | folder_seg)")


def run_shard(args: argparse.Namespace) -> int:
    from franca.data.manifest import canonicalise

    ds, entry = start(args), _unit(args)
    raw, out = Path(args.raw), Path(args.out)
    splits = {d.name: [d] for d in sorted(raw.iterdir()) if d.is_dir() and any(d.glob("*.tar"))}
    if not splits:
        raise FileNotFoundError(f"{raw}: no raw shards in any split directory")
    unit = entry["unit"] if entry else None
    tags = {"dataset": args.dataset, **({"unit": unit} if unit else {})}
    with job("shard", args, ds, out, inputs=[raw], tags=tags) as current:
        summary = canonicalise(splits, out, workers=args.workers, default_license=ds.get("license"), unit=unit)
        current.outputs = [out / "shards", out / "manifest.parquet"]
        current.extra["shard_summary"] = summary
    return 0


_OPTIONAL_DEDUP_KEYS = ("verify_threshold", "eval_verify_threshold", "layout_threshold", "normalized_layout_threshold")
_OPTIONAL_DEDUP_KEYS += ("pixel_threshold",)


def _fan_out_inputs(dd: dict, fan_out_dir: str | None, train_manifest: str) -> dict:
    """deduplicate's keywords for the fan-out jobs' results (``fan_out`` config), or none (all in this job)."""
    if not dd.get("fan_out"):
        return {"n_bands": None}
    if fan_out_dir is None:
        raise SystemExit(f"{dd['train']}: the dedup config has fan_out; pass --fan-out DIR (workflow/rules/dedup.smk)")
    plan, root = dedup_jobs.plan_of(dd), Path(fan_out_dir)
    return {
        "n_bands": plan.bands,
        "block_bits": plan.block_bits,
        "eval_index": root / "eval_index.parquet",
        "units": dedup_jobs.unit_dirs(root / "units", train_manifest),
        "candidates": [root / "blocks" / f"b{b}-p{p}.parquet" for b, p in plan.jobs()],
    }


def run_dedup(args: argparse.Namespace) -> int:
    from franca.data.datacard import write_datacard
    from franca.data.dedup import deduplicate

    dd = start(args)
    paths = parse_pairs(args.manifest, "--manifest")
    out = Path(args.out)
    train_ds, train_split = dd["train"].split(":")
    eval_refs = [ref.split(":") for ref in dd["eval"]]
    absent = sorted({name for name, _ in [(train_ds, train_split), *eval_refs]} - set(paths))
    if absent:
        raise SystemExit(f"{args.config}: dedup names dataset {absent[0]!r} but no --manifest {absent[0]}=PATH")
    manifests = sorted(set(paths.values()))
    fan_out = _fan_out_inputs(dd, args.fan_out, paths[train_ds])
    with job("dedup", args, dd, out, inputs=manifests, tags={"train": dd["train"]}) as current:
        report = deduplicate(
            paths[train_ds],
            sorted({paths[name] for name, _ in eval_refs}),
            out,
            hamming_threshold=dd["hamming_threshold"],
            eval_hamming_threshold=dd["eval_hamming_threshold"],
            descriptor=dd.get("descriptor", "phash"),
            **{k: dd[k] for k in _OPTIONAL_DEDUP_KEYS if k in dd},
            train_split=train_split,
            eval_splits=sorted({split for _, split in eval_refs}),
            **fan_out,
        )
        write_datacard(manifests, out / "report.json", out / "datacard.md")
        current.extra["dedup"] = {k: v for k, v in report.items() if not isinstance(v, list | dict)}  # counts
        current.extra["dedup"]["removed_by_reason"] = report["removed"]
    return 0


def run_gather(args: argparse.Namespace) -> int:
    """The dataset handle, O(#shards): ``<out>/shards/<name>.tar`` and ``<out>/manifest/<unit>.parquet`` are relative
    symlinks into each unit's directory (never a copy, never a rewritten manifest). A unit's ``shard`` values
    (``shards/<name>.tar``, relative to its directory) stay valid relative to ``<out>``."""
    ds, out = start(args), Path(args.out)
    units = [Path(u) for u in args.unit_dirs]
    links = {"shards": {}, "manifest": {}}
    for unit in units:
        manifest = unit / "manifest.parquet"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest}: unit {unit.name} has no manifest (run its shard job)")
        links["manifest"][f"{unit.name}.parquet"] = manifest
        for tar in sorted((unit / "shards").glob("*.tar")):
            if tar.name in links["shards"]:
                raise ValueError(f"shard name {tar.name} occurs in {links['shards'][tar.name].parent} and {unit}")
            links["shards"][tar.name] = tar
    inputs = [p for group in links.values() for p in group.values()]
    with job("gather", args, ds, out, inputs=inputs, tags={"dataset": args.dataset}) as current:
        for sub, group in links.items():
            shutil.rmtree(out / sub, ignore_errors=True)
            (out / sub).mkdir(parents=True)
            for name, target in group.items():
                os.symlink(os.path.relpath(target.absolute(), (out / sub).absolute()), out / sub / name)
        current.outputs = [out / "shards", out / "manifest"]
        current.extra["gather"] = {"units": len(units), "shards": len(links["shards"])}
    return 0
