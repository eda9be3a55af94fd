"""Work units of a dataset (issue 17): the bounded pieces that fetch and shard run as one Snakemake job each.

``list_units(ds)`` cuts a dataset into units at DAG build time, cheaply and stably (the same input always gives the
same list):

* ``source: urls``: the URL table (one parquet/CSV/TSV file or a folder of them, in file-name order) is cut into row
  ranges of at most ``unit_rows`` rows that never cross a part. Parquet row counts come from the file footers, never
  from the URL columns; counts are cached per (path, size, mtime_ns). Entry:
  ``{"unit": "u000012", "kind": "url_rows", "part": <abs path>, "start": r0, "stop": r1, "row0": g}`` where
  ``[start, stop)`` are rows of that part and ``g`` is the global row index of ``start`` (the sample keys, as
  ``read_url_table`` numbers the concatenated table).
* ``source: synth``: one ``synthetic`` unit (the tiny preset's generated set).
* ``source: folder``: the sorted listing of the class folders (``franca.data.sources.list_folder``, an
  ``os.scandir`` walk of names) cut into ranges of at most ``unit_rows`` files. Entry: ``{"unit", "kind": "folder",
  "start": i0, "stop": i1, "items": n, "listing": <sha256 of the listing>}``; the unit job lists the tree again,
  checks the digest (a changed tree is an error, not a silently shifted range) and takes the labels (the sorted
  class folders), the held-out split and the keys from the whole listing, so they do not depend on the cut.
* ``source: in21k_tars``: one unit per synset tar (``n*.tar``, sorted by name; a directory listing, no tar read):
  ``{"unit", "kind": "tar", "tars": [name, ...]}``. ``unit_tars`` (default 1) groups that many consecutive tars into
  one unit: ImageNet-21K winter21 has 19,167 tars of ~680 images (a few seconds of work each, less than a job's
  start), so a cluster run may want, e.g., 20 per unit; the default keeps the issue's "a tar is a unit".
* ``folder_seg`` (a VOC-style tree, ~17k images cut by id lists per split) and a tree not present at DAG build time
  (a plan made before the data is mounted): one unit covering the whole tree (kind ``folder`` / ``tar``, no range).

``read_unit_rows(entry, url_col)`` reads the rows of one ``url_rows`` unit (only the row groups that hold them).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from franca.data.failures import is_transient

__all__ = ["DEFAULT_UNIT_ROWS", "list_units", "unit_name", "url_parts", "read_unit_rows", "rows_digest", "unit_of"]

DEFAULT_UNIT_ROWS = 100_000
TABLE_SUFFIXES = (".parquet", ".csv", ".tsv")
_KINDS = {"synth": "synthetic", "folder": "folder", "folder_seg": "folder", "in21k_tars": "tar"}


def unit_name(index: int) -> str:
    return f"u{index:06d}"


def url_parts(url_list: str | Path) -> list[Path]:
    """The parts of a URL table: the file itself, or a folder's .parquet/.csv/.tsv files in name order."""
    path = Path(url_list).absolute()
    if path.is_dir():
        parts = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES)
        if not parts:
            raise ValueError(f"URL table folder {path} holds no .parquet, .csv or .tsv file")
        return parts
    if not path.is_file():
        raise FileNotFoundError(f"URL table not found: {path} (data.datasets.*.url_list)")
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise ValueError(f"URL table {path}: expected .parquet, .csv or .tsv (or a folder of them)")
    return [path]


@functools.cache
def _count_rows(path: str, size: int, mtime_ns: int) -> int:
    """Rows of one part: the parquet footer; a CSV/TSV is counted by its lines (header excluded)."""
    if path.lower().endswith(".parquet"):
        return pq.ParquetFile(path).metadata.num_rows
    sep = "\t" if path.lower().endswith(".tsv") else ","
    return len(pd.read_csv(path, sep=sep, usecols=[0], keep_default_na=False))


def part_rows(part: Path) -> int:
    stat = part.stat()
    return _count_rows(str(part), stat.st_size, stat.st_mtime_ns)


def _tree_signature(root: Path) -> tuple:
    """mtime_ns of the root and of each of its sub-directories: a file added, removed or renamed directly in a class
    folder, or a class folder added or removed, changes it (a change deeper down, in a nested folder, does not)."""
    with os.scandir(root) as entries:
        subdirs = sorted((e.name, e.stat().st_mtime_ns) for e in entries if e.is_dir())
    return root.stat().st_mtime_ns, tuple(subdirs)


@functools.cache
def _folder_listing(root: str, class_names: tuple[str, ...] | None, signature: tuple) -> tuple[int, str]:
    """(files, listing digest) of a class-folder tree, cached per (root, class names, ``_tree_signature``)."""
    from franca.data.sources import list_folder, listing_digest

    items, _ = list_folder(root, class_names)
    return len(items), listing_digest(items, root)


