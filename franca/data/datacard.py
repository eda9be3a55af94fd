"""Data card (markdown) of a dataset, generated from its manifests and dedup report (issue 4 item 5).

Sections: sources (URL domains or local roots), licenses, counts per split, failures by reason, duplicates removed
by reason, image size statistics (width, height, megapixels, bytes, formats) and labels.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pandas as pd

from franca.data.manifest import read_manifest
from franca.data.shards import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = ["write_datacard", "source_origin"]


def source_origin(source: Any) -> str:
    """Where a sample came from, coarsely: the URL's host, ``synthetic``, or the directory two levels up."""
    if not isinstance(source, str) or not source:
        return "unknown"
    if "://" in source:
        return urlsplit(source).netloc or urlsplit(source).scheme
    if source == "synthetic":
        return source
    path = source.split("::", 1)[0]  # <tar>::<member> for ImageNet-21K
    return os.path.dirname(os.path.dirname(path)) or path


def _table(counts: Mapping[Any, Any], header: tuple[str, str]) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    return lines if counts else ["(none)"]


def _size_stats(ok: pd.DataFrame) -> list[str]:
    if ok.empty:
        return ["(no samples)"]
    stats = pd.DataFrame(
        {
            "width": ok["width"].astype(float),
            "height": ok["height"].astype(float),
            "megapixels": ok["width"].astype(float) * ok["height"].astype(float) / 1e6,
            "kilobytes": ok["bytes"].astype(float) / 1e3,
        }
    ).describe(percentiles=[0.05, 0.5, 0.95])
    lines = ["| statistic | " + " | ".join(stats.columns) + " |", "|---|" + "---:|" * len(stats.columns)]
    for name in ["min", "5%", "50%", "mean", "95%", "max"]:
        lines.append(f"| {name} | " + " | ".join(f"{v:.4g}" for v in stats.loc[name]) + " |")
    formats = ok["format"].fillna("unknown").value_counts().to_dict() if "format" in ok else {}
    lines += ["", "Formats: " + ", ".join(f"{k} {v}" for k, v in formats.items())]
    return lines


def _dedup_section(dedup_report: str | Path | Mapping[str, Any] | None) -> list[str]:
    if dedup_report is None:
        return ["Deduplication has not been run."]
    report = json.loads(Path(dedup_report).read_text()) if not isinstance(dedup_report, Mapping) else dedup_report
    lines = [f"Descriptor: `{report.get('descriptor')}`; thresholds: `{json.dumps(report.get('thresholds'))}`.", ""]
    lines.append(f"Training samples considered: {report.get('n_train')}; kept: {report.get('kept')}; ")
    lines[-1] += f"evaluation images compared: {report.get('n_eval')}."
    return lines + [""] + _table(report.get("removed", {}), ("removed because", "samples"))


def write_datacard(
    manifest_paths: Sequence[str | Path],
    dedup_report: str | Path | Mapping[str, Any] | None,
    out_md: str | Path,
    title: str | None = None,
) -> str:
    """Write the markdown data card of the datasets in ``manifest_paths``; returns its text."""
    frames = []
    for path in manifest_paths:
        frame = read_manifest(path)
        frames.append(frame.assign(dataset=Path(path).parent.name))
    if not frames:
        raise ValueError("write_datacard needs at least one manifest")
    data = pd.concat(frames, ignore_index=True)
    ok, failed = data[data["status"] == "ok"], data[data["status"] != "ok"]
    name = title or ", ".join(sorted(data["dataset"].unique()))
    lines = [f"# Data card: {name}", "", f"Generated from {len(frames)} manifest(s): "]
    lines[-1] += ", ".join(f"`{p}`" for p in manifest_paths)
    lines += ["", "## Counts", ""]
    per_split = ok.groupby(["dataset", "split"], dropna=False).size()
    lines += _table({f"{d} / {s}": n for (d, s), n in per_split.items()}, ("dataset / split", "samples"))
    lines += ["", f"Samples: {len(ok)}; failures: {len(failed)}; total bytes: {int(ok['bytes'].sum())}."]
    lines += ["", "## Sources", ""]
    origins = ok["source"].map(source_origin).value_counts().head(20).to_dict()
    lines += _table(origins, ("origin (host or root)", "samples"))
    lines += ["", "## Licenses", ""]
    lines += _table(ok["license"].fillna("unknown").value_counts().to_dict(), ("license", "samples"))
    lines += ["", "## Failures by reason", ""]
    lines += _table(failed["reason"].fillna("unknown").value_counts().to_dict(), ("reason", "rows"))
    lines += ["", "## Duplicates removed", ""] + _dedup_section(dedup_report)
    lines += ["", "## Image sizes", ""] + _size_stats(ok)
    labels = ok["label"].dropna()
    lines += ["", "## Labels", ""]
    if labels.empty:
        lines.append("Unlabelled.")
    else:
        per_class = labels.value_counts()
        lines.append(f"{per_class.size} classes; samples per class min {per_class.min()}, max {per_class.max()}.")
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(out_md, text.encode())
    logger.info("data card written to %s", out_md)
    return text
