"""Self-contained ``index.html`` of the paper (issue 2 item 8): every table and figure, every number a link.

The page makes no external request: figures are embedded as base64 PNG data URIs and the CSS is inline. Each table
number links to an anchor (``#<table>-r<i>-c<j>``) whose box, shown when targeted, lists the per-seed values and
for each source file its path, sha256, MLflow run id and git commit (from the ``provenance.json`` beside it).
A visible source index at the end lists every file the page was built from.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

from franca.paper.tables import Cell, Table

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1400px;
padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right;white-space:nowrap}
th{background:#f4f4f4}td.lab{text-align:left}td.note{text-align:left;color:#777;white-space:normal;min-width:12em}
a.num{color:#0645ad;text-decoration:none}a.num:hover{text-decoration:underline}
.prov{display:none;border:2px solid #0645ad;background:#f7faff;padding:.5em 1em;margin:.5em 0}
.prov:target{display:block}
.src:target{background:#fff6d5}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
code{font-size:.9em}.caption{color:#555;font-size:.9em}
"""


@dataclass(frozen=True)
class FigureEntry:
    """One figure of the page: its file name under ``figures/``, title, caption and PNG bytes."""

    name: str
    title: str
    caption: str
    png: bytes


def _cell_html(cell: Cell) -> str:
    if not cell.text:
        return "<td></td>"
    return f'<td><a class="num" href="#{cell.anchor}">{escape(cell.text)}</a></td>'


def table_html(table: Table) -> str:
    header = [*table.index, *(label for _, label in table.columns), "note"]
    out = [
        f'<h2 id="table-{table.name}">{escape(table.title)}</h2>',
        f'<p class="caption">{escape(table.caption)}</p>',
        "<table>",
        "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>",
    ]
    for labels, cells, note in table.rows:
        row = "".join(f'<td class="lab">{escape(x)}</td>' for x in labels)
        row += "".join(_cell_html(c) for c in cells) + f'<td class="note">{escape(note)}</td>'
        out.append(f"<tr>{row}</tr>")
    out.append("</table>")
    return "\n".join(out)


def _source_rows(paths: Sequence[str], sources: Mapping[str, Mapping], ids: Mapping[str, str]) -> str:
    rows = ["<tr><th>file</th><th>sha256</th><th>MLflow run</th><th>git commit</th><th>provenance</th></tr>"]
    for path in paths:
        rec = sources.get(path, {})
        dirty = " (dirty)" if rec.get("dirty") else ""
        rows.append(
            f'<tr><td class="lab"><a href="#{ids.get(path, "")}"><code>{escape(path)}</code></a></td>'
            f'<td class="lab"><code>{escape(str(rec.get("sha256") or ""))}</code></td>'
            f'<td class="lab"><code>{escape(str(rec.get("mlflow_run_id") or "n/a"))}</code></td>'
            f'<td class="lab"><code>{escape(str(rec.get("git_commit") or "n/a"))}{dirty}</code></td>'
            f'<td class="lab"><code>{escape(str(rec.get("provenance") or "none found"))}</code></td></tr>'
        )
    return "<table>" + "".join(rows) + "</table>"


def provenance_boxes(tables: Sequence[Table], sources: Mapping[str, Mapping], ids: Mapping[str, str]) -> str:
    """One hidden box per non-empty cell, displayed when its anchor is the URL fragment."""
    out = []
    for table in tables:
        for labels, cells, _ in table.rows:
            for (_, label), cell in zip(table.columns, cells, strict=True):
                if not cell.text:
                    continue
                values = ", ".join(f"{v:.6g}" for v in cell.values)
                out.append(
                    f'<div class="prov" id="{cell.anchor}"><b>{escape(table.title)}</b>: '
                    f"{escape(' / '.join(labels))}, {escape(label)} = <b>{escape(cell.text)}</b>"
                    f"<br>values: {escape(values or 'n/a')} "
                    f'<a href="#table-{table.name}">(back to table)</a>'
                    f"{_source_rows(cell.sources, sources, ids)}</div>"
                )
    return "\n".join(out)


def source_index(sources: Mapping[str, Mapping], ids: Mapping[str, str]) -> str:
    rows = ["<tr><th>file</th><th>sha256</th><th>stage</th><th>MLflow run</th><th>git commit</th></tr>"]
    for path, rec in sources.items():
        rows.append(
            f'<tr class="src" id="{ids[path]}"><td class="lab"><code>{escape(path)}</code></td>'
            f'<td class="lab"><code>{escape(str(rec.get("sha256") or ""))}</code></td>'
            f'<td class="lab">{escape(str(rec.get("stage") or ""))}</td>'
            f'<td class="lab"><code>{escape(str(rec.get("mlflow_run_id") or "n/a"))}</code></td>'
            f'<td class="lab"><code>{escape(str(rec.get("git_commit") or "n/a"))}</code></td></tr>'
        )
    return "<table>" + "".join(rows) + "</table>"


def figure_html(fig: FigureEntry) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return (
        f'<figure id="fig-{escape(fig.name)}"><img alt="{escape(fig.title)}" src="data:image/png;base64,{data}">'
        f"<figcaption><b>{escape(fig.title)}.</b> {escape(fig.caption)} (<code>figures/{escape(fig.name)}</code>)"
        "</figcaption></figure>"
    )


def render_index(
    title: str,
    summary_lines: Sequence[str],
    tables: Sequence[Table],
    figures: Sequence[FigureEntry],
    sources: Mapping[str, Mapping],
    notes: Sequence[str],
) -> str:
    """The whole page as a string."""
    ids = {path: f"src-{i}" for i, path in enumerate(sources)}
    toc = [f'<a href="#table-{t.name}">{escape(t.title)}</a>' for t in tables]
    toc += [f'<a href="#fig-{escape(f.name)}">{escape(f.title)}</a>' for f in figures]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        "<ul>" + "".join(f"<li>{escape(line)}</li>" for line in summary_lines) + "</ul>",
        "<p>" + " · ".join(toc) + "</p>",
        '<p class="caption">Click any number to see the files it was computed from, their sha256, MLflow run and '
        "git commit.</p>",
        *(table_html(t) for t in tables),
        '<h2 id="figures">Figures</h2>',
        *(figure_html(f) for f in figures),
    ]
    if notes:
        parts += ['<h2 id="notes">Notes</h2>', "<ul>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>"]
    parts += [
        '<h2 id="provenance">Provenance</h2>',
        provenance_boxes(tables, sources, ids),
        "<h3>Source files</h3>",
        source_index(sources, ids),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