def _folder_units(ds: dict[str, Any], unit_rows: int) -> list[dict[str, Any]]:
    from franca.data.sources import folder_class_names

    root = Path(ds["root"]).absolute()
    names = tuple(folder_class_names(ds["classes_from_root"])) if ds.get("classes_from_root") else None
    n, listing = _folder_listing(str(root), names, _tree_signature(root))
    return [
        {
            "unit": unit_name(i),
            "kind": "folder",
            "start": s,
            "stop": min(s + unit_rows, n),
            "items": n,
            "listing": listing,
        }
        for i, s in enumerate(range(0, n, unit_rows))
    ]


def _tar_units(ds: dict[str, Any]) -> list[dict[str, Any]]:
    from franca.data.sources import in21k_tar_names

    per_unit = int(ds.get("unit_tars", 1))
    if per_unit < 1:
        raise ValueError(f"data.datasets.*.unit_tars must be >= 1, got {per_unit}")
    names = in21k_tar_names(ds["root"])
    groups = [names[i : i + per_unit] for i in range(0, len(names), per_unit)]
    return [{"unit": unit_name(i), "kind": "tar", "tars": group} for i, group in enumerate(groups)]


def list_units(ds: dict[str, Any]) -> list[dict[str, Any]]:
    """The dataset's units in order (see the module docstring); ``ds`` is its ``data.datasets`` entry."""
    source = ds["source"]
    if source not in _KINDS and source != "urls":
        raise ValueError(f"data.datasets: unknown source {source!r}")
    unit_rows = int(ds.get("unit_rows", DEFAULT_UNIT_ROWS))
    if unit_rows < 1:
        raise ValueError(f"data.datasets.*.unit_rows must be >= 1, got {unit_rows}")
    if source in ("folder", "in21k_tars") and Path(ds["root"]).is_dir():
        return _folder_units(ds, unit_rows) if source == "folder" else _tar_units(ds)
    if source != "urls":
        return [{"unit": unit_name(0), "kind": _KINDS[source]}]
    units, row0 = [], 0
    for part in url_parts(ds["url_list"]):
        n = part_rows(part)
        for start in range(0, n, unit_rows):
            stop = min(start + unit_rows, n)
            units.append({"unit": unit_name(len(units)), "kind": "url_rows", "part": str(part), "start": start})
            units[-1].update(stop=stop, row0=row0 + start)
        row0 += n
    if not units:
        raise ValueError(f"URL table {ds['url_list']} has no rows")
    return units


