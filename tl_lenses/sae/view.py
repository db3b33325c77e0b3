"""Views for SAEs: the latent-lens table, and a DLA's top latents beside heads and MLPs.

Self-contained HTML from :mod:`tl_lenses.viz.html`; result types are imported for type
checking only, so this module imports no method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tl_lenses.sae.latents import parse_latent_label
from tl_lenses.viz.html import bars_html, esc, page, show_token, table_html

if TYPE_CHECKING:
    from tl_lenses.attribution.result import DLAResult
    from tl_lenses.sae.decoder_lens import LatentLensResult


def latent_lens_html(result: LatentLensResult, *, digits: int = 2) -> str:
    """A table: one row per latent, its promoted and suppressed tokens with their values."""
    def cell(pairs) -> str:
        return "  ".join(f"{show_token(token)} {value:+.{digits}f}" for token, value in pairs)

    rows = [(row["label"], cell(row["top"]), cell(row["bottom"])) for row in result.rows()]
    note = (f"<p class='note'>{esc(result.lens)} of each latent's decoder row at "
            f"{esc(result.site)}: logits per unit activation (final-norm scale 1).</p>")
    return note + table_html(["latent", "promotes", "suppresses"], rows)


def latent_lens_page(result: LatentLensResult, *, title: str | None = None) -> str:
    """A complete page holding :func:`latent_lens_html`."""
    return page(title or f"SAE latents at {result.site}", latent_lens_html(result))


def _groups(result: DLAResult) -> dict[str, list[int]]:
    """Component indices split into SAE latents, attention heads and everything else."""
    from_label = {"latents": [], "heads": [], "other": []}
    for i, label in enumerate(result.labels):
        if parse_latent_label(label):
            from_label["latents"].append(i)
        elif label.startswith("L") and "H" in label and " " not in label:
            from_label["heads"].append(i)
        else:
            from_label["other"].append(i)
    return from_label


def top_latents_html(result: DLAResult, k: int = 10, *, batch: int = 0, pos: int = -1,
                     direction: int = 0) -> str:
    """Three bar charts side by side: the top ``k`` SAE latents, heads, and other writers.

    "Other" holds the MLPs, biases, embeddings and the SAE's ``b_dec`` and error terms;
    ranking is by |attribution| at one (batch, pos, direction) cell of ``result``.
    """
    column = result.cell(batch, pos, direction)
    blocks = []
    for name, index in _groups(result).items():
        order = sorted(index, key=lambda i: -abs(float(column[i])))[:k]
        bars = bars_html([result.labels[i] for i in order], [float(column[i]) for i in order])
        blocks.append(f"<div style='margin-right:24px'><h2>top {esc(name)}</h2>"
                      f"{bars or '<p class=note>none</p>'}</div>")
    total = float(column.sum())
    note = (f"<p class='note'>direction {esc(result.directions[direction])}; all parts sum to "
            f"{total:+.4g} (model: {float(result.logits[batch, pos, direction]):+.4g}).</p>")
    return note + f"<div style='display:flex;align-items:flex-start'>{''.join(blocks)}</div>"


def top_latents_page(result: DLAResult, k: int = 10, *, title: str = "Which latents write "
                     "this logit?", **cell) -> str:
    """A complete page holding :func:`top_latents_html`."""
    return page(title, top_latents_html(result, k, **cell))


__all__ = ["latent_lens_html", "latent_lens_page", "top_latents_html", "top_latents_page"]
