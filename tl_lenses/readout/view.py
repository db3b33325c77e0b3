"""The seed's lens grids: layers x positions, the top-1 token (or a number) in each cell.

Rows run from the last layer at the top to the embedding at the bottom, as in the lecture
figures; columns are the prompt's tokens. Hovering a cell shows its top-k tokens with their
probabilities, the entropy, the KL to the final layer and the target's rank. The same grid
is an HTML table (:func:`grid_html`), a notebook view (:func:`notebook_view`), a report
page (:func:`write_report`) and a static figure (:func:`grid_png`: PNG, SVG or PDF).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tl_lenses.viz.html import (
    circuitsvis_html,
    circuitsvis_tokens,
    esc,
    heatmap_html,
    page,
    show_text,
    show_token,
)
from tl_lenses.viz.static import heatmap_png

if TYPE_CHECKING:  # views import result types for type checkers only (no import cycle)
    from tl_lenses.readout.result import LensResult

STATISTICS = ("logit", "prob", "rank", "entropy", "kl", "target_prob", "target_logit")
# How each statistic is coloured: (colour map, log scale). Low ranks, entropies and
# divergences are "good", so their maps run the other way.
COLOURING = {
    "logit": ("viridis", False), "prob": ("viridis", False), "target_prob": ("viridis", False),
    "target_logit": ("viridis", False), "rank": ("viridis_r", True),
    "entropy": ("magma_r", False), "kl": ("magma_r", False),
}
CAPTIONS = {
    "logit": "logit of the top-1 token", "prob": "probability of the top-1 token",
    "rank": "rank of the target", "entropy": "entropy (nats)",
    "kl": "KL(final || layer) (nats)", "target_prob": "probability of the target",
    "target_logit": "logit of the target",
}
# Colour-bar labels with units, for figures.
UNITS = {
    "logit": "top-1 logit", "prob": "top-1 probability", "rank": "target rank (log10 scale)",
    "entropy": "entropy (nats)", "kl": "KL(final || layer) (nats)",
    "target_prob": "target probability", "target_logit": "target logit",
}
MAX_INLINE_POSITIONS = 40  # wider prompts show their last positions inline, all with show()


def _columns(result, columns, batch: int) -> range:
    n = len(result.positions)
    if columns is None:  # up to the prompt's last cell: a shorter prompt's pads are not drawn
        real = result.mask[batch].nonzero()
        return range(int(real[-1]) + 1 if len(real) else n)
    if not isinstance(columns, range) or not (0 <= columns.start <= columns.stop <= n):
        raise ValueError(f"columns must be a range inside [0, {n}], got {columns!r}")
    return columns


def grid_cells(result: LensResult, statistic: str, batch: int, text: str, columns=None):
    """(values, cell_text, tooltips, row_labels, col_labels), rows top = last layer.

    ``columns``: a ``range`` of position indices to keep (default all up to the prompt's
    last one: a shorter prompt of a padded batch shows no trailing pad columns).
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if text not in ("top1", "value"):
        raise ValueError(f"text must be 'top1' or 'value', got {text!r}")
    n_batch = result.tokens.shape[0]
    if isinstance(batch, bool) or not isinstance(batch, int) or not 0 <= batch < n_batch:
        raise ValueError(f"batch must be an int in [0, {n_batch}), got {batch!r}")
    cols = _columns(result, columns, batch)
    values = result.statistic(statistic)[:, batch].cpu()
    tops = result.top_tokens(batch)
    order = list(range(values.shape[0]))[::-1]
    # Pad cells (no token) and cells without finite logits (top-1 id -1) stay blank.
    missing = (result.top_ids[:, batch, :, 0] < 0).cpu()
    values = values.masked_fill(missing, float("nan"))
    cell_text = [["" if missing[l, p] else
                  _cell_text(values[l, p].item(), tops[l][p][0], statistic, text)
                  for p in cols] for l in order]
    tooltips = [[_missing_tooltip(result, l, batch, p) if missing[l, p] else
                 _tooltip(result, l, batch, p, tops[l][p]) for p in cols] for l in order]
    shown = values.log10() if COLOURING[statistic][1] else values
    tokens = result.str_tokens_at(batch)
    col_labels = [show_token(tokens[p]) if tokens[p] else "" for p in cols]
    return ([[shown[l, p].item() for p in cols] for l in order], cell_text, tooltips,
            [result.labels[l] for l in order], col_labels)


