"""Views of a direct logit attribution: head heatmap, top-k bars, attention, token colouring.

HTML is self-contained (tl_lenses.viz.html; circuitsvis views inline their own JS); figures
come from matplotlib (PNG, SVG or PDF by suffix, text drawn literally). Every view reads one
(batch, direction) cell of a DLA result; the attention patterns of the top heads show when
the result carries them (``result.with_attention(model)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from tl_lenses.viz.html import (
    bars_html,
    circuitsvis_html,
    circuitsvis_tokens,
    esc,
    heatmap_html,
    page,
    show_text,
    table_html,
)
from tl_lenses.viz.static import check_figure_path, figure_style, heatmap_png, save_figure

# Inline, attention patterns show this many positions (ending at the attributed token):
# 4 heads over 500 tokens were 15 MB of notebook output; show() draws every position.
MAX_INLINE_ATTENTION = 64

if TYPE_CHECKING:  # views import result types for type checkers only (no import cycle)
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


def _tokens(result, batch: int) -> list[str]:
    return (result.str_tokens[batch] if result.str_tokens
            else [str(t) for t in result.tokens[batch].tolist()])


def head_heatmap_html(result: DLAResult, *, batch: int = 0, pos: int = -1,
                      direction: int = 0) -> str:
    """Layer × head table coloured red (against) to blue (for) the direction."""
    matrix = result.head_matrix(batch, pos, direction)
    rows, cols, text = _head_labels(matrix)
    tips = [[f"{r}{c}: {v:+.4f}" for c, v in zip(cols, row)] for r, row in
            zip(rows, matrix.tolist())]
    m = _symmetric(matrix)
    return heatmap_html(matrix.tolist(), rows, cols, cell_text=text, tooltips=tips,
                        cmap="RdBu", vmin=-m, vmax=m,
                        caption=f"head DLA on {show_text(result.directions[direction])}:")


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
    tokens = circuitsvis_tokens([_tokens(result, batch)[c] for c in columns])
    if labels is None:
        values = result.total()[batch, real, direction]
        return circuitsvis_html(circuitsvis.tokens.colored_tokens(tokens, values))
    values = result[list(labels)].values[:, batch, real, direction].T.contiguous()
    return circuitsvis_html(
        circuitsvis.tokens.colored_tokens_multi(tokens, values, labels=list(labels)))


def attention_html(attention: dict | None, tokens: Sequence[str], *, batch: int = 0,
                   title: str = "Attention patterns of the top heads",
                   mask: torch.Tensor | None = None, focus: int | None = None,
                   window: int | None = None) -> str:
    """Circuitsvis attention patterns of the heads in ``attention`` (label -> pattern).

    Only the prompt's own tokens are drawn (a padded batch's pads are left out). With
    ``window``, a longer prompt shows the ``window`` positions ending at ``focus`` (queries
    and keys alike), so a notebook cell holds a few hundred kB instead of megabytes.

    Args:
        attention: head label -> ``[batch, query_pos, key_pos]`` pattern, or None.
        tokens: the prompt's tokens, one per column of the patterns (shown literally).
        batch: which prompt.
        title: the section's heading.
        mask: ``[batch, pos]``, True at the columns that are tokens (None: all).
        focus: the column the window ends at (default: the prompt's last token).
        window: the most positions drawn (None: all).

    Returns:
        An HTML section, or "" when there are no patterns.
    """
    if not attention:
        return ""
    from circuitsvis.utils.render import render

    labels = list(attention)
    patterns = torch.stack([attention[label][batch] for label in labels])
    own = (torch.arange(len(tokens)) if mask is None
           else mask[batch].cpu().nonzero().flatten())
    if window is None or len(own) <= window:
        start, end = 0, len(own)
    else:  # the window ends at the focus token (its attention row is the one that matters)
        end = len(own) if focus is None else max(int((own <= focus).sum()), window)
        start = end - window
    keep = own[start:end]
    shown = patterns[:, keep][:, :, keep]
    # AttentionPatterns is what circuitsvis.attention.attention_patterns renders; called
    # through render() to pass headLabels, so heads read "L12H3" instead of "Head 0".
    # Four decimals: float32's digits as JSON tripled the page for no visible difference.
    view = render("AttentionPatterns", tokens=circuitsvis_tokens([tokens[i] for i in keep]),
                  attention=shown.double().round(decimals=4).tolist(), headLabels=labels)
    note = ("<p class='note'>Where each head reads from (destination row, source column); "
            "hover a head to focus it, hover a token to see its attention.")
    if len(keep) < len(own):
        note += (f" Showing positions {start}-{end - 1} of the prompt's {len(own)} (its "
                 f"earlier tokens are left out); <code>result.show()</code> draws all.")
    return f"<h2>{esc(title)}</h2>{note}</p>{circuitsvis_html(view)}"


def paths_table_html(paths: HeadPathResult, k: int = 15, *, batch: int = 0,
                     direction: int = 0) -> str:
    """The k largest source → head → logit paths as a table."""
    top = paths.top(k, batch=batch, direction=direction)
    rows = [(label, f"{v:+.4f}") for label, v in top.items(batch, 0, direction)]
    return table_html(["path", "attribution"], rows)


def _summary(result: DLAResult, batch: int, pos: int, direction: int) -> str:
    where = int(result.columns[batch, pos])  # the token this prompt read there
    shown = _tokens(result, batch)[where]
    return (f"<p class='note'>prompt {batch}, direction "
            f"{esc(show_text(result.directions[direction]))} at position "
            f"{result.positions[pos]} ({esc(repr(shown))}): model value "
            f"{float(result.logits[batch, pos, direction]):+.4f}, sum of the {len(result)} "
            f"components here {float(result.total()[batch, pos, direction]):+.4f} (equal "
            f"when all are kept, not after heads() or top()), frozen final-norm scale "
            f"{float(result.scale[batch, pos]):.4g}.</p>")


def sections(result: DLAResult, *, k: int = 20, batch: int | None = None,
             pos: int | None = None, direction: int | None = None,
             by_position: DLAResult | None = None,
             attention_window: int | None = None) -> list[str]:
    """Summary, head heatmap, top-k bars, attention of the top heads, optional token view.

    The cell shown: ``batch``, ``pos`` (a negative one counts back over the prompt's own
    cells: -1 is its last token) and ``direction``; unset ones come from the cell the result
    was ranked by (``top``/``sort``), else prompt 0's last token along direction 0. The
    attention shows at most ``attention_window`` positions, ending at that cell's token.
    """
    batch, pos, direction = result._ranked_cell(batch, pos, direction)
    out = [_summary(result, batch, pos, direction)]
    try:
        out += ["<h2>Heads</h2>", head_heatmap_html(result, batch=batch, pos=pos,
                                                    direction=direction)]
    except ValueError:
        pass  # a result without per-head components
    out += [f"<h2>Top {k} components</h2>",
            top_bars_html(result, k, batch=batch, pos=pos, direction=direction),
            attention_html(result.attention, _tokens(result, batch), batch=batch,
                           mask=result.attention_mask, focus=int(result.columns[batch, pos]),
                           window=attention_window)]
    if by_position is not None:
        shown_direction = _companion_direction(result, by_position, "by_position", direction)
        known = set(by_position.labels)
        top = [label for label in result.top(6, batch=batch, pos=pos, direction=direction).labels
               if label != "b_U" and label in known][:5]
        out += ["<h2>Attribution per position</h2>",
                "<p class='note'>Each token coloured by the sum of all parts at that "
                "position (the logit there), then by each of the top components.</p>",
                tokens_html(by_position, batch=batch, direction=shown_direction),
                tokens_html(by_position, top or None, batch=batch, direction=shown_direction)]
    return out


def notebook_view(result: DLAResult, full: bool = False, *, k: int | None = None,
                  batch: int | None = None, pos: int | None = None,
                  direction: int | None = None) -> str:
    """The inline view: summary, heads, top components (12 inline, 20 in full), attention.

    The cell shown as in :func:`sections`.
    """
    k = k or (20 if full else 12)
    by_position = result if full and result.positions == list(range(result.tokens.shape[1])) \
        and len(result.positions) > 1 else None
    return "".join(sections(result, k=k, batch=batch, pos=pos, direction=direction,
                            by_position=by_position,
                            attention_window=None if full else MAX_INLINE_ATTENTION))


def report_html(result: DLAResult, *, title: str = "Direct logit attribution",
                by_position: DLAResult | None = None,
                paths: HeadPathResult | None = None, k: int = 20, batch: int | None = None,
                pos: int | None = None, direction: int | None = None) -> str:
    """A full page: summary, head heatmap, top-k bars, optional token view and path table.

    The cell shown as in :func:`sections` (the path table: that prompt and direction).

    Raises:
        ValueError: ``by_position`` or ``paths`` is a result for other tokens than
            ``result``, or lacks the direction shown (they would be drawn as if they
            explained it).
    """
    batch, pos, direction = result._ranked_cell(batch, pos, direction)  # once, for both
    path_direction = None if paths is None else _companion_direction(result, paths, "paths",
                                                                     direction)
    body = sections(result, k=k, batch=batch, pos=pos, direction=direction,
                    by_position=by_position)
    if paths is not None:
        body += [f"<h2>Top paths through heads (destination {paths.position})</h2>",
                 paths_table_html(paths, k, batch=batch, direction=path_direction)]
    return page(title, *body)


def _companion_direction(result: DLAResult, other, argument: str, direction: int) -> int:
    """The index in ``other`` of the direction shown; refuse a result of other tokens."""
    if not (other.tokens.shape == result.tokens.shape
            and torch.equal(other.tokens.cpu(), result.tokens.cpu())):
        raise ValueError(f"{argument} is a result for other tokens than the DLA result "
                         f"(shapes {tuple(other.tokens.shape)} and "
                         f"{tuple(result.tokens.shape)}); compute it on the same input")
    label = result.directions[direction]
    if label not in other.directions:
        raise ValueError(f"{argument} attributes directions {other.directions}, not "
                         f"{label!r}, the direction shown; compute it for that direction")
    return list(other.directions).index(label)


def write_report(path, result: DLAResult, **kwargs) -> Path:
    """Write :func:`report_html` to ``path``."""
    path = Path(path)
    path.write_text(report_html(result, **kwargs), encoding="utf-8")
    return path


def paths_view(paths: HeadPathResult, full: bool = False, *, k: int | None = None,
               batch: int = 0, direction: int = 0) -> str:
    """Head paths inline: each head's total, the top paths, the heads' attention."""
    k = k or (30 if full else 12)
    totals = paths.head_totals()[:, batch, direction].tolist()
    note = (f"<p class='note'>{len(paths.heads)} heads x {len(paths.sources)} sources x "
            f"{paths.values.shape[3]} source positions, destination position "
            f"{paths.position}, direction {esc(show_text(paths.directions[direction]))}."
            f"{'' if full else ' <code>paths.show()</code> lists more paths.'}</p>")
    return (note + "<h2>Head totals</h2>" + bars_html(list(paths.heads), totals)
            + f"<h2>Top {k} paths</h2>"
            + paths_table_html(paths, k, batch=batch, direction=direction)
            + attention_html(paths.attention, _tokens(paths, batch), batch=batch,
                             title="Attention patterns of these heads", mask=paths.mask,
                             focus=None if paths.destinations is None
                             else int(paths.destinations[batch]),
                             window=None if full else MAX_INLINE_ATTENTION))


def head_heatmap_png(result: DLAResult, path, *, batch: int = 0, pos: int = -1,
                     direction: int = 0) -> Path:
    """Layer × head heatmap as a figure (PNG, SVG or PDF by suffix)."""
    matrix = result.head_matrix(batch, pos, direction)
    rows, cols, text = _head_labels(matrix)
    m = _symmetric(matrix)
    return heatmap_png(path, matrix.tolist(), rows, cols, cell_text=text, cmap="RdBu",
                       vmin=-m, vmax=m, colorbar_label="direct logit attribution (logits)",
                       title=f"head DLA: {show_text(result.directions[direction])}",
                       max_cols=max(16, len(cols)))


def top_bars_png(result: DLAResult, path, k: int = 20, *, batch: int = 0, pos: int = -1,
                 direction: int = 0) -> Path:
    """Top-k components as a horizontal bar chart (PNG, SVG or PDF by suffix)."""
    import matplotlib.pyplot as plt

    check_figure_path(path)
    top = result.top(k, batch=batch, pos=pos, direction=direction)
    values = top.cell(batch, pos, direction).tolist()[::-1]
    labels = [show_text(label) for label in top.labels][::-1]
    with figure_style():
        fig, ax = plt.subplots(figsize=(4.5, 0.18 * len(values) + 1.0))
        ax.barh(range(len(values)), values,
                color=["#3b6fb6" if v >= 0 else "#c0392b" for v in values])
        ax.set_yticks(range(len(values)), labels)
        ax.axvline(0, color="#444", linewidth=0.6)
        ax.set_xlabel(f"attribution to {show_text(result.directions[direction])} (logits)")
    return save_figure(fig, path)


__all__ = ["head_heatmap_html", "top_bars_html", "tokens_html", "attention_html",
           "paths_table_html", "report_html", "write_report", "notebook_view", "paths_view",
           "head_heatmap_png", "top_bars_png"]
