"""Self-contained ``index.html`` of the paper (issue 2 item 8, issue 15): one screen per result, every number a link.

The page makes no external request: figures are embedded as base64 PNG data URIs, the CSS and the few lines of
script are inline. Layout: a header (preset, what it can show, datasets, commit, date), the main and ablation tables
(secondary columns collapsed behind a switch, wide tables scrolled inside their own box), the figures (the per-round
RASA numbers behind a disclosure under their figure), the published reference, notes, then the provenance.

Provenance: every number is ``<a class="num" id="<table>-r<i>-c<j>" href="#p<k>">``. Numbers computed from the same
source files (the same chain) share one box ``p<k>`` listing each file's path, sha256, MLflow run id, git commit and
provenance record; the box is shown when targeted (CSS ``:target``), and the script writes the clicked number and
its per-seed values into it. The source index at the end lists every file once.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

from franca.paper.tables import EVAL_TABLES, Cell, Table

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1180px;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:1.8em}
section{margin-bottom:1.5em}
.wrap{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:.85em;margin:.4em 0}
th,td{border:1px solid #ddd;padding:.2em .45em;text-align:right;white-space:nowrap}
th{background:#f4f4f4}td.lab{text-align:left}td.wrapok{white-space:normal;text-align:left}
.sec{display:none}.more:checked~.wrap .sec{display:table-cell}
label.more-l{font-size:.8em;color:#0645ad;cursor:pointer;user-select:none}
a.num{color:#0645ad;text-decoration:none}a.num:hover{text-decoration:underline}
.prov{display:none;border:2px solid #0645ad;background:#f7faff;padding:.5em 1em;margin:.5em 0;font-size:.85em}
.prov ul{margin:.2em 0;padding-left:1.2em}.prov li{overflow-wrap:anywhere}
.prov:target{display:block}
.src:target{background:#fff6d5}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
code{font-size:.9em}.caption{color:#555;font-size:.9em;margin:.2em 0}
.foot{font-size:.8em;color:#555;margin:.2em 0;padding-left:1.2em}
.scope{background:#fffbe6;border-left:4px solid #e0b000;padding:.5em 1em}
dl.meta{display:grid;grid-template-columns:max-content auto;gap:.1em 1em;font-size:.9em}dl.meta dt{color:#555}
dl.meta dd{margin:0}nav a{margin-right:.8em}details{margin:.5em 0}summary{cursor:pointer;color:#0645ad}
"""

# fills the targeted provenance box with the clicked number (the box itself is shown by CSS :target)
_SCRIPT = """
document.addEventListener('click', function (ev) {
  var a = ev.target.closest('a.num');
  if (!a) return;
  var box = document.getElementById(a.getAttribute('href').slice(1));
  if (!box) return;
  box.querySelector('.clicked').textContent =
    a.dataset.label + ' = ' + a.textContent + '; per-seed values: ' + a.dataset.values;
});
"""


@dataclass(frozen=True)
class FigureEntry:
    """One figure of the page: its file name under ``figures/``, title, caption and PNG bytes."""

    name: str
    title: str
    caption: str
    png: bytes


class Chains:
    """Provenance boxes shared between numbers with the same source files: source tuple -> box id."""

    def __init__(self) -> None:
        self.ids: dict[tuple[str, ...], str] = {}

    def of(self, sources: Sequence[str]) -> str:
        return self.ids.setdefault(tuple(sources), f"p{len(self.ids)}")


def _cell_html(table: Table, labels: Sequence[str], label: str, cell: Cell, chains: Chains, cls: str) -> str:
    if not cell.text:
        return f"<td{cls}></td>"
    values = ", ".join(f"{v:.6g}" for v in cell.values) or "n/a"
    what = f"{table.title}: {' / '.join(labels)}, {label}"
    return (
        f'<td{cls}><a class="num" id="{cell.anchor}" href="#{chains.of(cell.sources)}" '
        f'data-label="{escape(what)}" data-values="{escape(values)}">{escape(cell.text)}</a></td>'
    )


