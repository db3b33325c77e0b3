"""The logit lens (nostalgebraist 2020): decode every layer as if it were the last.

Seed formula: ``logits_l = LayerNorm(z_l) W_U`` for every layer ``l <= L``, each row
re-normalised with its own statistics.
"""

from __future__ import annotations

from typing import Sequence

from jaxtyping import Float
from torch import Tensor

from tl_lenses.readout.apply import apply_lens
from tl_lenses.readout.engine import Target
from tl_lenses.readout.result import LensResult
from tl_lenses.typing import IntLike


class LogitLens:
    """The logit lens as a :class:`~tl_lenses.readout.lens.Lens`: the identity translation."""

    name = "logit lens"

    def translate(
        self, resid: Float[Tensor, "*rows d_model"], hook_name: str
    ) -> Float[Tensor, "*rows d_model"]:
        """Return ``resid`` itself (the readout then reuses the final logits where it can)."""
        return resid

    def __repr__(self) -> str:
        return "LogitLens()"


def logit_lens(
    model,
    input,
    *,
    hook_names: Sequence[str] | None = None,
    layers: Sequence[IntLike] | None = None,
    incl_mid: bool = False,
    positions: IntLike | Sequence[IntLike] | None = None,
    k: int = 5,
    target: Target = "final",
    chunk_size: int | None = None,
    keep_logits: bool = False,
    progress: bool = False,
    fused: bool | None = None,
    padding_side: str | None = None,
    attention_mask: Tensor | None = None,
) -> LensResult:
    """The logit lens of ``input`` at every residual-stream layer and position.

    Each row's residual is re-normalised with its own statistics, then unembedded (+ b_U).

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge``.
        input: a string, a list of strings (padded on ``padding_side``), int tokens
            ``[batch, pos]`` (with ``attention_mask`` when padded), or a
            :class:`~tl_lenses.inputs.Batch`. The mask goes to the model, so each
            prompt's numbers equal those of the prompt alone.
        hook_names: residual-width hook points to read (default: the residual stream).
        layers: rows of the residual stream (0 = embedding, ``n_layers`` = final).
        incl_mid: add each block's ``resid_mid``.
        positions: positions to read, counted within each prompt (negative ones from
            each prompt's own end: -1 is every prompt's last token; default all).
        k: how many top tokens to keep per cell.
        target: ``"final"`` (the final layer's top-1), ``"next"`` (the prompt's own next
            token; none at its last, or where the model cannot predict it),
            a one-token string or id, an int ``[batch, pos]`` tensor, or None.
        chunk_size: rows per unembedding matmul (memory ~ ``3 x chunk_size x d_vocab``
            floats); None: 256 on the CPU, on a GPU as many as fit in 640 MiB.
        keep_logits: also return the full ``[layer, batch, pos, d_vocab]`` logits.
        progress: show a progress bar over chunks.
        fused: statistics from tl_lenses' C kernel (True), eager torch passes (False), or
            the fastest that applies (None: the kernel for float32 on the CPU, compiled
            kernels on CUDA).
        padding_side: ``"right"`` or ``"left"`` for a list of strings (None: the
            tokenizer's ``padding_side``).
        attention_mask: for int tokens: 1 marks a token, 0 padding.

    Returns:
        A :class:`~tl_lenses.readout.result.LensResult` on the model's device (inputs may
        be on any device): ``[layer, batch, pos]`` grids of top-k ids/logits/probabilities,
        entropy and KL to final in nats, target rank; pad cells (``result.mask`` False) and
        cells whose logits are not finite have ids and ranks -1 and NaN statistics.

    Raises:
        ValueError: naming the argument, for unknown hook points, out-of-range layers or
            positions, a multi-token target, target ids outside the vocabulary, ``k`` or
            ``chunk_size`` out of range, a bad ``padding_side`` or ``attention_mask``.

    >>> result = logit_lens(model, "The capital of France is", k=3)
    >>> result.top_ids.shape[-1], len(result.hook_names) == model.cfg.n_layers + 1
    (3, True)
    """
    return apply_lens(model, input, LogitLens(), hook_names=hook_names, layers=layers,
                      incl_mid=incl_mid, positions=positions, k=k, target=target,
                      chunk_size=chunk_size, keep_logits=keep_logits, progress=progress,
                      fused=fused, padding_side=padding_side,
                      attention_mask=attention_mask)
