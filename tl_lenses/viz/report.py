"""A lens report: the seed's grids for one prompt, plus a circuitsvis token summary."""

from __future__ import annotations

from pathlib import Path

import torch

from tl_lenses.result import LensResult
from tl_lenses.viz.grid import grid_html, rank_grid_html, side_by_side
from tl_lenses.viz.html import circuitsvis_html, esc, page


def settle_layer(result: LensResult, batch: int = 0) -> torch.Tensor:
    """Per position, the first row from which the target stays rank 1 (len(rows) if never)."""
    if result.target_rank is None:
        raise ValueError("settle_layer needs a result computed with a target")
    is_top = (result.target_rank[:, batch] == 1).flip(0).cumprod(0).flip(0)
    return (is_top.shape[0] - is_top.sum(0)).float()


def tokens_view(result: LensResult, batch: int = 0) -> str:
    """circuitsvis colored_tokens: each token coloured by the row its target settles at."""
    from circuitsvis.tokens import colored_tokens

    values = settle_layer(result, batch)
    tokens = [result.str_tokens[batch][p] for p in result.positions]
    note = (f"<p class='note'>Each token coloured by the first row (0 = embedding) from which "
            f"the {esc(result.target)} stays the lens's top-1. Hover for the value.</p>")
    return note + circuitsvis_html(colored_tokens(tokens=tokens, values=values.tolist()))


def lens_sections(result: LensResult, batch: int = 0) -> list[str]:
    """The standard views of one lens result."""
    sections = [grid_html(result, "prob", batch)]
    if result.target_rank is not None:
        sections.append(rank_grid_html(result, batch))
    sections.append(grid_html(result, "kl", batch))
    return sections


def write_report(path, results: list[LensResult], *, title: str, batch: int = 0,
                 intro: str = "") -> Path:
    """An HTML report: each result's grids side by side (e.g. logit vs tuned lens)."""
    per_result = [lens_sections(r, batch) for r in results]
    rows = [side_by_side(*row) for row in zip(*per_result)]
    extra = [tokens_view(results[0], batch)] if results[0].target_rank is not None else []
    body = [f"<p class='note'>{intro}</p>" if intro else "", *rows, *extra]
    Path(path).write_text(page(title, *body), encoding="utf-8")
    return Path(path)