def table_html(table: Table, chains: Chains, heading: str = "h2") -> str:
    """The table in a scrolling box, secondary columns collapsed behind a switch, row notes as footnotes."""
    sec = [' class="sec"' if key in table.secondary else "" for key, _ in table.columns]
    header = "".join(f"<th>{escape(h)}</th>" for h in table.index)
    header += "".join(f"<th{c}>{escape(label)}</th>" for c, (_, label) in zip(sec, table.columns, strict=True))
    marks: dict[str, int] = {}
    rows = []
    for labels, cells, note in table.rows:
        mark = f"<sup>{marks.setdefault(note, len(marks) + 1)}</sup>" if note else ""
        row = "".join(f'<td class="lab">{escape(x)}{mark if i == 0 else ""}</td>' for i, x in enumerate(labels))
        for c, (_, label), cell in zip(sec, table.columns, cells, strict=True):
            row += _cell_html(table, labels, label, cell, chains, c)
        rows.append(f"<tr>{row}</tr>")
    out = [
        f'<{heading} id="table-{table.name}">{escape(table.title)}</{heading}>',
        f'<p class="caption">{escape(table.caption)}</p>',
    ]
    if table.secondary:
        box = f"more-{table.name}"
        out.append(
            f'<input type="checkbox" class="more" id="{box}"><label class="more-l" for="{box}">show all '
            f"{len(table.columns)} columns ({len(table.secondary)} secondary hidden)</label>"
        )
    out.append(f'<div class="wrap"><table><tr>{header}</tr>' + "".join(rows) + "</table></div>")
    out += [f'<p class="foot"><sup>{i}</sup> {escape(note)}</p>' for note, i in marks.items()]
    out += [f'<p class="foot">{escape(note)}</p>' for note in table.footnotes]
    return "\n".join(out)


def _source_rows(paths: Sequence[str], sources: Mapping[str, Mapping], ids: Mapping[str, str]) -> str:
    """One line per file: path (a link to its row in the source index), sha256, MLflow run, git commit."""
    rows = []
    for path in paths:
        rec = sources.get(path, {})
        dirty = " (dirty)" if rec.get("dirty") else ""
        rows.append(
            f'<li><a href="#{ids.get(path, "")}">{escape(path)}</a> sha256 <code>{escape(str(rec.get("sha256")))}'
            f"</code> run <code>{escape(str(rec.get('mlflow_run_id') or 'n/a'))}</code> commit "
            f"<code>{escape(str(rec.get('git_commit') or 'n/a'))}{dirty}</code></li>"
        )
    return "<ul>" + "".join(rows) + "</ul>"


def provenance_boxes(chains: Chains, sources: Mapping[str, Mapping], ids: Mapping[str, str]) -> str:
    """One hidden box per chain (tuple of source files), displayed when its id is the URL fragment."""
    out = []
    for paths, box in chains.ids.items():
        out.append(
            f'<div class="prov" id="{box}"><p class="clicked"></p>Computed from {len(paths)} file(s) '
            f'(<a href="#top">back to the top</a>):{_source_rows(paths, sources, ids)}</div>'
        )
    return "\n".join(out)


