"""Views of the attribute lens: its grid beside the logit lens, and LRE metric sweeps."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tl_lenses.lenses.attribute.lens import attribute_lens
from tl_lenses.lenses.attribute.lre import LRE
from tl_lenses.lenses.attribute.metrics import Score, Sweep
from tl_lenses.lenses.logit import logit_lens
from tl_lenses.readout.result import LensResult
from tl_lenses.readout.view import grid_html, side_by_side
from tl_lenses.viz.html import esc, page, table_html


def _grid(result: LensResult, title: str) -> str:
    return grid_html(result, "prob", 0, title=title)


def attribute_lens_page(model, prompt: str, lre: LRE, *, k: int = 5) -> tuple[str, LensResult,
                                                                          LensResult]:
    """(HTML page, attribute-lens result, logit-lens result) for one prompt, side by side."""
    ours = attribute_lens(model, prompt, lre, k=k)
    reference = logit_lens(model, prompt, k=k)
    note = (f"<p class='note'>Each cell decodes one residual (row: layer, 0 = embeddings; "
            f"column: token). Left: the attribute lens, LRE(h) = {lre.beta:g}&middot;W h + b "
            f"for the relation {esc(lre.relation)!s} (estimated at layer {lre.layer} from "
            f"{lre.n} subjects), then the final norm and unembedding. Right: the logit lens "
            f"of the same residuals. Colour: probability of the top-1 token; hover a cell "
            f"for its top-{k}.</p>")
    body = side_by_side(_grid(ours, f"attribute lens: {lre.relation}"),
                        _grid(reference, "logit lens"))
    return page(f"Attribute lens: {prompt!r}", note, body), ours, reference


def write_attribute_lens(path, model, prompt: str, lre: LRE, *, png: str | None = None,
                         k: int = 5) -> Path:
    """Write the side-by-side HTML (and, with ``png``, both grids as PNG files)."""
    html, ours, reference = attribute_lens_page(model, prompt, lre, k=k)
    Path(path).write_text(html, encoding="utf-8")
    if png:
        stem = Path(png)
        ours.save_png(stem, "prob", title=f"attribute lens: {lre.relation}")
        reference.save_png(stem.with_name(stem.stem + "_logit" + stem.suffix), "prob",
                           title="logit lens")
    return Path(path)


def scores_table_html(rows: Sequence[Score]) -> str:
    """The metrics table (the LRE and both baselines per relation and layer)."""
    header, cells = Sweep(list(rows)).table()
    return table_html(header, cells)


def sweep_png(path, rows: Sequence[Score], *, x: str = "layer", title: str = "") -> Path:
    """Faithfulness and causality against ``x`` (layer, n, beta or rank), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in ("layer", "n", "beta", "rank"):
        raise ValueError(f"x must be 'layer', 'n', 'beta' or 'rank', got {x!r}")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, metric in zip(axes, ("faithfulness", "causality")):
        for method in dict.fromkeys(r.method for r in rows):
            points = sorted((getattr(r, x), getattr(r, metric)) for r in rows
                            if r.method == method and getattr(r, x) is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.set_xlabel(x)
        ax.set_title(metric, fontsize=10)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
