"""Self-contained HTML building blocks: a page, a text heatmap, a bar chart, a table.

Everything renders offline: inline CSS, no scripts, hover text through ``title``
attributes. circuitsvis views (which inline their own bundled JS via ``local_src``) can be
dropped into a page with :func:`circuitsvis_html`.
"""

from __future__ import annotations

import html
import math
from typing import Sequence

import matplotlib

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222}
h1{font-size:20px} h2{font-size:16px;margin-top:28px}
.note{color:#555;font-size:13px;max-width:60em}
table.grid{border-collapse:collapse;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11px}
table.grid td,table.grid th{border:1px solid #fff;padding:2px 4px;white-space:pre;text-align:center}
table.grid th{background:#f3f3f3;font-weight:600}
table.grid td{max-width:9em;overflow:hidden;text-overflow:ellipsis;cursor:default}
table.plain{border-collapse:collapse;font-size:13px}
table.plain td,table.plain th{border:1px solid #ddd;padding:3px 8px;text-align:left}
.bar{display:flex;align-items:center;font-size:12px;font-family:ui-monospace,monospace}
.bar span.label{width:16em;text-align:right;padding-right:6px;white-space:pre}
.bar div.fill{height:12px}
.legend{font-size:12px;color:#444;margin:6px 0}
"""


def page(title: str, *sections: str) -> str:
    """A complete HTML document with the shared style."""
    body = "\n".join(sections)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>\n{body}\n</body></html>")


def esc(text) -> str:
    """``text`` as HTML-escaped text (quotes too)."""
    return html.escape(str(text), quote=True)


def show_token(token: str) -> str:
    r"""A token as visible text: quotes keep leading spaces, newlines shown as \n."""
    return repr(token)[1:-1] if token.strip() else repr(token)


def color(value: float, lo: float, hi: float, cmap: str = "viridis") -> tuple[str, str]:
    """(background, text colour) for ``value`` on ``[lo, hi]``; NaN is light grey."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "#eeeeee", "#222"
    t = 0.5 if hi <= lo else min(max((value - lo) / (hi - lo), 0.0), 1.0)
    r, g, b, _ = matplotlib.colormaps[cmap](t)
    text = "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "#fff"
    return matplotlib.colors.to_hex((r, g, b)), text


def heatmap_html(
    values: Sequence[Sequence[float]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    cell_text: Sequence[Sequence[str]] | None = None,
    tooltips: Sequence[Sequence[str]] | None = None,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    caption: str = "",
) -> str:
    """A table heatmap: each cell coloured by its value, showing ``cell_text`` (or the value).

    Rows are drawn in the given order; hover shows ``tooltips`` (default: the value).
    """
    flat = [v for row in values for v in row if v is not None and not math.isnan(v)]
    lo = min(flat) if vmin is None and flat else (vmin or 0.0)
    hi = max(flat) if vmax is None and flat else (vmax if vmax is not None else 1.0)
    head = "".join(f"<th>{esc(c)}</th>" for c in col_labels)
    rows = []
    for i, label in enumerate(row_labels):
        cells = []
        for j in range(len(col_labels)):
            v = values[i][j]
            bg, fg = color(v, lo, hi, cmap)
            text = cell_text[i][j] if cell_text else ("" if v is None else f"{v:.3g}")
            tip = tooltips[i][j] if tooltips else f"{v:.4g}"
            cells.append(f"<td style='background:{bg};color:{fg}' title='{esc(tip)}'>"
                         f"{esc(text)}</td>")
        rows.append(f"<tr><th>{esc(label)}</th>{''.join(cells)}</tr>")
    legend = (f"<div class='legend'>{esc(caption)} colour scale ({cmap}): "
              f"{lo:.3g} &rarr; {hi:.3g}</div>")
    return f"{legend}<table class='grid'><tr><th></th>{head}</tr>{''.join(rows)}</table>"


def bars_html(labels: Sequence[str], values: Sequence[float], *, width_px: int = 320) -> str:
    """A horizontal bar chart (positive blue, negative red), values printed beside bars."""
    top = max((abs(v) for v in values), default=1.0) or 1.0
    rows = []
    for label, v in zip(labels, values):
        fill = "#3b6fb6" if v >= 0 else "#c0392b"
        rows.append(f"<div class='bar'><span class='label'>{esc(label)}</span>"
                    f"<div class='fill' style='width:{abs(v) / top * width_px:.1f}px;"
                    f"background:{fill}'></div>&nbsp;{v:+.4g}</div>")
    return "".join(rows)


def table_html(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain table of text."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='plain'><tr>{head}</tr>{body}</table>"


def circuitsvis_html(rendered) -> str:
    """The offline form of a circuitsvis view (its bundled JS inlined, no CDN)."""
    return rendered.local_src if hasattr(rendered, "local_src") else str(rendered)
