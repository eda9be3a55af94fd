"""The paper's tables (issue 2 item 8, issue 5 items 4-5): main results, ablation grid, RASA rounds, reference.

Every value cell is a ``Cell`` that keeps its per-seed values' mean, std and count and the files it came from, so
that CSV, Markdown, LaTeX, ``index.html`` and ``numbers.json`` all show the same number with the same provenance.
Aggregation over seeds: mean and sample standard deviation (ddof = 1; undefined for one seed, shown as "n=1").
Accuracies and mIoU are shown in percent: a benchmark whose metrics all lie in [0, 1] is taken as fractions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from franca.paper.collect import RASA_FIELDS, ExperimentSpec

# ablation grid (issue 5 item 4): experiment name -> row label; the first is the baseline of every delta
ABLATION_VARIANTS = (
    ("dinov2", "DINOv2 baseline"),
    ("mrl_only", "+MRL"),
    ("cyclic_only", "+CyclicMask"),
    ("franca", "Franca"),
)
_DECIMALS = {"pct": 1, "r2": 3, "cos": 3, "ref": 1}
_OVERCLUSTER_K = re.compile(r"^miou_k(\d+)$")
_PCT_METRIC = re.compile(r"^(top|miou|acc)")


@dataclass
class Cell:
    """One value of a table: the aggregate of per-seed numbers and their source files."""

    kind: str = "pct"  # pct | r2 | cos | ref | delta-pct | delta-r2
    values: list[float] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    mean: float | None = None
    std: float | None = None
    note: str = ""
    anchor: str = ""

    @classmethod
    def of(cls, kind: str, values: Sequence[float], sources: Sequence[str]) -> Cell:
        vals = [float(v) for v in values if v is not None and not math.isnan(v)]
        cell = cls(kind, vals, list(dict.fromkeys(sources)))
        if vals:
            cell.mean = float(np.mean(vals))
            cell.std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        return cell

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def decimals(self) -> int:
        return _DECIMALS.get(self.kind.removeprefix("delta-"), 1)

    @property
    def text(self) -> str:
        if self.mean is None:
            return ""
        d = self.decimals
        if self.kind.startswith("delta-"):
            return f"{self.mean:+.{d}f}" + (f" ± {self.std:.{d}f}" if self.std is not None else "")
        if self.kind == "ref":
            return f"{self.mean:.{d}f}"
        spread = f" ± {self.std:.{d}f}" if self.std is not None else ""
        return f"{self.mean:.{d}f}{spread} (n={self.n})"


@dataclass
class Table:
    """Rows of (labels, cells, note) under ``index`` label headers and ``columns`` value headers.

    ``secondary``: keys of columns the page collapses by default (they stay in every file); ``footnotes``: what was
    left out because it was not configured, printed under the table.
    """

    name: str
    title: str
    caption: str
    index: list[str]
    columns: list[tuple[str, str]]  # (csv key, display label)
    rows: list[tuple[list[str], list[Cell], str]] = field(default_factory=list)  # labels, cells, row note
    secondary: set[str] = field(default_factory=set)
    footnotes: list[str] = field(default_factory=list)

    def add(self, labels: Sequence[str], cells: Sequence[Cell], note: str = "") -> None:
        i = len(self.rows)
        for j, cell in enumerate(cells):
            cell.anchor = f"{self.name}-r{i}-c{j}"
        self.rows.append(([str(x) for x in labels], list(cells), note))


# ----------------------------------------------------------------------------------------------- metric lookup
@dataclass(frozen=True)
class MetricColumn:
    """A table column read from one benchmark's eval JSON; ``pick`` finds the metric in its ``metrics`` dict."""

    key: str
    label: str
    benchmark: str
    pick: Callable[[Mapping[str, float], Mapping], float | None]
    kind: str = "pct"


def _first_of(*names: str) -> Callable[[Mapping[str, float], Mapping], float | None]:
    def pick(metrics: Mapping[str, float], details: Mapping) -> float | None:
        return next((metrics[n] for n in names if n in metrics), None)

    return pick


