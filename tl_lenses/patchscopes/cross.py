"""Cross-model patchscopes: an affine map between two models' residual spaces.

``fit_affine_map`` runs both models on the same prompts and solves ``h* ~ h @ A + b`` by
least squares over every position where both models see the same token prefix (same
token ids up to and including that position). The fitted :class:`AffineMap` is then the
``transform`` of :func:`tl_lenses.patchscopes.core.patchscope` with ``target_model``.

``rotated_copy`` builds a model whose map is known exactly: the same network with its
residual basis rotated by an orthogonal ``Q`` (every weight reading the residual gets
``Q^T`` on its input side, every weight writing it gets ``Q`` on its output side). It
needs RMS normalisation (``RMSPre`` after folding): ``||hQ|| = ||h||``, but LayerNorm's
mean subtraction does not commute with a rotation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tl_lenses.hooks import resolve_layer, run_cache
from tl_lenses.inputs import one_prompt
from tl_lenses.models import check_model, is_bridge
from tl_lenses.patchscopes.core import AffineMap
from tl_lenses.typing import IntLike
from tl_lenses.viz.brief import brief_repr


@dataclass
class AffineFit:
    """The fitted map and how well it explains the target states (R^2, on the fit data)."""

    map: AffineMap
    r2: float
    n_samples: int

    __repr__ = brief_repr  # one line: tensors by shape, lists by length


def paired_states(
    source_model, target_model, prompts: Sequence[str], source_layer: IntLike,
    target_layer: IntLike,
) -> tuple[Float[Tensor, "rows d_in"], Float[Tensor, "rows d_out"]]:
    """Residual pairs at every position where both models see the same token prefix."""
    _, s_name = resolve_layer(source_model, source_layer, argument="source_layer")
    _, t_name = resolve_layer(target_model, target_layer, argument="target_layer")
    xs, ys = [], []
    for prompt in prompts:
        s_tok = one_prompt(source_model, prompt, argument="prompts")
        t_tok = one_prompt(target_model, prompt, argument="prompts")
        n = min(s_tok.shape[1], t_tok.shape[1])
        same = (s_tok[0, :n].cpu() == t_tok[0, :n].cpu()).long().cumprod(0).sum().item()
        if same == 0:
            continue
        xs.append(_resid(source_model, s_tok, s_name)[:same])
        ys.append(_resid(target_model, t_tok, t_name)[:same])
    if not xs:
        raise ValueError("no prompt has a token prefix both models share; the models' "
                         "tokenizers must agree on at least the first token")
    return torch.cat(xs), torch.cat(ys)


def _resid(model, tokens: Tensor, name: str) -> Tensor:
    return run_cache(model, tokens, [name])[name][0].detach().cpu()


def fit_affine_map(
    source_model, target_model, prompts: Sequence[str], *, source_layer: IntLike,
    target_layer: IntLike, bias: bool = True,
) -> AffineFit:
    """Least-squares ``A, b`` with ``h_target ~ h_source @ A + b`` (float64 solve).

    Needs more shared positions than ``d_model`` (+1 with ``bias``) of the source model, or
    the solution is not unique; a clear error says so.

    >>> fit = fit_affine_map(small, large, texts, source_layer=3, target_layer=5)  # doctest: +SKIP
    >>> patchscope(small, s, t, source_layer=3, target_layer=5, target_model=large,
    ...            transform=fit.map)                                              # doctest: +SKIP
    """
    check_model(source_model, argument="source_model")
    check_model(target_model, argument="target_model")
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of texts")
    x, y = paired_states(source_model, target_model, prompts, source_layer, target_layer)
    need = x.shape[1] + int(bias)
    if x.shape[0] < need:
        raise ValueError(f"fitting a {x.shape[1]}x{y.shape[1]} map needs at least {need} shared "
                         f"positions, the prompts give {x.shape[0]}; pass more or longer prompts")
    design = torch.cat([x, torch.ones(len(x), 1)], 1) if bias else x
    solution = torch.linalg.lstsq(design.double(), y.double()).solution
    A = solution[: x.shape[1]].float()
    b = solution[x.shape[1]].float() if bias else torch.zeros(y.shape[1])
    residual = y.double() - design.double() @ solution
    r2 = 1 - residual.pow(2).sum() / (y.double() - y.double().mean(0)).pow(2).sum()
    device = target_model.cfg.device
    return AffineFit(AffineMap.from_rows(A.to(device), b.to(device)), float(r2),
                     int(x.shape[0]))


# Parameters reading the residual: rotate their d_model (input) axis with Q^T.
_READS = ("W_Q", "W_K", "W_V", "_W_K", "_W_V", "W_in", "W_gate", "W_U")
# Parameters writing the residual: rotate their d_model (output) axis with Q.
_WRITES = ("W_E", "W_pos", "W_O", "b_O", "W_out", "b_out")


def rotated_copy(model, Q: Float[Tensor, "d_model d_model"]):
    """A copy of a HookedTransformer whose residual stream is ``h @ Q`` (Q orthogonal).

    The copy computes the same logits as ``model``; at every layer its residual is the
    original's times ``Q``. Only for RMS-normalised models with folded norms (``RMSPre``).
    """
    if is_bridge(model):
        raise TypeError("rotated_copy needs a HookedTransformer")
    if model.cfg.normalization_type not in ("RMSPre", None):
        raise ValueError(f"rotated_copy needs RMSPre normalisation (folded RMSNorm), got "
                         f"{model.cfg.normalization_type!r}: LayerNorm is not rotation-invariant")
    d = model.cfg.d_model
    if Q.shape != (d, d) or not torch.allclose(Q @ Q.T, torch.eye(d), atol=1e-5):
        raise ValueError(f"Q must be an orthogonal {d}x{d} matrix")
    rotated = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in rotated.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in _READS:  # d_model is the second-to-last axis of each
                param.copy_(Q.T @ param)
            elif leaf in _WRITES:
                param.copy_(param @ Q)
    return rotated


def random_rotation(d: int, seed: int = 0) -> Float[Tensor, "d_model d_model"]:
    """A random orthogonal matrix (QR of a Gaussian, signs fixed)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()
