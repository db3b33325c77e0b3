"""Views of the attribute lens: its grid beside the logit lens, and LRE metric sweeps.

Views take results (they run nothing): compute the attribute-lens and logit-lens results,
then lay them out with :func:`attribute_lens_page`. Figures are PNG, SVG or PDF by suffix.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from tl_lenses.readout.view import grid_html, side_by_side
from tl_lenses.viz.html import esc, image_html, page, show_text, table_html
from tl_lenses.viz.static import check_figure_path, figure_png_bytes, figure_style, save_figure

if TYPE_CHECKING:  # views import result types for type checkers only (no import cycle)
    from tl_lenses.lenses.attribute.lre import LRE
    from tl_lenses.lenses.attribute.metrics import Score
    from tl_lenses.readout.result import LensResult

SWEEP_AXES = ("layer", "n", "beta", "rank")


def _grid(result: LensResult, title: str) -> str:
    return grid_html(result, "prob", 0, title=title)


def attribute_lens_page(ours: LensResult, reference: LensResult, lre: LRE, *,
                        prompt: str) -> str:
    """An HTML page: the attribute lens of ``prompt`` beside the logit lens of the same text.

    Args:
        ours: ``attribute_lens(model, prompt, lre)``.
        reference: ``logit_lens(model, prompt)``.
        lre: the LRE ``ours`` applied.
        prompt: the text both read (for the title).

    Returns:
        The page as text.
    """
    k = ours.top_ids.shape[-1]
    note = (f"<p class='note'>Each cell decodes one residual (row: layer, 0 = embeddings; "
            f"column: token). Left: the attribute lens, LRE(h) = {lre.beta:g}&middot;W h + b "
            f"for the relation {esc(lre.relation)!s} (estimated at layer {lre.layer} from "
            f"{lre.n} subjects), then the final norm and unembedding. Right: the logit lens "
            f"of the same residuals. Colour: probability of the top-1 token; hover a cell "
            f"for its top-{k}.</p>")
    body = side_by_side(_grid(ours, f"attribute lens: {lre.relation}"),
                        _grid(reference, "logit lens"))
    return page(f"Attribute lens: {show_text(prompt)!r}", note, body)


def score_table(rows: Sequence[Score]) -> tuple[list[str], list[list]]:
    """(header, rows) of a metrics table: the LRE and both baselines per relation and layer."""
    header = ["relation", "method", "layer", "n", "beta", "rank", "faithfulness",
              "causality", "held-out correct", "pairs"]
    return header, [[r.relation, r.method, r.layer, r.n, f"{r.beta:g}",
                     "full" if r.rank is None else r.rank, f"{r.faithfulness:.2f}",
                     f"{r.causality:.2f}", r.n_test, r.n_pairs] for r in rows]


def scores_table_html(rows: Sequence[Score]) -> str:
    """The metrics table (the LRE and both baselines per relation and layer)."""
    return table_html(*score_table(list(rows)))


def _sweep_axis(rows: Sequence[Score]) -> str | None:
    """The knob that varies across ``rows`` (layer, n, beta or rank), if exactly one does."""
    varying = [x for x in SWEEP_AXES if len({getattr(r, x) for r in rows}) > 1]
    return varying[0] if len(varying) == 1 else None


def sweep_view(rows: Sequence[Score], full: bool = False) -> str:
    """Inline: the faithfulness/causality plot against the swept knob, and the table."""
    rows = list(rows)
    if not rows:
        return "<p class='note'>no scores</p>"
    x = _sweep_axis(rows)
    plot = (image_html(figure_png_bytes(_sweep_figure(rows, x, "")),
                       f"faithfulness and causality against {x}") if x else "")
    return plot + scores_table_html(rows)


def _sweep_figure(rows: Sequence[Score], x: str, title: str):
    import matplotlib.pyplot as plt

    with figure_style():
        fig, axes = plt.subplots(1, 2, figsize=(6.5, 2.6), sharey=True)
        for ax, metric in zip(axes, ("faithfulness", "causality")):
            for method in dict.fromkeys(r.method for r in rows):
                points = sorted((getattr(r, x), getattr(r, metric)) for r in rows
                                if r.method == method and getattr(r, x) is not None)
                if points:
                    ax.plot(*zip(*points), marker="o", markersize=3, label=show_text(method))
            ax.set_xlabel(x)
            ax.set_title(metric)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("share of held-out subjects")
        axes[0].legend()
        if title:
            fig.suptitle(show_text(title))
    return fig


def sweep_png(path, rows: Sequence[Score], *, x: str = "layer", title: str = "") -> Path:
    """Faithfulness and causality against ``x`` (layer, n, beta or rank), one line per method.

    Written as PNG, SVG or PDF by the path's suffix.
    """
    if x not in SWEEP_AXES:
        raise ValueError(f"x must be 'layer', 'n', 'beta' or 'rank', got {x!r}")
    check_figure_path(path)
    return save_figure(_sweep_figure(list(rows), x, title), path)