def _overcluster(which: str) -> Callable[[Mapping[str, float], Mapping], float | None]:
    """``miou_k{K}``: K = C (the class count from details when given, else the smallest K) or the largest K."""

    def pick(metrics: Mapping[str, float], details: Mapping) -> float | None:
        ks = {int(m.group(1)): v for name, v in metrics.items() if (m := _OVERCLUSTER_K.match(name))}
        if not ks:
            return None
        if which == "max":
            return ks[max(ks)]
        n_classes = details.get("n_classes", details.get("num_classes"))
        return ks.get(int(n_classes), ks[min(ks)]) if isinstance(n_classes, int) else ks[min(ks)]

    return pick


KNN_TOP1 = MetricColumn("knn_top1", "k-NN top-1 (k=20)", "knn", _first_of("top1_k20", "top1"))
LINEAR_TOP1 = MetricColumn("linear_top1", "linear top-1 (val-sel.)", "linear", _first_of("top1", "top1_val"))
HUMMINGBIRD = MetricColumn("hummingbird_miou", "Hummingbird mIoU", "hummingbird", _first_of("miou"))
LINSEG = MetricColumn("linseg_miou", "linear-seg mIoU", "linseg", _first_of("miou"))
DENSE_COLUMNS = (
    HUMMINGBIRD,
    LINSEG,
    MetricColumn("overcluster_miou_kc", "overcluster mIoU (K=C)", "overcluster", _overcluster("c")),
    MetricColumn("overcluster_miou_kmax", "overcluster mIoU (max K)", "overcluster", _overcluster("max")),
    MetricColumn("position_r2", "position R^2", "position_probe", _first_of("r2"), kind="r2"),
)
MAIN_COLUMNS = (
    KNN_TOP1,
    MetricColumn("knn_top5", "k-NN top-5 (k=20)", "knn", _first_of("top5_k20", "top5")),
    LINEAR_TOP1,
    MetricColumn(
        "linear_top1_holdout",
        "linear top-1 (hold-out-sel.)",
        "linear",
        _first_of("top1_holdout", "top1_holdout_selected", "holdout_top1"),
    ),
    MetricColumn("logreg_top1", "logreg top-1", "logreg", _first_of("top1")),
    *DENSE_COLUMNS,
)


# columns the page collapses by default (secondary to the paper's claims); every file keeps them
SECONDARY = {"knn_top5", "linear_top1_holdout", "logreg_top1", "overcluster_miou_kc", "overcluster_miou_kmax"}


class EvalLookup:
    """Per-file metrics of the eval frame, keyed (exp, seed, ckpt, benchmark, rasa), and the files the run expected
    (``evals.attrs["expected"]``; without it, every file present counts as expected)."""

    def __init__(self, evals: pd.DataFrame) -> None:
        self.details: Mapping[str, Mapping] = evals.attrs.get("details", {})
        self.files: dict[tuple, tuple[dict[str, float], str]] = {}
        for key, group in evals.groupby(["exp", "seed", "ckpt", "benchmark", "rasa"], sort=False):
            self.files[tuple(key)] = (dict(zip(group["metric"], group["value"], strict=True)), group["source"].iloc[0])
        self.expected: set[tuple] = set(evals.attrs.get("expected", self.files))
        # percent scaling per benchmark: fractions when every accuracy/mIoU metric lies in [0, 1]
        pct = evals[evals["metric"].str.match(_PCT_METRIC)]
        self.scale = {b: (100.0 if g["value"].abs().max() <= 1.0 else 1.0) for b, g in pct.groupby("benchmark")}

    def configured(self, benchmark: str, exp: str | None = None, ckpt: str | None = None, rasa: bool = False) -> bool:
        """Whether the run expected any result of ``benchmark`` (for ``exp`` / ``ckpt`` when given)."""
        return any(
            b == benchmark and r == rasa and exp in (None, e) and ckpt in (None, c) for e, _, c, b, r in self.expected
        )

    def cell(self, col: MetricColumn, exp: str, seeds: Sequence[int], ckpt: str, rasa: bool) -> tuple[Cell, list]:
        """Aggregate ``col`` over ``seeds``; returns the cell and the seeds whose expected file or metric is missing
        (a seed whose file the run did not expect is neither a value nor missing)."""
        values, sources, missing = [], [], []
        for seed in seeds:
            key = (exp, seed, ckpt, col.benchmark, rasa)
            found = self.files.get(key)
            value = col.pick(_rasa_view(found[0], rasa), self.details.get(found[1], {})) if found else None
            if value is None:
                if key in self.expected:
                    missing.append(seed)
                continue
            scale = self.scale.get(col.benchmark, 1.0) if col.kind == "pct" else 1.0
            values.append(value * scale)
            sources.append(found[1])
        return Cell.of(col.kind, values, sources), missing


