"""Self-contained HTML building blocks: a page, a text heatmap, a bar chart, a table.

Everything renders offline: inline CSS, hover text through ``title`` attributes, and
circuitsvis components with their bundled JS inline (:func:`circuitsvis_html`). Text is
escaped everywhere it lands, so any token (``<``, ``&``, quotes, ``</script>``, control
characters, RTL marks) shows literally.
"""

from __future__ import annotations

import html
import math
import re
from typing import Sequence

import matplotlib

# Every rule is scoped to .tll so a fragment shown in a notebook leaves the notebook's own
# styles alone; page() wraps its body in the same class.
SCOPED_STYLE = """
.tll{font-family:system-ui,-apple-system,Segoe UI,sans-serif;color:#222}
.tll h1{font-size:20px} .tll h2{font-size:16px;margin:18px 0 6px}
.tll .note{color:#555;font-size:13px;max-width:60em}
.tll table.grid{border-collapse:collapse;font-size:11px;
  font-family:ui-monospace,Menlo,Consolas,monospace}
.tll table.grid td,.tll table.grid th{border:1px solid #fff;padding:2px 4px;white-space:pre;
  text-align:center}
.tll table.grid th{background:#f3f3f3;font-weight:600;color:#222}
.tll table.grid td{max-width:9em;overflow:hidden;text-overflow:ellipsis;cursor:default}
.tll table.plain{border-collapse:collapse;font-size:13px}
.tll table.plain td,.tll table.plain th{border:1px solid #ddd;padding:3px 8px;text-align:left;
  white-space:pre-wrap}
.tll .bar{display:flex;align-items:center;font-size:12px;font-family:ui-monospace,monospace}
.tll .bar span.label{width:16em;text-align:right;padding-right:6px;white-space:pre}
.tll .bar div.fill{height:12px}
.tll .legend{font-size:12px;color:#444;margin:6px 0}
"""
STYLE = SCOPED_STYLE  # the old name


def page(title: str, *sections: str) -> str:
    """A complete HTML document with the shared style.

    Args:
        title: the page title (escaped).
        *sections: HTML fragments, in order.

    Returns:
        The document as text.
    """
    body = "\n".join(sections)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>body{{margin:24px}}{SCOPED_STYLE}</style></head><body><div class='tll'>"
            f"<h1>{esc(title)}</h1>\n{body}\n</div></body></html>")


def esc(text) -> str:
    r"""``text`` escaped for HTML text and quoted attribute values (NUL shown as ``\x00``)."""
    # The HTML parser turns NUL into U+FFFD; every other character survives escaping.
    return html.escape(str(text), quote=True).replace("\x00", "\\x00")


def show_token(token: str) -> str:
    r"""A token as visible text: quotes keep leading spaces, newlines shown as \n.

    Control characters, format characters (RTL marks, zero-width joiners) and lone
    surrogates are shown as Python escapes, so a token can never move or hide text.
    """
    return repr(token)[1:-1] if token.strip() else repr(token)


def show_text(text: str) -> str:
    """Free text (a prompt, a generation) with non-printable characters as escapes."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))


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


def image_html(data: bytes, alt: str, *, mime: str = "image/png") -> str:
    """An inline image (base64 ``data:`` URL), capped at the cell's width."""
    import base64

    return (f"<img alt='{esc(alt)}' style='max-width:100%' "
            f"src='data:{mime};base64,{base64.b64encode(data).decode()}'>")


# circuitsvis.utils.render.render_local lays a view out as
#   <div id="circuits-vis-…" …/> <script crossorigin type="module"> BUNDLE
#   CircuitsVis.render("circuits-vis-…", CircuitsVis.Name, {json props}) </script>
_RENDER_CALL = re.compile(r'CircuitsVis\.render\(\s*"(?P<id>[^"]+)",\s*CircuitsVis\.(?P<name>\w+),'
                          r'\s*(?P<props>.*)\)\s*</script>\s*$', re.S)
_SCRIPT_OPEN = '<script crossorigin type="module">'


def circuitsvis_html(*rendered) -> str:
    """Circuitsvis views, offline: their bundled JS inlined once, the props made script-safe.

    circuitsvis embeds its props as JSON inside ``<script>`` without escaping ``</`` (a
    token ``</script>`` would end the script) and writes ``<div …/>``, which HTML does not
    close (the page after it would end up inside React's mount point). Here each view
    gets a closed mount ``div``, ``<`` inside the JSON becomes ``\u003c`` (the same
    string to JavaScript), and several views share one copy of the ~1.3 MB bundle.

    Args:
        *rendered: ``RenderedHTML`` objects returned by circuitsvis functions.

    Returns:
        One HTML fragment with a mount point per view and one module script.

    Raises:
        ValueError: if a view is not in circuitsvis's local-render layout.
    """
    mounts, calls, bundle = [], [], None
    for view in rendered:
        source = getattr(view, "local_src", view)
        head, sep, rest = str(source).partition(_SCRIPT_OPEN)
        start = rest.rfind("CircuitsVis.render(")
        match = _RENDER_CALL.match(rest, start) if sep and start >= 0 else None
        if match is None:
            raise ValueError("circuitsvis_html expects circuitsvis RenderedHTML objects "
                             "(their local_src layout was not recognised)")
        bundle = bundle or rest[:start]
        mount = match["id"]
        props = match["props"].strip().replace("<", "\\u003c").replace("\u2028", "\\u2028")
        mounts.append(f"<div id='{esc(mount)}' class='cv-mount' style='margin:8px 0'></div>")
        calls.append(f'CircuitsVis.render("{mount}", CircuitsVis.{match["name"]}, {props});')
    if bundle is None:
        return ""
    return "".join(mounts) + f"{_SCRIPT_OPEN}{bundle}\n{''.join(calls)}\n</script>"


def circuitsvis_tokens(tokens: Sequence[str]) -> list[str]:
    """Tokens for circuitsvis's token views, which insert text as HTML: escaped, visible."""
    return [esc(show_token(str(token))) for token in tokens]
