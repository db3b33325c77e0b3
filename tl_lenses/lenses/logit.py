"""The logit lens: decode every layer and position through the final norm and unembedding."""

from __future__ import annotations

from typing import Sequence

from tl_lenses.lenses.apply import apply_lens
from tl_lenses.lenses.base import LogitLens
from tl_lenses.readout import DEFAULT_CHUNK, Target
from tl_lenses.result import LensResult


def logit_lens(
    model,
    input,
    *,
    hook_names: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    incl_mid: bool = False,
    positions: int | Sequence[int] | None = None,
    k: int = 5,
    target: Target = "final",
    chunk_size: int = DEFAULT_CHUNK,
    keep_logits: bool = False,
    progress: bool = False,
    fused: bool | None = None,
) -> LensResult:
    """The logit lens of ``input`` at every residual-stream layer and position.

    Each row's residual is re-normalised with its own statistics, then unembedded (+ b_U).
    Rows: ``hook_names``, or the residual stream (``layers`` picks rows, 0 = embedding,
    ``n_layers`` = final; ``incl_mid`` adds ``resid_mid``). ``positions``: which columns
    (negative ones count from the end). ``target``: ``"final"`` (the final layer's top-1),
    ``"next"`` (the true next token), a one-token string or id, an int ``[batch, pos]``
    tensor, or None. ``keep_logits`` also returns the full ``[layer, batch, pos, d_vocab]``.
    ``fused``: the statistics from tl_lenses' C kernel (True), from eager torch passes
    (False), or the kernel where it applies and builds (None: float32 on the CPU; see
    :mod:`tl_lenses.row_stats`).

    >>> result = logit_lens(model, "The capital of France is")     # doctest: +SKIP
    >>> result.top_tokens()[-1][-1][0]                                # doctest: +SKIP
    ' Paris'
    """
    return apply_lens(model, input, LogitLens(), hook_names=hook_names, layers=layers,
                      incl_mid=incl_mid, positions=positions, k=k, target=target,
                      chunk_size=chunk_size, keep_logits=keep_logits, progress=progress,
                      fused=fused)