def _rasa_view(metrics: Mapping[str, float], rasa: bool) -> Mapping[str, float]:
    """The metrics of a RASA eval under their plain names: a ``<name>_rasa`` value replaces ``<name>`` (the position
    probe's RASA JSON holds both, e.g. ``r2`` without and ``r2_rasa`` with the head)."""
    if not rasa:
        return metrics
    return {**metrics, **{k.removesuffix("_rasa"): v for k, v in metrics.items() if k.endswith("_rasa")}}


def _missing_note(col: MetricColumn, missing: Sequence[int], rasa: bool = False) -> str:
    tag = f"{col.benchmark}{'_rasa' if rasa else ''}"
    return f"{tag} missing for seed(s) {', '.join(map(str, missing))}" if missing else ""


def _join(notes: Sequence[str]) -> str:
    return "; ".join(dict.fromkeys(n for n in notes if n))


def _names(items: Sequence[str]) -> str:
    return ", ".join(items)


def _configured_columns(columns: Sequence[MetricColumn], lookup: EvalLookup, table: str) -> tuple[list, str]:
    """The columns whose benchmark the run configured, and a footnote naming the others."""
    kept = [c for c in columns if lookup.configured(c.benchmark)]
    dropped = list(dict.fromkeys(c.benchmark for c in columns if c not in kept))
    note = f"Not configured in this run, so left out of the {table} table: {_names(dropped)}." if dropped else ""
    return kept, note


# ----------------------------------------------------------------------------------------------- builders
def main_table(specs: Sequence[ExperimentSpec], lookup: EvalLookup) -> Table:
    """One row per experiment x configured checkpoint; dense metrics without RASA (RASA is in the ablation table)."""
    cols, dropped = _configured_columns(MAIN_COLUMNS, lookup, "main")
    table = Table(
        "main",
        "Main results",
        "Mean ± std over seeds (n seeds). Dense metrics on patch tokens without RASA.",
        ["experiment", "checkpoint"],
        [(c.key, c.label) for c in cols],
        secondary=SECONDARY & {c.key for c in cols},
    )
    for spec in specs:
        for ckpt in spec.checkpoints:
            cells, notes = [], []
            for col in cols:
                cell, missing = lookup.cell(col, spec.name, spec.seeds, ckpt, False)
                cells.append(cell)
                notes.append(_missing_note(col, missing))
            table.add([spec.name, ckpt], cells, _join(notes))
    no_hr = [s.name for s in specs if not s.highres]
    if no_hr and len(no_hr) < len(specs):
        table.footnotes.append(f"No highres rows for {_names(no_hr)}: highres: false for these experiments.")
    table.footnotes += [dropped] if dropped else []
    return table


def ablation_table(specs: Sequence[ExperimentSpec], lookup: EvalLookup) -> Table:
    """{baseline, +MRL, +CyclicMask, Franca} x {no RASA, RASA} on the dense metrics, delta vs the baseline with the
    spread of the per-seed differences (``_ablation_row``).

    The baseline of every delta is the DINOv2 baseline without RASA at the same checkpoint. Rows of variants,
    checkpoints or RASA that the run did not configure are left out, with a footnote.
    """
    by_name = {s.name: s for s in specs}
    cols, dropped = _configured_columns(DENSE_COLUMNS, lookup, "ablation")
    columns = []
    for col in cols:
        columns += [(col.key, col.label), (f"{col.key}_delta", "Δ")]
    table = Table(
        "ablation",
        "Ablation",
        "Dense metrics, mean ± std over seeds; Δ = difference of means to the DINOv2 baseline without RASA at the "
        "same checkpoint, ± the std of the per-seed differences (two or more common seeds). A row's note names the "
        "metrics whose |Δ| is within the seed spread (that std, else the baseline's): their sign is not shown.",
        ["checkpoint", "variant", "RASA"],
        columns,
        secondary={k for k, _ in columns if k.removesuffix("_delta") in SECONDARY},
    )
    if not cols:
        table.footnotes.append("No dense benchmark is configured in this run, so the ablation has no rows.")
        return table
    absent = [label for name, label in ABLATION_VARIANTS if name not in by_name]
    no_hr, no_rasa = [], []
    for ckpt in ["pretrain"] + (["highres"] if any(s.highres for s in specs) else []):
        base_spec = by_name.get(ABLATION_VARIANTS[0][0])
        base = {}
        if base_spec is not None and ckpt in base_spec.checkpoints:
            base = {c.key: (lookup.cell(c, base_spec.name, base_spec.seeds, ckpt, False)[0],
                            _per_seed(lookup, c, base_spec, ckpt, False)) for c in cols}  # fmt: skip
        for name, label in ABLATION_VARIANTS:
            spec = by_name.get(name)
            if spec is None:
                continue
            if ckpt not in spec.checkpoints:
                no_hr.append(label)
                continue
            for rasa in (False, True):
                if rasa and not spec.rasa:
                    no_rasa += [label] if ckpt == "pretrain" else []
                    continue
                table.add([ckpt, label, "yes" if rasa else "no"], *_ablation_row(spec, ckpt, rasa, lookup, base, cols))
    if absent:
        table.footnotes.append(f"Variants not configured in this run: {_names(absent)}.")
    if no_hr:
        table.footnotes.append(f"No highres rows for {_names(no_hr)}: highres: false for these experiments.")
    if no_rasa:
        table.footnotes.append(f"No RASA rows for {_names(no_rasa)}: rasa: false for these experiments.")
    table.footnotes += [dropped] if dropped else []
    return table


def _per_seed(lookup: EvalLookup, col: MetricColumn, spec: ExperimentSpec, ckpt: str, rasa: bool) -> dict:
    cells = {seed: lookup.cell(col, spec.name, [seed], ckpt, rasa)[0] for seed in spec.seeds}
    return {seed: cell.mean for seed, cell in cells.items() if cell.mean is not None}


def _ablation_row(spec, ckpt, rasa, lookup, base, cols) -> tuple[list[Cell], str]:
    """Each metric and its Δ to the baseline (``_delta``). A Δ within the seed spread is named in the row note: its
    sign is not established by this run."""
    cells, notes, within = [], [], []
    for col in cols:
        cell, missing = lookup.cell(col, spec.name, spec.seeds, ckpt, rasa)
        notes.append(_missing_note(col, missing, rasa))
        ref, ref_seeds = base.get(col.key, (None, {}))
        delta, inside = _delta(col, cell, _per_seed(lookup, col, spec, ckpt, rasa), ref, ref_seeds)
        within += [col.label] if inside else []
        cells += [cell, delta]
    if spec.name == ABLATION_VARIANTS[0][0] and not rasa:
        notes.insert(0, "baseline of Δ")
    elif within:
        notes.append(f"|Δ| within the seed spread: {_names(within)}")
    return cells, _join(notes)


