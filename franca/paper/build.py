"""``build_paper``: aggregate the result files of a workflow run into ``results/paper/`` (issue 2 item 8, 5, 11, 15).

Writes (atomically: temporary file + rename):

* ``{main,baselines,ablation,rasa,reference}.{csv,md,tex}``;
* ``figures/*.png``: ``training_curves_{exp}``, ``pca_maps``, ``rasa_rounds``, ``masking_frequency``,
  ``dedup_summary`` (and ``dedup_pairs`` copied from the dedup stage when present);
* ``index.html`` (self-contained) and ``numbers.json`` (every table cell -> its source files, for ``franca audit``).

The files read are exactly those of ``PaperInputs`` (the ``paper`` rule's inputs). Results the rule does not hand
over were not configured: their rows and columns are left out, with a footnote. A listed file that is absent is a
result that was expected and failed: its cells read "missing" (a note), or its figure is skipped with a note.
Malformed inputs raise ``PaperInputError`` naming the file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import yaml

from franca.paper import figures as figs
from franca.paper import header as hdr
from franca.paper.collect import (
    PaperInputError,
    PaperInputs,
    SourceIndex,
    atomic_write_bytes,
    atomic_write_text,
    collect_evals,
    collect_rasa,
    collect_training,
    load_pca_entries,
    masking_setup,
    parse_experiments,
    read_json,
)
from franca.paper.html import FigureEntry, Header, render_index
from franca.paper.tables import (
    EVAL_TABLES,
    EvalLookup,
    Table,
    ablation_table,
    baselines_table,
    highres_table,
    main_table,
    rasa_table,
    reference_table,
)

log = logging.getLogger(__name__)

NUMBERS_FORMAT = "franca-paper-numbers-v1"
_DEDUP_REASON_KEYS = ("removed_by_reason", "by_reason", "reasons", "removed_per_reason")


# ----------------------------------------------------------------------------------------------- table files
def to_frame(table: Table) -> pd.DataFrame:
    """Numeric form (the CSV): labels, then ``{key}`` (mean), ``{key}_std``, ``{key}_n`` per column, and notes."""
    records = []
    for labels, cells, note in table.rows:
        rec: dict[str, object] = dict(zip(table.index, labels, strict=True))
        for (key, _), cell in zip(table.columns, cells, strict=True):
            rec[key] = cell.mean
            if cell.kind != "ref":  # a Δ's std and n are those of its per-seed differences
                rec[f"{key}_std"], rec[f"{key}_n"] = cell.std, cell.n
        rec["note"] = note
        records.append(rec)
    return pd.DataFrame.from_records(records, columns=None if records else [*table.index, "note"])


def to_markdown(table: Table) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    header = [*table.index, *(label for _, label in table.columns), "note"]
    lines = [
        f"**{table.title}.** {table.caption}",
        "",
        "| " + " | ".join(map(esc, header)) + " |",
        "|" + "---|" * len(header),
    ]
    for labels, cells, note in table.rows:
        lines.append("| " + " | ".join(esc(x) for x in [*labels, *(c.text for c in cells), note]) + " |")
    lines += ["", *(f"_{n}_" for n in table.footnotes)] if table.footnotes else []
    return "\n".join(lines) + "\n"


_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\^{}",
}


def tex_escape(text: str) -> str:
    out = "".join(_TEX.get(ch, ch) for ch in text)
    return out.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace(r"R\^{}2", r"R$^2$")


def to_latex(table: Table) -> str:
    header = [*table.index, *(label for _, label in table.columns)]
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        r"\begin{tabular}{" + "l" * len(table.index) + "r" * len(table.columns) + "}",
        r"\toprule",
        " & ".join(map(tex_escape, header)) + r" \\",
        r"\midrule",
    ]
    notes = []
    for labels, cells, note in table.rows:
        lines.append(" & ".join(tex_escape(x) for x in [*labels, *(c.text for c in cells)]) + r" \\")
        if note:
            notes.append(f"{' / '.join(labels)}: {note}")
    lines += [
        r"\bottomrule",
        r"\end{tabular}",
        r"\caption{" + tex_escape(f"{table.title}. {table.caption}") + "}",
        r"\label{tab:" + table.name + "}",
        r"\end{table}",
    ]
    lines += ["% note: " + tex_escape(n) for n in [*notes, *table.footnotes]]
    return "\n".join(lines) + "\n"


def load_reference(path: Path | None) -> dict | None:
    """The published numbers (``config/reference/paper_readme.yaml``), or ``None`` when no file is given."""
    if path is None:
        return None
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise PaperInputError(f"{path}: cannot read the reference YAML: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("presets", {}), dict):
        raise PaperInputError(f"{path}: reference YAML must be a mapping with a 'presets' mapping")
    return data


def dedup_counts(report: object, path: Path) -> tuple[dict[str, int], int | None]:
    """Removals per reason from the dedup report (a reason -> count/list mapping, or a list of removed records)."""
    if not isinstance(report, dict):
        raise PaperInputError(f"{path}: malformed dedup report: expected an object")
    kept = report.get("kept", report.get("n_kept"))
    kept = kept if isinstance(kept, int) else (len(kept) if isinstance(kept, list) else None)
    for key in (*_DEDUP_REASON_KEYS, "removed"):
        if isinstance(report.get(key), dict):
            counts = {}
            for reason, value in report[key].items():
                if not isinstance(value, int | list) or isinstance(value, bool):
                    raise PaperInputError(f"{path}: malformed dedup report: {key}.{reason} = {value!r}")
                counts[str(reason)] = len(value) if isinstance(value, list) else value
            return counts, kept
    removed = report.get("removed")
    if isinstance(removed, list):
        counts: dict[str, int] = {}
        for rec in removed:
            reason = str(rec.get("reason", "unknown")) if isinstance(rec, dict) else "unknown"
            counts[reason] = counts.get(reason, 0) + 1
        return counts, kept
    raise PaperInputError(
        f"{path}: malformed dedup report: no per-reason removals ({', '.join(_DEDUP_REASON_KEYS)} or 'removed')"
    )


def _dedup_figures(reports: list[Path], sources: SourceIndex, notes: list[str]) -> list[tuple[FigureEntry, list]]:
    """Removals per reason (and the dedup stage's example pairs) per report; ``_{dataset}`` in the file names when
    there are several."""
    if not reports:
        notes.append("dedup summary: no dedup report was given")
    out = []
    for report in reports:
        if not report.is_file():
            notes.append(f"dedup summary: expected {sources.rel(report)} is missing")
            continue
        data = read_json(report, "dedup report")
        by_reason, kept = dedup_counts(data, report)
        key, dataset = sources.add(report), hdr.dedup_dataset(data, report)
        suffix, on = (f"_{dataset}", f" ({dataset})") if len(reports) > 1 else ("", "")
        png = figs.dedup_summary(by_reason, kept)
        if png is not None:
            caption = f"{sum(by_reason.values())} images removed, by reason."
            out.append((FigureEntry(f"dedup_summary{suffix}.png", f"Dedup summary{on}", caption, png), [key]))
        pairs = report.parent / "pairs.png"  # written by the dedup stage beside its report
        if pairs.is_file():
            caption = "Example removed pairs from the dedup stage."
            entry = FigureEntry(f"dedup_pairs{suffix}.png", f"Dedup pairs{on}", caption, pairs.read_bytes())
            out.append((entry, [sources.add(pairs)]))
    return out


def _numbers(tables: list[Table], figures: list[tuple[FigureEntry, list[str]]], sources: SourceIndex) -> dict:
    out = {
        "format": NUMBERS_FORMAT,
        "paths": "relative to the project root (the working directory of the build)",
        "tables": {},
        "figures": {},
        "sources": sources.records,
    }
    for table in tables:
        cells = []
        for labels, row_cells, note in table.rows:
            for (key, label), cell in zip(table.columns, row_cells, strict=True):
                cells.append(
                    {
                        "anchor": cell.anchor,
                        "row": dict(zip(table.index, labels, strict=True)),
                        "column": key,
                        "label": label,
                        "text": cell.text,
                        "mean": cell.mean,
                        "std": cell.std,
                        "n": cell.n,
                        "values": cell.values,
                        "sources": cell.sources,
                        "note": note,
                    }
                )
        out["tables"][table.name] = {"files": [f"{table.name}.{ext}" for ext in ("csv", "md", "tex")], "cells": cells}
    out["figures"] = {f"figures/{fig.name}": srcs for fig, srcs in figures}
    return out


def _make_figures(
    inputs: PaperInputs,
    specs: list,
    sources: SourceIndex,
    rasa_frame: pd.DataFrame,
    notes: list[str],
    mask_draws: int,
    pca_images: int,
) -> tuple[list[tuple[FigureEntry, list[str]]], dict[str, float]]:
    """Every figure as (entry, source files); missing inputs skip a figure with a note."""
    figures: list[tuple[FigureEntry, list[str]]] = []

    def add(name: str, title: str, caption: str, png: bytes | None, srcs: list[str]) -> None:
        if png is not None:
            figures.append((FigureEntry(name, title, caption, png), srcs))

    training = collect_training(inputs.metrics, sources)
    for spec in specs:
        png = figs.training_curves(training, spec.name)
        if png is None:
            notes.append(f"training curves: no metrics.jsonl for {spec.name}")
        srcs = sorted(set(training.loc[training["exp"] == spec.name, "source"]))
        add(
            f"training_curves_{spec.name}.png",
            f"Training curves: {spec.name}",
            "Loss terms over iterations, one line per seed; dotted lines mark phase starts.",
            png,
            srcs,
        )
    entries, used = load_pca_entries(inputs.pca, sources, notes)
    if not entries:
        notes.append("PCA maps: no pca.pt was given" if not inputs.pca else "PCA maps: every pca.pt is missing")
    add(
        "pca_maps.png",
        "PCA maps of patch features",
        "First 3 PCA components of the patch tokens (fitted per model over the shown images) as RGB.",
        figs.pca_maps(entries, pca_images),
        used,
    )
    png = figs.rasa_rounds(rasa_frame)
    if png is None and inputs.rasa:
        notes.append("RASA figure: every RASA report is missing")
    add(
        "rasa_rounds.png",
        "Position decodability per RASA round",
        "R^2 of a linear position probe from x, x_pos and "
        "x_no_pos (mean, band = min..max over seeds); dashed: cos(x_no_pos, x).",
        png,
        sorted(set(rasa_frame["source"])),
    )
    grid, ratio = masking_setup(sources, inputs.metrics)
    png, cvs = figs.masking_frequency_maps(grid, ratio, mask_draws)
    cv_text = "; ".join(f"{k}: CV {v:.3f}" for k, v in cvs.items())
    add(
        "masking_frequency.png",
        "CyclicMask masking frequency",
        f"Per-cell masking frequency over {mask_draws} "
        f"masks, mask ratios {ratio[0]}-{ratio[1]} (computed from franca.data.masking). {cv_text}.",
        png,
        [],
    )
    figures += _dedup_figures(inputs.dedup, sources, notes)
    return figures, cvs


def _header(preset: str, specs: list, inputs: PaperInputs, sources: SourceIndex, code: Mapping, built: str) -> Header:
    """Preset, scope statement, experiments, commit, date and the datasets (manifests + dedup report)."""
    # a manifest is a file or gather's partitioned directory (one parquet per work unit): every part is a source
    parts = {p: sorted(p.glob("*.parquet")) if p.is_dir() else [p] for p in inputs.manifests if p.exists()}
    keys = {p: [sources.add(f) for f in files] for p, files in parts.items() if files}
    datasets = hdr.datasets(list(keys), hdr.kept_after_dedup(inputs.dedup), keys)
    commits = sorted({str(r["git_commit"]) for r in sources.records.values() if r.get("git_commit")})
    dirty = " (uncommitted changes)" if code.get("dirty") else ""
    meta = [
        ("preset", preset),
        ("experiments", "; ".join(f"{s.name} (seeds {', '.join(map(str, s.seeds))})" for s in specs)),
        ("commit", f"{code.get('git_commit') or 'unknown'}{dirty} (this page)"),
        ("results from", _commits_text(commits)),
        ("built", built),
        ("source files", str(len(sources.records))),
    ]
    return Header(f"Franca reproduction: {preset}", hdr.scope_of(preset), meta, datasets)


def cap_footnote(caps_by_source: Mapping[str, Mapping]) -> str | None:
    """One sentence naming every evaluation set that a cap sampled (``eval.max_*_images``), or None: a number on a
    sample must say so next to its table."""
    applied: dict[str, set[tuple[int, int]]] = {}
    seeds = set()
    for caps in caps_by_source.values():
        for name, cap in (caps.get("applied") or {}).items():
            applied.setdefault(name, set()).add((int(cap["used"]), int(cap["available"])))
            seeds.add(caps.get("seed"))
    if not applied:
        return None
    sets = "; ".join(
        f"{name} {used:,} of {available:,} images"
        for name in sorted(applied)
        for used, available in sorted(applied[name])
    )
    seed = ", ".join(str(s) for s in sorted(seeds, key=str))
    return f"Evaluated on capped sets (eval.max_*_images; a class-stratified sample, seed {seed}): {sets}."


def _commits_text(commits: list[str]) -> str:
    if not commits:
        return "no recorded commit"
    more = f" and {len(commits) - 3} more (see the source files)" if len(commits) > 3 else ""
    return f"{len(commits)} commit(s): " + ", ".join(commits[:3]) + more


def build_paper(
    inputs: PaperInputs,
    out_dir: Path,
    *,
    experiments: Mapping,
    preset: str,
    reference_yaml: Path | None = None,
    root: Path | None = None,
    code: Mapping | None = None,
    mask_draws: int = 4000,
    pca_images: int = 4,
    dense_dataset: str | None = None,
) -> dict:
    """Aggregate the given result files into ``out_dir``; returns a summary (written files, inputs, notes).

    ``inputs``: the files of the ``paper`` rule (nothing else is read, except the ``provenance.json`` records that
    describe them and the dedup stage's ``pairs.png`` beside its report); ``experiments``: ``{name: {seeds,
    highres, rasa}}`` as in ``config.yaml``; ``root``: the project root that source paths are relative to (default:
    the working directory); ``code``: ``{git_commit, dirty}`` of this build (default: franca.provenance);
    ``dense_dataset``: ``data.dense.dataset`` of the run (the reference table compares dense metrics on the dataset
    they were published on only).
    """
    out_dir = Path(out_dir)
    specs = parse_experiments(experiments)
    sources = SourceIndex(Path(root) if root is not None else Path.cwd())
    notes: list[str] = []
    if code is None:
        from franca.provenance import code_version

        code = code_version()

    evals = collect_evals(inputs.evals, sources)
    lookup = EvalLookup(evals)
    reference = load_reference(reference_yaml)
    ref_key = sources.add(Path(reference_yaml)) if reference_yaml is not None else None
    rasa_frame = collect_rasa(inputs.rasa, sources)
    tables = [
        main_table(specs, lookup),
        baselines_table(specs, lookup),
        ablation_table(specs, lookup),
        highres_table(specs, lookup),
        rasa_table(specs, rasa_frame),
        reference_table(preset, reference, ref_key, specs, lookup, dense_dataset),
    ]
    capped = cap_footnote(evals.attrs["caps"])
    for table in (t for t in tables if capped and t.name in EVAL_TABLES):
        table.footnotes.append(capped)
    for table in tables:
        atomic_write_text(out_dir / f"{table.name}.csv", to_frame(table).to_csv(index=False))
        atomic_write_text(out_dir / f"{table.name}.md", to_markdown(table))
        atomic_write_text(out_dir / f"{table.name}.tex", to_latex(table))

    figures, cvs = _make_figures(inputs, specs, sources, rasa_frame, notes, mask_draws, pca_images)
    written = {fig.name for fig, _ in figures}
    for fig, _ in figures:
        atomic_write_bytes(out_dir / "figures" / fig.name, fig.png)
    for stale in sorted((out_dir / "figures").glob("*.png")):
        if stale.name not in written:  # a figure of an earlier run that this run no longer makes
            log.info("paper: removing stale figure %s", stale)
            stale.unlink()

    built = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = _header(preset, specs, inputs, sources, code, built)
    numbers = _numbers(tables, figures, sources)
    atomic_write_text(out_dir / "numbers.json", json.dumps(numbers, indent=1, allow_nan=False, default=str) + "\n")
    page = render_index(head, {t.name: t for t in tables}, [f for f, _ in figures], sources.records, notes)
    atomic_write_text(out_dir / "index.html", page)
    log.info("paper: %d tables, %d figures, %d sources -> %s", len(tables), len(figures), len(sources.records), out_dir)
    return {
        "tables": {t.name: [str(out_dir / f"{t.name}.{e}") for e in ("csv", "md", "tex")] for t in tables},
        "figures": [str(out_dir / "figures" / f.name) for f, _ in figures],
        "index_html": str(out_dir / "index.html"),
        "numbers_json": str(out_dir / "numbers.json"),
        "inputs": {k: r["sha256"] for k, r in sources.records.items()},
        "masking_cv": cvs,
        "notes": notes,
    }