def source_index(sources: Mapping[str, Mapping], ids: Mapping[str, str]) -> str:
    """Every file once: path, sha256, stage, MLflow run, git commit and the provenance record that describes it."""
    head = ("file", "sha256", "stage", "MLflow run", "git commit", "provenance")
    rows = ["<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for path, rec in sources.items():
        rows.append(
            f'<tr class="src" id="{ids[path]}"><td class="lab"><code>{escape(path)}</code></td>'
            f'<td class="lab"><code>{escape(str(rec.get("sha256") or ""))}</code></td>'
            f'<td class="lab">{escape(str(rec.get("stage") or ""))}</td>'
            f'<td class="lab"><code>{escape(str(rec.get("mlflow_run_id") or "n/a"))}</code></td>'
            f'<td class="lab"><code>{escape(str(rec.get("git_commit") or "n/a"))}</code></td>'
            f'<td class="lab"><code>{escape(str(rec.get("provenance") or "none found"))}</code></td></tr>'
        )
    return '<div class="wrap"><table>' + "".join(rows) + "</table></div>"


def figure_html(fig: FigureEntry, below: str = "") -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return (
        f'<figure id="fig-{escape(fig.name)}"><img alt="{escape(fig.title)}" src="data:image/png;base64,{data}">'
        f"<figcaption><b>{escape(fig.title)}.</b> {escape(fig.caption)} (<code>figures/{escape(fig.name)}</code>)"
        f"</figcaption></figure>{below}"
    )


@dataclass
class Header:
    """What the page says above the tables (franca.paper.header)."""

    title: str
    scope: str
    meta: list[tuple[str, str]]  # (term, text)
    datasets: list  # franca.paper.header.DatasetInfo


def header_html(head: Header) -> str:
    meta = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in head.meta)
    rows = ["<tr><th>dataset</th><th>origin</th><th>license</th><th>images (per split)</th><th>after dedup</th></tr>"]
    for ds in head.datasets:
        splits = ", ".join(f"{s or 'all'} {n:,}" for s, n in ds.splits.items())
        kept = f"{ds.kept_after_dedup:,} train" if ds.kept_after_dedup is not None else "not deduplicated"
        rows.append(
            f'<tr><td class="lab">{escape(ds.name)}</td><td class="wrapok">{escape(", ".join(ds.origins[:3]))}</td>'
            f'<td class="wrapok">{escape(", ".join(ds.licenses))}</td><td class="lab">{escape(splits)}</td>'
            f'<td class="lab">{escape(kept)}</td></tr>'
        )
    datasets = '<div class="wrap"><table>' + "".join(rows) + "</table></div>" if head.datasets else ""
    return (
        f'<h1 id="top">{escape(head.title)}</h1><p class="scope"><b>What this run can show.</b> '
        f'{escape(head.scope)}</p><dl class="meta">{meta}</dl>{datasets}'
    )


def render_index(
    head: Header,
    tables: Mapping[str, Table],
    figures: Sequence[FigureEntry],
    sources: Mapping[str, Mapping],
    notes: Sequence[str],
) -> str:
    """The whole page as a string. ``tables``: main, baselines, ablation, highres, rasa (under the RASA figure) and
    reference."""
    ids = {path: f"src-{i}" for i, path in enumerate(sources)}
    chains = Chains()
    sections = [f"<section>{table_html(tables[n], chains)}</section>" for n in EVAL_TABLES if n in tables]
    figs = []
    for fig in figures:
        below = ""
        if fig.name == "rasa_rounds.png" and "rasa" in tables:
            below = f"<details><summary>Per-round RASA numbers</summary>{table_html(tables['rasa'], chains, 'h3')}"
            below += "</details>"
        figs.append(figure_html(fig, below))
    if "rasa" in tables and not any(f.name == "rasa_rounds.png" for f in figures) and tables["rasa"].rows:
        figs.append(f"<details><summary>Per-round RASA numbers</summary>{table_html(tables['rasa'], chains, 'h3')}")
        figs[-1] += "</details>"
    sections.append('<section><h2 id="figures">Figures</h2>' + "\n".join(figs) + "</section>")
    if "reference" in tables:
        sections.append(f"<section>{table_html(tables['reference'], chains)}</section>")
    if notes:
        items = "".join(f"<li>{escape(n)}</li>" for n in notes)
        sections.append(f'<section><h2 id="notes">Notes</h2><ul>{items}</ul></section>')
    toc = [f'<a href="#table-{n}">{escape(t.title)}</a>' for n, t in tables.items() if n != "rasa"]
    toc += ['<a href="#figures">Figures</a>', '<a href="#provenance">Provenance</a>']
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">',
        f"<title>{escape(head.title)}</title><style>{_CSS}</style></head><body>",
        header_html(head),
        "<nav>" + "".join(toc) + "</nav>",
        '<p class="caption">Click any number to see the files it was computed from, their sha256, MLflow run and '
        "git commit.</p>",
        *sections,
        '<section><h2 id="provenance">Provenance</h2>',
        provenance_boxes(chains, sources, ids),
        "<h3>Source files</h3>",
        source_index(sources, ids),
        f"</section><script>{_SCRIPT}</script></body></html>",
    ]
    return "\n".join(parts) + "\n"