def _delta(col: MetricColumn, cell: Cell, seeds: Mapping, ref: Cell | None, ref_seeds: Mapping) -> tuple[Cell, bool]:
    """``cell - ref``: the difference of the means, ± the std of the per-seed differences when both share two or more
    seeds; and whether |Δ| is within the seed spread (that std, else ref's own seed std)."""
    delta = Cell(f"delta-{col.kind}")
    if ref is None or ref.mean is None or cell.mean is None:
        return delta, False
    paired = [seeds[s] - ref_seeds[s] for s in sorted(seeds.keys() & ref_seeds.keys())]
    delta.mean, delta.values = cell.mean - ref.mean, paired or [cell.mean - ref.mean]
    delta.std = float(np.std(paired, ddof=1)) if len(paired) > 1 else None
    delta.sources = list(dict.fromkeys(cell.sources + ref.sources))
    spread = delta.std if delta.std is not None else ref.std
    return delta, spread is not None and abs(delta.mean) <= spread


HIGHRES_COLUMNS = (KNN_TOP1, LINEAR_TOP1, *DENSE_COLUMNS)
# the tables of this run's evaluations, in page order (the cap footnote and the page's first sections)
EVAL_TABLES = ("main", "baselines", "ablation", "highres")


def highres_table(specs: Sequence[ExperimentSpec], lookup: EvalLookup) -> Table:
    """What the high-resolution fine-tune (spec 4, stage 2) changes: per experiment, Δ = highres - pretrain of the
    same run, ± the std of the per-seed differences; the note names the metrics whose |Δ| is within the spread."""
    cols, dropped = _configured_columns(HIGHRES_COLUMNS, lookup, "high-resolution")
    table = Table(
        "highres",
        "High-resolution fine-tuning",
        "Δ = the fine-tuned checkpoint minus the pretrain checkpoint of the same experiment, difference of the means "
        "± the std of the per-seed differences; without RASA.",
        ["experiment"],
        [(f"{c.key}_delta", f"Δ {c.label}") for c in cols],
        secondary={f"{c.key}_delta" for c in cols if c.key in SECONDARY},
    )
    for spec in (s for s in specs if "highres" in s.checkpoints):
        cells, notes, within = [], [], []
        for col in cols:
            got = {}  # checkpoint -> (cell, per-seed values)
            for ckpt in ("highres", "pretrain"):
                cell, missing = lookup.cell(col, spec.name, spec.seeds, ckpt, False)
                notes += [f"{ckpt}: {_missing_note(col, missing)}"] if missing else []
                got[ckpt] = (cell, _per_seed(lookup, col, spec, ckpt, False))
            delta, inside = _delta(col, *got["highres"], *got["pretrain"])
            within += [col.label] if inside else []
            cells.append(delta)
        notes += [f"|Δ| within the seed spread: {_names(within)}"] if within else []
        table.add([spec.name], cells, _join(notes))
    if not table.rows:
        table.footnotes.append("No experiment of this run has a high-resolution fine-tune (highres: false).")
    table.footnotes += [dropped] if dropped else []
    return table


KNN_INIT = MetricColumn("knn_init_top1", "random init", "knn", _first_of("init_top1_k20", "init_top1"))
KNN_PIXELS = MetricColumn("knn_pixels_top1", "raw pixels", "knn", _first_of("pixels_top1_k20", "pixels_top1"))


def baselines_table(specs: Sequence[ExperimentSpec], lookup: EvalLookup) -> Table:
    """k-NN top-1 of each pretrained teacher against its own random-init backbone and raw pixels (issue 13).

    The references come from the same features job, images and k-NN protocol as the trained row (the ``init_*``
    and ``pixels_*`` metrics of the pretrain checkpoint's knn.json). Δ is the per-seed gain over the random init;
    the row note says whether its mean exceeds the seed spread of the trained k-NN.
    """
    table = Table(
        "baselines",
        "Against random init and raw pixels",
        "k-NN top-1 (k=20) of the pretrained teacher, of the same architecture at its random initialisation (the "
        "weights pretraining started from, same seed) and of the raw evaluation crops; mean ± std over seeds.",
        ["experiment"],
        [("knn_top1", "trained"), ("knn_init_top1", "random init"), ("gain", "Δ (trained − init)"),
         ("knn_pixels_top1", "raw pixels")],
    )  # fmt: skip
    for spec in specs:
        trained, missing = lookup.cell(KNN_TOP1, spec.name, spec.seeds, "pretrain", False)
        init, _ = lookup.cell(KNN_INIT, spec.name, spec.seeds, "pretrain", False)
        pixels, _ = lookup.cell(KNN_PIXELS, spec.name, spec.seeds, "pretrain", False)
        ours, base = (_per_seed(lookup, c, spec, "pretrain", False) for c in (KNN_TOP1, KNN_INIT))
        gain = Cell.of("pct", [ours[s] - base[s] for s in sorted(ours.keys() & base.keys())], trained.sources)
        table.add([spec.name], [trained, init, gain, pixels], _gain_note(gain, trained, missing))
    if not any(cells[1].mean is not None for _, cells, _ in table.rows):
        table.footnotes.append("No random-init or raw-pixel k-NN in this run's results (features without --baselines).")
    return table


def _gain_note(gain: Cell, trained: Cell, missing: Sequence[int]) -> str:
    if missing:
        return _missing_note(KNN_TOP1, missing)
    if gain.mean is None:
        return ""
    if trained.std is None:
        return "one seed: no spread to compare Δ with"
    verdict = "exceeds" if gain.mean > trained.std else "does not exceed"
    return f"Δ {verdict} the seed spread of the trained k-NN ({trained.std:.{trained.decimals}f})"


def rasa_table(specs: Sequence[ExperimentSpec], rasa: pd.DataFrame) -> Table:
    """Per round: position R^2 from x, x_pos and x_no_pos, and cos(x_no_pos, x); mean ± std over seeds.

    Experiments without RASA are left out (footnote); "missing" marks a report the run expected but lacks.
    """
    labels = {
        "r2_x": "R^2 (x)",
        "r2_pos": "R^2 (x_pos)",
        "r2_no_pos": "R^2 (x_no_pos)",
        "cos_no_pos_x": "cos(x_no_pos, x)",
    }
    table = Table(
        "rasa",
        "RASA rounds",
        "Position decodability per RASA round (linear probe R^2) and cosine "
        "similarity of the debiased tokens to the original ones; mean ± std over seeds.",
        ["experiment", "checkpoint", "round"],
        [(f, labels[f]) for f in RASA_FIELDS],
    )
    expected = rasa.attrs.get("expected", set(zip(rasa["exp"], rasa["seed"], rasa["ckpt"], strict=True)))
    for spec in specs:
        for ckpt in spec.checkpoints:
            want = sorted(seed for seed in spec.seeds if (spec.name, seed, ckpt) in expected)
            sub = rasa[(rasa["exp"] == spec.name) & (rasa["ckpt"] == ckpt)]
            if sub.empty:
                if want:
                    table.add([spec.name, ckpt, ""], [Cell("r2") for _ in RASA_FIELDS], "RASA report missing")
                continue
            for rnd, group in sub.groupby("round", sort=True):
                cells = [
                    Cell.of("cos" if f.startswith("cos") else "r2", group[f].tolist(), group["source"].tolist())
                    for f in RASA_FIELDS
                ]
                absent = sorted(set(want) - set(group["seed"]))
                note = f"report missing for seed(s) {', '.join(map(str, absent))}" if absent else ""
                table.add([spec.name, ckpt, str(rnd)], cells, note)
    no_rasa = [s.name for s in specs if not s.rasa]
    if no_rasa:
        table.footnotes.append(f"No RASA rows for {_names(no_rasa)}: rasa: false for these experiments.")
    return table


