"""Streaming text through a model for the analyses: checks, batches with a progress bar, caches.

Every analysis reads token rows ``[batch, pos]`` in batches of ``batch_size`` rows, so memory
is bounded by one batch's activations (and whatever ``[d_model, d_model]``-sized sums the
analysis keeps), whatever the amount of text.
"""

from __future__ import annotations

import logging
from typing import Iterator, Mapping, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from tl_lenses.hooks import run_cache
from tl_lenses.models import check_model
from tl_lenses.readout.fingerprint import check_each_lens
from tl_lenses.readout.unembed import output_vocab

logger = logging.getLogger("tl_lenses")


def check_tokens(model, tokens, *, argument: str = "tokens", min_pos: int = 2,
                 scores_next: bool = True) -> Tensor:
    """``tokens`` checked as int rows ``[batch, pos]`` of ids the model knows (pos >= min_pos).

    ``scores_next``: the analysis reads each next token off the logits, so every token after
    a row's first must be in the output vocabulary (TL's algorithmic models predict fewer
    ids than they embed, ``d_vocab_out < d_vocab``; such a token was a bare index error).
    """
    check_model(model)
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
        raise ValueError(f"{argument} must be an int tensor of token rows [batch, pos]")
    if tokens.shape[0] < 1 or not min_pos <= tokens.shape[1] <= model.cfg.n_ctx:
        raise ValueError(f"{argument} must hold >= 1 row of {min_pos}..n_ctx={model.cfg.n_ctx} "
                         f"tokens, got shape {tuple(tokens.shape)}")
    if tokens.min() < 0 or tokens.max() >= model.cfg.d_vocab:
        raise ValueError(f"{argument} has ids outside [0, d_vocab={model.cfg.d_vocab})")
    d_out = output_vocab(model)
    if scores_next and d_out < model.cfg.d_vocab and tokens[:, 1:].max() >= d_out:
        raise ValueError(f"{argument} has next tokens outside the model's output vocabulary "
                         f"[0, d_vocab_out={d_out}), which this analysis scores; the model "
                         "cannot predict them")
    return tokens


def check_positive(**values) -> None:
    """ValueError naming the first argument that is not a positive int."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_lenses(model, lenses, default: dict) -> dict:
    """``lenses`` as a dict name -> lens (``default`` when None or empty), checked.

    Each lens is checked against ``model`` (:func:`tl_lenses.readout.fingerprint.check_each_lens`).

    Raises:
        TypeError: naming ``lenses``, for anything but a mapping of string names to lenses
            (a list ``[LogitLens()]`` is refused: results are keyed by the names).
        ValueError: a lens made for another model.
    """
    if not lenses:
        return dict(default)
    if not isinstance(lenses, Mapping) or not all(isinstance(k, str) for k in lenses):
        raise TypeError(f"lenses must be a dict name -> lens, e.g. {{'logit lens': LogitLens()}}"
                        f", got {type(lenses).__name__}")
    check_each_lens(model, lenses)
    return dict(lenses)


def batches(model, tokens: Int[Tensor, "batch pos"], batch_size: int, *, desc: str,
            progress: bool = True) -> Iterator[Int[Tensor, "batch pos"]]:
    """The rows of ``tokens`` in consecutive batches on the model's device, with a tqdm bar."""
    check_positive(batch_size=batch_size)
    starts = range(0, tokens.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for start in starts:
        yield tokens[start:start + batch_size].to(model.cfg.device)


def cached(model, tokens: Int[Tensor, "batch pos"], names: Sequence[str]) -> dict[str, Tensor]:
    """The activations at ``names`` for one batch, float32, without decoding the logits."""
    cache = run_cache(model, tokens, names)
    return {name: cache[name].float() for name in names}


def frozen_unembed(model):
    """The model's final norm and unembedding, detached (training never touches the model)."""
    from dataclasses import replace

    from tl_lenses.readout.unembed import Unembed

    unembed = Unembed.from_model(model).at_least_float32()
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    return replace(unembed, weight=detach(unembed.weight), bias=detach(unembed.bias),
                   W_U=unembed.W_U.detach(), b_U=detach(unembed.b_U))


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's rank correlation of two 1-D series (average ranks for ties); NaN if constant."""
    rx, ry = _ranks(x.double()), _ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.norm() * ry.norm()).item()
    return float("nan") if denominator == 0 else float((rx @ ry).item() / denominator)


def _ranks(x: Tensor) -> Tensor:
    """1-based ranks with ties given their average rank."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=x.dtype)
    for value in torch.unique(x):
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks
