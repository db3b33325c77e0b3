"""Lenses on SAE decoder directions: the tokens each latent promotes at its layer.

A latent ``i`` adds ``f_i W_dec[i]`` to the residual stream. Read through a lens at the
SAE's hook point, that direction's effect on the logits (the final norm's scale held fixed,
as in DLA) is ``T(W_dec[i]) · U`` with ``U`` the unembedding seen through the final norm
(its weight folded in, centred for LayerNorm) and ``T`` the linear part of the lens's
translator: the identity for the logit lens (the "top logits" of a latent), ``I + A_l`` for
a tuned lens (Belrose et al. 2023, eq. 3; the bias ``b_l`` moves points, not directions, so
it cancels in ``T(d) - T(0)``). Values are logits per unit of activation at final-norm
scale 1: the DLA of one unit of latent ``i`` onto each token, up to that scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_lenses._ints import as_ints
from tl_lenses.models import check_model
from tl_lenses.readout.fingerprint import check_lens
from tl_lenses.readout.lens import Lens
from tl_lenses.readout.unembed import Unembed
from tl_lenses.sae.latents import decoder_rows, sae_site, site_prefix
from tl_lenses.viz.notebook import NotebookView


@dataclass(frozen=True, repr=False)
class LatentLensResult(NotebookView):
    """Top and bottom tokens of each latent's decoder row, read through one lens.

    ``top_tokens[i, j]`` is the j-th most promoted token of ``latents[i]`` with value
    ``top_values[i, j]`` (logit per unit activation); ``bottom_*`` the most suppressed.
    """

    site: str
    lens: str
    latents: list[int]
    top_tokens: Int[Tensor, "latent k"]
    top_values: Float[Tensor, "latent k"]
    bottom_tokens: Int[Tensor, "latent k"]
    bottom_values: Float[Tensor, "latent k"]
    str_top: list[list[str]] | None = None
    str_bottom: list[list[str]] | None = None

    def __len__(self) -> int:
        return len(self.latents)

    def rows(self) -> list[dict]:
        """One dict per latent: ``latent``, ``label``, ``top`` and ``bottom`` (token, value)."""
        prefix = site_prefix(self.site)
        show = lambda strs, ids: strs if strs is not None else [[f"#{t}" for t in r]  # noqa: E731
                                                                 for r in ids.tolist()]
        top, bottom = show(self.str_top, self.top_tokens), show(self.str_bottom, self.bottom_tokens)
        return [{"latent": latent, "label": f"{prefix} SAE#{latent}",
                 "top": list(zip(top[i], self.top_values[i].tolist())),
                 "bottom": list(zip(bottom[i], self.bottom_values[i].tolist()))}
                for i, latent in enumerate(self.latents)]

    def to_html(self, path=None, *, title: str | None = None) -> str:
        """The table view of :func:`tl_lenses.sae.view.latent_lens_html` (written to ``path``)."""
        from tl_lenses.sae.view import latent_lens_page

        html = latent_lens_page(self, title=title)
        if path is not None:
            Path(path).write_text(html, encoding="utf-8")
        return html

    def _view_html(self, full: bool = False, **view) -> str:
        from tl_lenses.sae.view import latent_lens_html

        return latent_lens_html(self, **view)


def readout_matrix(model) -> Float[Tensor, "d_model d_vocab"]:
    """``U`` with ``logits = x · U`` for a direction ``x`` under a frozen final-norm scale 1.

    Folds the final norm's weight in and, for LayerNorm, its centering (centering ``x`` is
    the same as centering ``U`` over d_model). ``b_U`` is left out: a direction moves the
    logits, it does not set them.
    """
    unembed = Unembed.from_model(model)
    U = unembed.W_U.detach().float()
    if unembed.weight is not None:
        U = U * unembed.weight.detach().float()[:, None]
    if unembed.kind == "layernorm":
        U = U - U.mean(0, keepdim=True)
    return U


def latent_directions(
    model, sae, lens: Lens | None = None, latents: Sequence[int] | None = None,
) -> Float[Tensor, "latent d_model"]:
    """Each latent's decoder row as the lens sees it at the SAE's hook point.

    Raises:
        ValueError: the SAE does not write d_model-wide vectors at a block hook, or a latent
            index is out of range.
    """
    check_lens(model, lens)
    site = sae_site(sae)
    site_prefix(site)  # a d_model-wide block hook, or a clear error
    rows = decoder_rows(sae)
    if rows.shape[-1] != model.cfg.d_model:
        raise ValueError(f"sae writes width {rows.shape[-1]}, not d_model={model.cfg.d_model}")
    index = _check_latents(latents, rows.shape[0])
    rows = rows[index].to(model.W_U.device)
    if lens is None:  # the logit lens: the identity
        return rows
    with torch.no_grad():
        # The translator's linear part only: a decoder row is a direction, not a point.
        origin = lens.translate(torch.zeros_like(rows[:1]), site)
        return (lens.translate(rows, site) - origin).float()


def _check_latents(latents, d_sae: int) -> list[int]:
    if latents is None:
        return list(range(d_sae))
    index = [latents] if (ints := as_ints(latents)) is None else ints
    bad = [i for i in index if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < d_sae]
    if bad or not index:
        raise ValueError(
            f"latents must be non-empty ints in [0, d_sae={d_sae}), got {bad or index}"
        )
    return index


def latent_lens(
    model, sae, lens: Lens | None = None, *, latents: Sequence[int] | None = None, k: int = 10,
    chunk_size: int = 1024,
) -> LatentLensResult:
    """The tokens each SAE latent promotes and suppresses, read at the SAE's layer.

    Args:
        model: a HookedTransformer (e.g. sae-lens's HookedSAETransformer) or Bridge.
        sae: a sae-lens SAE writing d_model-wide vectors (``W_dec`` [d_sae, d_model]).
        lens: ``None`` for the logit lens, or any lens with a translator at the SAE's hook
            point (e.g. a :class:`~tl_lenses.lenses.tuned.TunedLens`).
        latents: latent indices (default: all).
        k: tokens kept per latent and side.
        chunk_size: latents decoded per matmul (``chunk_size x d_vocab`` floats at a time).

    Returns:
        A :class:`LatentLensResult`; values are logits per unit activation (see module doc).

    Raises:
        ValueError: bad ``k``, ``latents`` or a non-d_model SAE; the lens's own error when
            it has no translator at the SAE's hook point.
    """
    check_model(model)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    directions = latent_directions(model, sae, lens, latents)
    U = readout_matrix(model)
    k = min(k, U.shape[1])
    tops, bottoms = [], []
    for start in range(0, len(directions), chunk_size):
        logits = directions[start:start + chunk_size] @ U
        tops.append(logits.topk(k, dim=-1))
        bottoms.append(logits.topk(k, dim=-1, largest=False))
    top_ids = torch.cat([t.indices for t in tops]).cpu()
    bottom_ids = torch.cat([b.indices for b in bottoms]).cpu()
    return LatentLensResult(
        site=sae_site(sae), lens=getattr(lens, "name", "logit lens") if lens else "logit lens",
        latents=_check_latents(latents, decoder_rows(sae).shape[0]),
        top_tokens=top_ids, top_values=torch.cat([t.values for t in tops]).cpu(),
        bottom_tokens=bottom_ids, bottom_values=torch.cat([b.values for b in bottoms]).cpu(),
        str_top=_strings(model, top_ids), str_bottom=_strings(model, bottom_ids),
    )


def _strings(model, ids: Tensor) -> list[list[str]] | None:
    if getattr(model, "tokenizer", None) is None:
        return None
    return [[model.to_string([t]) for t in row] for row in ids.tolist()]


__all__ = ["LatentLensResult", "latent_lens", "latent_directions", "readout_matrix"]