def reference_table(
    preset: str,
    reference: Mapping | None,
    reference_key: str | None,
    specs: Sequence[ExperimentSpec],
    lookup: EvalLookup,
    dense_dataset: str | None = None,
) -> Table:
    """Ours beside the published README numbers (spec 8.1) for a paper preset; else every paper preset's numbers.

    A dense row compares only on the dataset it was published on (Hummingbird: VOC, linear seg.: ADE20K):
    ``dense_dataset`` is this run's ``data.dense.dataset``; on another dataset our cell stays empty, with a note.
    """
    presets = dict((reference or {}).get("presets", {}))
    if preset not in presets:
        return _published_table(preset, presets, reference_key, (reference or {}).get("source", ""))
    entry = presets[preset]
    franca = next((s for s in specs if s.name == "franca"), None)
    ckpt = "highres" if franca and franca.highres and int(entry.get("res", 224)) > 224 else "pretrain"
    columns = [
        ("ours", f"ours (franca, {ckpt})"),
        ("published_v1", "published (v1.0.0 README)"),
        ("published_later", "published (later README)"),
        ("delta_later", "Δ vs later"),
    ]
    table = Table(
        "reference",
        "Published reference",
        f"{entry.get('model')} {entry.get('data')} at "
        f"{entry.get('res')} px; source: {(reference or {}).get('source', '')}.",
        ["metric"],
        columns,
    )
    rows = (
        (KNN_TOP1, "knn_v1", "knn_later", None),
        (LINEAR_TOP1, "linear_v1", "linear_later", None),
        (HUMMINGBIRD, "hummingbird_voc", "hummingbird_voc", "voc"),
        (LINSEG, "linseg_ade20k", "linseg_ade20k", "ade20k"),
    )
    for col, v1, later, published_on in rows:
        other_data = published_on is not None and (dense_dataset or "").lower() != published_on
        if other_data:
            note = f"published on {published_on}; this run's dense evaluations use {dense_dataset!r}"
            refs = [Cell.of("ref", [entry[k]], [reference_key] if reference_key else []) for k in (v1, later)]
            table.add([col.label], [Cell(), *refs, Cell("delta-pct")], note)
            continue
        ours, missing = lookup.cell(col, "franca", franca.seeds, ckpt, False) if franca else (Cell(), [])
        refs = [
            Cell.of("ref", [entry[k]], [reference_key] if reference_key else []) if k in entry else Cell("ref")
            for k in (v1, later)
        ]
        delta = Cell("delta-pct")
        if ours.mean is not None and refs[1].mean is not None:
            delta.mean, delta.values = ours.mean - refs[1].mean, [ours.mean - refs[1].mean]
            delta.sources = ours.sources + refs[1].sources
        note = "experiment franca not configured" if franca is None else _missing_note(col, missing)
        table.add([col.label], [ours, *refs, delta], note)
    return table


# published columns of config/reference/paper_readme.yaml: (key, label)
PUBLISHED = (
    ("knn_v1", "k-NN top-1 (v1.0.0)"),
    ("linear_v1", "linear top-1 (v1.0.0)"),
    ("knn_later", "k-NN top-1 (later)"),
    ("linear_later", "linear top-1 (later)"),
    ("hummingbird_voc", "Hummingbird mIoU (VOC)"),
    ("linseg_ade20k", "linear-seg mIoU (ADE20K)"),
)


def _published_table(preset: str, presets: Mapping, reference_key: str | None, source: str) -> Table:
    """The published numbers of every paper preset, for a run whose preset has none (tiny, small)."""
    caption = (
        f"Published numbers of the paper presets ({source}). This run used preset '{preset}', which the paper "
        "did not publish: its numbers are not comparable to these."
        if presets or not preset.startswith("paper_")
        else f"No reference file was given for the paper preset '{preset}'."
    )
    table = Table("reference", "Published reference", caption, ["preset", "model", "data", "res"], list(PUBLISHED))
    srcs = [reference_key] if reference_key else []
    for name, entry in presets.items():
        cells = [Cell.of("ref", [entry[k]], srcs) if k in entry else Cell("ref") for k, _ in PUBLISHED]
        table.add([name, entry.get("model", ""), entry.get("data", ""), entry.get("res", "")], cells)
    return table
