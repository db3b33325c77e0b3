"""Views of a direct logit attribution: head heatmap, top-k bars, tokens coloured by attribution.

HTML is self-contained (tl_lenses.viz.html; circuitsvis views inline their own JS); PNGs come
from matplotlib. Every view reads one (batch, direction) cell of a :class:`DLAResult`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from tl_lenses.viz.html import bars_html, circuitsvis_html, esc, heatmap_html, page, table_html
from tl_lenses.viz.static import heatmap_png

if TYPE_CHECKING:
    from tl_lenses.attribution.paths import HeadPathResult
    from tl_lenses.attribution.result import DLAResult


def _symmetric(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.abs().max()) if finite.numel() else 1.0


def _head_labels(matrix: torch.Tensor) -> tuple[list[str], list[str], list[list[str]]]:
    rows = [f"L{l}" for l in range(matrix.shape[0])]
    cols = [f"H{h}" for h in range(matrix.shape[1])]
    text = [[f"{v:+.2f}" for v in row] for row in matrix.tolist()]
    return rows, cols, text


def head_heatmap_html(result: DLAResult, *, batch: int = 0, pos: int = -1,
                      direction: int = 0) -> str:
    """Layer × head table coloured red (against) to blue (for) the direction."""
    matrix = result.head_matrix(batch, pos, direction)
    rows, cols, text = _head_labels(matrix)
    m = _symmetric(matrix)
    return heatmap_html(matrix.tolist(), rows, cols, cell_text=text, cmap="RdBu", vmin=-m,
                        vmax=m, caption=f"head DLA on {result.directions[direction]}:")


def top_bars_html(result: DLAResult, k: int = 20, *, batch: int = 0, pos: int = -1,
                  direction: int = 0) -> str:
    """The k components with the largest |attribution|, as bars."""
    top = result.top(k, batch=batch, pos=pos, direction=direction)
    return bars_html(list(top.labels), top.cell(batch, pos, direction).tolist())


def tokens_html(result: DLAResult, labels: Sequence[str] | None = None, *,
                batch: int = 0, direction: int = 0) -> str:
    """Circuitsvis tokens coloured by attribution per position (needs ``positions=None``).

    ``labels``: components to show one colouring each (default: the total, i.e. the logit).
    """
    import circuitsvis.tokens

    n_tokens = result.tokens.shape[1]
    if result.positions != list(range(n_tokens)):
        raise ValueError("tokens_html needs a result over every position (positions=None)")
    real = result.mask[batch].cpu()  # the prompt's own tokens, never its padding
    columns = result.columns[batch][real].tolist()
    tokens = [result.str_tokens[batch][c] if result.str_tokens
              else str(int(result.tokens[batch, c])) for c in columns]
    if labels is None:
        values = result.total()[batch, real, direction]
        return circuitsvis_html(circuitsvis.tokens.colored_tokens(tokens, values))
    values = result[list(labels)].values[:, batch, real, direction].T.contiguous()
    return circuitsvis_html(
        circuitsvis.tokens.colored_tokens_multi(tokens, values, labels=list(labels)))


def paths_table_html(paths: HeadPathResult, k: int = 15, *, batch: int = 0,
                     direction: int = 0) -> str:
    """The k largest source → head → logit paths as a table."""
    top = paths.top(k, batch=batch, direction=direction)
    rows = [(label, f"{v:+.4f}") for label, v in top.items(batch, 0, direction)]
    return table_html(["path", "attribution"], rows)


def report_html(result: DLAResult, *, title: str = "Direct logit attribution",
                by_position: DLAResult | None = None,
                paths: HeadPathResult | None = None, k: int = 20, batch: int = 0,
                direction: int = 0) -> str:
    """A full page: summary, head heatmap, top-k bars, optional token view and path table."""
    pos = len(result.positions) - 1
    where = int(result.columns[batch, pos])  # the token this prompt read there
    shown = (result.str_tokens[batch][where] if result.str_tokens
             else int(result.tokens[batch, where]))
    summary = (f"<p class='note'>direction {esc(result.directions[direction])} at position "
               f"{result.positions[pos]} ({esc(repr(shown))}): model value "
               f"{float(result.logits[batch, pos, direction]):+.4f}, sum of parts "
               f"{float(result.total()[batch, pos, direction]):+.4f}, frozen final-norm scale "
               f"{float(result.scale[batch, pos]):.4g}.</p>")
    sections = [summary]
    try:
        sections += ["<h2>Heads</h2>", head_heatmap_html(result, batch=batch, pos=pos,
                                                         direction=direction)]
    except ValueError:
        pass  # a result without per-head components
    sections += [f"<h2>Top {k} components</h2>",
                 top_bars_html(result, k, batch=batch, pos=pos, direction=direction)]
    if by_position is not None:
        known = set(by_position.labels)
        top = [label for label in result.top(6, batch=batch, pos=pos, direction=direction).labels
               if label != "b_U" and label in known][:5]
        sections += ["<h2>Attribution per position</h2>",
                     "<p class='note'>Each token coloured by the sum of all parts at that "
                     "position (the logit there), then by each of the top components.</p>",
                     tokens_html(by_position, batch=batch, direction=direction),
                     tokens_html(by_position, top or None, batch=batch, direction=direction)]
    if paths is not None:
        sections += [f"<h2>Top paths through heads (destination {paths.position})</h2>",
                     paths_table_html(paths, k, batch=batch, direction=direction)]
    return page(title, *sections)


def write_report(path, result: DLAResult, **kwargs) -> Path:
    """Write :func:`report_html` to ``path``."""
    path = Path(path)
    path.write_text(report_html(result, **kwargs), encoding="utf-8")
    return path


def head_heatmap_png(result: DLAResult, path, *, batch: int = 0, pos: int = -1,
                     direction: int = 0) -> Path:
    """Layer × head heatmap as a PNG."""
    matrix = result.head_matrix(batch, pos, direction)
    rows, cols, text = _head_labels(matrix)
    m = _symmetric(matrix)
    return heatmap_png(path, matrix.tolist(), rows, cols, cell_text=text, cmap="RdBu",
                       vmin=-m, vmax=m, colorbar_label="logit attribution",
                       title=f"head DLA: {result.directions[direction]}")


def top_bars_png(result: DLAResult, path, k: int = 20, *, batch: int = 0, pos: int = -1,
                 direction: int = 0) -> Path:
    """Top-k components as a horizontal bar chart PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = result.top(k, batch=batch, pos=pos, direction=direction)
    values = top.cell(batch, pos, direction).tolist()[::-1]
    labels = list(top.labels)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.28 * len(values) + 1.2))
    ax.barh(range(len(values)), values,
            color=["#3b6fb6" if v >= 0 else "#c0392b" for v in values])
    ax.set_yticks(range(len(values)), labels, fontsize=8)
    ax.axvline(0, color="#444", linewidth=0.6)
    ax.set_xlabel(f"attribution to {result.directions[direction]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


__all__ = ["head_heatmap_html", "top_bars_html", "tokens_html", "paths_table_html",
           "report_html", "write_report", "head_heatmap_png", "top_bars_png"]