def unit_of(units: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The entry named ``name`` (its index in the list)."""
    index = int(name[1:]) if name[:1] == "u" and name[1:].isdigit() else -1
    if not 0 <= index < len(units) or units[index]["unit"] != name:
        raise KeyError(f"unit {name!r} is not in the unit list ({len(units)} units)")
    return units[index]


def read_unit_rows(entry: dict[str, Any], url_col: str = "url") -> pd.DataFrame:
    """Rows ``[start, stop)`` of the unit's part (index reset); reads only the parquet row groups that hold them."""
    part, start, stop = Path(entry["part"]), int(entry["start"]), int(entry["stop"])
    if part.suffix.lower() == ".parquet":
        meta = pq.ParquetFile(part)
        groups, first, offset = [], None, 0
        for g in range(meta.num_row_groups):
            n = meta.metadata.row_group(g).num_rows
            if offset < stop and offset + n > start:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        table = meta.read_row_groups(groups).to_pandas() if groups else pd.DataFrame()
        rows = table.iloc[start - (first or 0) : stop - (first or 0)]
    else:
        sep = "\t" if part.suffix.lower() == ".tsv" else ","
        rows = pd.read_csv(part, sep=sep, keep_default_na=False, skiprows=range(1, start + 1), nrows=stop - start)
    if url_col not in rows.columns:
        raise ValueError(f"URL table {part} has no column {url_col!r} (columns: {list(rows.columns)})")
    if len(rows) != stop - start:
        raise ValueError(f"{part}: unit {entry['unit']} wants rows [{start}, {stop}) but the part has changed")
    return rows.reset_index(drop=True)


def rows_digest(rows: pd.DataFrame) -> str:
    """sha256 of a table's columns and cell values (row order included); stable across runs."""
    digest = hashlib.sha256("\0".join(map(str, rows.columns)).encode())
    digest.update(pd.util.hash_pandas_object(rows, index=False).to_numpy().tobytes())
    return digest.hexdigest()


# --- one unit's fetch: rolling state outside the declared output, published only when complete ---------------------

UNIT_KEYS = ("unit_rows", "min_success_rate", "transient_reruns")  # dataset keys of the units, not fetch options
# keys that decide neither which rows a unit holds nor the bytes fetched for them: a change keeps the rolling state
_NOT_IDENTITY = ("min_success_rate", "transient_reruns", "concurrency")


def fetch_options(ds: dict[str, Any]) -> dict[str, Any]:
    """The dataset keys that are ``fetch_urls`` options (an unknown key is an error naming the options)."""
    import inspect

    from franca.data.fetch import fetch_urls

    options = set(inspect.signature(fetch_urls).parameters) - {"url_table_path", "out_dir", "on_shard_done"}
    options -= {"key_offset"}
    unknown = sorted(set(ds) - options - {"source", "url_list", "license", *UNIT_KEYS})
    if unknown:
        raise ValueError(f"data.datasets (source urls): unknown keys {unknown}; fetch options: {sorted(options)}")
    return {k: v for k, v in ds.items() if k in options}


def unit_identity(ds: dict[str, Any], entry: dict[str, Any], rows: pd.DataFrame) -> str:
    """sha256 of (dataset config, unit entry, the unit's own rows, code digest): the key of its rolling state. The
    fetch options are part of it (a new timeout or retry count starts over); the floor, the rerun count and the
    concurrency are not (they change no fetched byte)."""
    import json

    from franca.identity import code_digest

    config = {k: v for k, v in ds.items() if k not in _NOT_IDENTITY}
    record = {"config": config, "unit": entry, "rows": rows_digest(rows), "code": code_digest()}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def fetch_unit(ds: dict[str, Any], entry: dict[str, Any], rows: pd.DataFrame, state: Path) -> dict[str, Any]:
    """Fetch one ``url_rows`` unit into ``state/train`` (raw shards, resumable); returns its fetch report.

    Raw shards finished by an earlier run are never fetched again; their transient failures (``is_transient``) are
    fetched again, once per run, until ``transient_reruns`` runs have retried them (default 2). Permanent failures
    are final. Then the report is checked against ``min_success_rate`` (default 0): under it, ValueError names the
    unit and its top failure reasons, and nothing is published.
    """
    import json

    from franca.data.fetch import fetch_urls, refetch_transient
    from franca.data.manifest import raw_shard_complete, raw_status_path
    from franca.data.shards import atomic_write_bytes

    opts, raw = fetch_options(ds), state / "train"
    shard_size, row0 = int(ds.get("shard_size", 10_000)), int(entry["row0"])
    reruns_path, limit = state / "transient_reruns.json", int(ds.get("transient_reruns", 2))
    reruns = json.loads(reruns_path.read_text()) if reruns_path.is_file() else {}
    retry = []  # finished shards holding transient failures, with reruns left
    for s in range(-(-len(rows) // shard_size)):
        if raw_shard_complete(raw, s) and reruns.get(str(s), 0) < limit:
            status = pd.read_parquet(raw_status_path(raw, s), columns=["status", "reason"])
            if ((status["status"] != "success") & status["reason"].map(is_transient)).any():
                retry.append(s)
    if retry:  # each shard rewritten atomically as if those rows had succeeded (or failed again) the first time
        refetch_transient(rows, raw, shards=retry, key_offset=row0, **opts)
        reruns.update({str(s): reruns.get(str(s), 0) + 1 for s in retry})
        atomic_write_bytes(reruns_path, json.dumps(reruns, sort_keys=True).encode())
    report = fetch_urls(rows, raw, key_offset=row0, **opts)
    report["unit"], report["transient"] = entry["unit"], _transient_count(report)
    report["transient_reruns"] = {"done": reruns, "limit": limit}
    atomic_write_bytes(raw / "fetch_report.json", json.dumps(report, indent=2, sort_keys=True).encode())
    check_floor(report, float(ds.get("min_success_rate", 0.0)), entry["unit"], limit - min(reruns.values(), default=0))
    return report


def _transient_count(report: dict[str, Any]) -> int:
    return sum(n for reason, n in report["reasons"].items() if is_transient(reason))


def check_floor(report: dict[str, Any], floor: float, unit: str, reruns_left: int) -> None:
    """ValueError naming the unit and its top failure reasons when its success rate is under ``floor``."""
    rate = report["success"] / max(report["rows"], 1)
    if rate >= floor:
        return
    top = sorted(report["reasons"].items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    reasons = ", ".join(f"{r} ({n}{', transient' if is_transient(r) else ''})" for r, n in top)
    retry = f"; a rerun retries its {report['transient']} transient failures" if report["transient"] else ""
    retry += f" ({max(reruns_left, 0)} reruns left)" if report["transient"] else ""
    raise ValueError(
        f"unit {unit}: success rate {rate:.1%} ({report['success']} of {report['rows']} rows) is under the floor "
        f"min_success_rate={floor:g}; top failure reasons: {reasons}{retry}"
    )


def publish(state_raw: Path, out_raw: Path) -> None:
    """Hard-link (copy across file systems) every file of a complete unit's raw dir into the declared output."""
    import os
    import shutil

    out_raw.mkdir(parents=True, exist_ok=True)
    for src in sorted(p for p in state_raw.iterdir() if p.is_file() and not p.name.startswith(".")):
        dst = out_raw / src.name
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