def _cell_text(value: float, top1: str, statistic: str, text: str) -> str:
    if text == "top1":
        return show_token(top1)
    if math.isnan(value):
        return ""
    return str(int(value)) if statistic == "rank" else f"{value:.2f}"


def _tooltip(result: LensResult, layer: int, batch: int, pos: int, top: list[str]) -> str:
    probs = result.top_probs[layer, batch, pos].tolist()
    lines = [f"{result.hook_names[layer]} @ pos {result.positions[pos]}"]
    lines += [f"{i + 1}. {show_token(tok)!s:>14}  p={p:.3f}" for i, (tok, p) in
              enumerate(zip(top, probs))]
    lines.append(f"entropy {result.entropy[layer, batch, pos]:.3f} nats, "
                 f"KL to final {result.kl_to_final[layer, batch, pos]:.3f}")
    if result.target_rank is not None and result.target_ids[batch, pos] >= 0:
        target = result.decode([int(result.target_ids[batch, pos])])[0]
        lines.append(f"target {show_token(target)!s} ({result.target}): rank "
                     f"{int(result.target_rank[layer, batch, pos])}, "
                     f"p={result.target_prob[layer, batch, pos]:.3g}")
    return "\n".join(lines)


def _missing_tooltip(result: LensResult, layer: int, batch: int, pos: int) -> str:
    if not result.mask[batch, pos]:
        return ""  # padding: this prompt has no token here
    return (f"{result.hook_names[layer]} @ pos {result.positions[pos]}\n"
            "no finite logits here (a NaN or inf in the residual)")


def grid_html(result: LensResult, statistic: str = "prob", batch: int = 0,
              text: str = "top1", title: str | None = None, columns=None) -> str:
    """An HTML section (no scripts) with the grid; wrap it with ``viz.html.page``."""
    values, cell_text, tooltips, rows, cols = grid_cells(result, statistic, batch, text,
                                                         columns)
    cmap, log_scale = COLOURING[statistic]
    caption = CAPTIONS[statistic] + (" (log10)" if log_scale else "")
    heading = title or f"{result.lens}: {CAPTIONS[statistic]}"
    return (f"<h2>{esc(heading)}</h2>"
            + heatmap_html(values, rows, cols, cell_text=cell_text, tooltips=tooltips,
                           cmap=cmap, caption=caption))


def rank_grid_html(result: LensResult, batch: int = 0, columns=None) -> str:
    """The seed's second figure: the rank of the target (default: final top-1) per cell."""
    return grid_html(result, "rank", batch, text="value",
                     title=f"{result.lens}: rank of {result.target}", columns=columns)


def side_by_side(*sections: str) -> str:
    """Place grids next to each other (e.g. tuned lens beside logit lens)."""
    cells = "".join(f"<div style='flex:1;min-width:0;overflow-x:auto'>{s}</div>"
                    for s in sections)
    return f"<div style='display:flex;gap:24px;align-items:flex-start'>{cells}</div>"


def grid_png(result: LensResult, path, statistic: str = "prob", batch: int = 0,
             text: str = "top1", title: str | None = None, max_cols: int = 16) -> Path:
    """The lens grid as a static figure (PNG, SVG or PDF by the path's suffix).

    Long prompts wrap into panels of ``max_cols`` positions; text is drawn literally.
    """
    values, cell_text, _, rows, cols = grid_cells(result, statistic, batch, text)
    cmap, _ = COLOURING[statistic]
    return heatmap_png(path, values, rows, cols, cell_text=cell_text, cmap=cmap,
                       title=show_text(title or f"{result.lens}: {CAPTIONS[statistic]}"),
                       colorbar_label=UNITS[statistic], max_cols=max_cols)


def settle_layer(result: LensResult, batch: int = 0) -> torch.Tensor:
    """Per position, the first row from which the target stays rank 1 (len(rows) if never)."""
    if result.target_rank is None:
        raise ValueError("settle_layer needs a result computed with a target")
    is_top = (result.target_rank[:, batch] == 1).flip(0).cumprod(0).flip(0)
    return (is_top.shape[0] - is_top.sum(0)).float()


def tokens_view(result: LensResult, batch: int = 0) -> str:
    """Circuitsvis colored_tokens: each token coloured by the row its target settles at."""
    from circuitsvis.tokens import colored_tokens

    real = result.mask[batch].cpu()  # a prompt's own tokens only, never its padding
    values = settle_layer(result, batch)[real]
    tokens = circuitsvis_tokens([t for t, keep in zip(result.str_tokens_at(batch),
                                                      real.tolist()) if keep])
    note = (f"<p class='note'>Each token coloured by the first row (0 = embedding) from which "
            f"the {esc(result.target)} stays the lens's top-1. Hover for the value.</p>")
    return note + circuitsvis_html(colored_tokens(tokens=tokens, values=values.tolist()))


def lens_sections(result: LensResult, batch: int = 0, columns=None) -> list[str]:
    """The standard views of one lens result."""
    sections = [grid_html(result, "prob", batch, columns=columns)]
    if result.target_rank is not None:
        sections.append(rank_grid_html(result, batch, columns=columns))
    sections.append(grid_html(result, "kl", batch, columns=columns))
    return sections


def notebook_view(result: LensResult, full: bool = False, *, statistic: str | None = None,
                  batch: int = 0) -> str:
    """The inline view: probability and rank grids (and, in full, KL and the token view).

    Inline (``full=False``), a prompt longer than ``MAX_INLINE_POSITIONS`` shows its last
    positions with a note; ``result.show()`` shows every position and all grids.
    """
    n = len(result.positions)
    columns = None if full or n <= MAX_INLINE_POSITIONS else range(n - MAX_INLINE_POSITIONS, n)
    n_batch = result.tokens.shape[0]
    which = "" if n_batch == 1 else f", prompt {batch} of {n_batch}"
    head = (f"<p class='note'>{esc(result.lens)}: {len(result.labels)} rows x {n} positions"
            f"{which}; hover a cell for its top-{result.top_ids.shape[-1]}.</p>")
    if columns is not None:
        head += (f"<p class='note'>Showing the last {MAX_INLINE_POSITIONS} of {n} positions; "
                 f"<code>result.show()</code> shows all of them.</p>")
    if statistic is not None:
        return head + grid_html(result, statistic, batch, columns=columns)
    sections = lens_sections(result, batch, columns)
    if not full:
        return head + side_by_side(*sections[:2])
    extra = [tokens_view(result, batch)] if result.target_rank is not None else []
    return head + side_by_side(*sections[:2]) + sections[2] + "".join(extra)


def write_report(path, results: list[LensResult], *, title: str, batch: int = 0,
                 intro: str = "") -> Path:
    """An HTML report: each result's grids side by side (e.g. logit vs tuned lens)."""
    per_result = [lens_sections(r, batch) for r in results]
    rows = [side_by_side(*row) for row in zip(*per_result)]
    extra = [tokens_view(results[0], batch)] if results[0].target_rank is not None else []
    body = [f"<p class='note'>{intro}</p>" if intro else "", *rows, *extra]
    Path(path).write_text(page(title, *body), encoding="utf-8")
    return Path(path)
