"""Attention patterns of chosen heads, kept beside a DLA result so its view can show them.

The DLA of a head says how much it wrote toward the answer; its attention pattern says
where it read from. Views show both (circuitsvis's attention patterns, the ecosystem's
habit); the patterns come from one extra cached forward pass over the result's tokens
(with its attention mask, so a padded prompt's pattern is the one it has run alone),
keeping only the chosen layers' ``attn.hook_pattern``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tl_lenses.hooks import run_cache
from tl_lenses.inputs import to_batch


def head_patterns(
    model, tokens, heads: Sequence[tuple[int, int]], *,
    attention_mask: Tensor | None = None,
) -> Float[Tensor, "head_index batch query_pos key_pos"]:
    """The attention pattern of each ``(layer, head)`` on ``tokens``.

    Args:
        model: a HookedTransformer or TransformerBridge.
        tokens: ``[batch, pos]`` token ids (the prompts a DLA result was computed on).
        heads: ``(layer, head)`` pairs, in the order wanted.
        attention_mask: ``[batch, pos]``, 1 or True at tokens, 0 at pads (None: all
            tokens). It goes to the model as in the result's own run: without it a
            left-padded prompt's tokens would attend to its pads.

    Returns:
        ``[head, batch, query_pos, key_pos]`` attention probabilities (rows sum to 1;
        ``blocks.{l}.attn.hook_pattern``, a GQA head's own query pattern).

    Raises:
        ValueError: for a head outside the model.
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    bad = [(l, h) for l, h in heads if not (0 <= l < n_layers and 0 <= h < n_heads)]
    if bad:
        raise ValueError(f"heads must be (layer, head) inside the model's {n_layers} layers x "
                         f"{n_heads} heads, got {bad}")
    if not heads:
        return torch.zeros(0, *tokens.shape, tokens.shape[-1])
    names = sorted({f"blocks.{l}.attn.hook_pattern" for l, _ in heads})
    if attention_mask is not None:  # to_batch reads the padding side off the mask
        tokens = to_batch(model, tokens, attention_mask=attention_mask.to(tokens.device))
    cache = run_cache(model, tokens, names)
    return torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][:, h].float().cpu()
                        for l, h in heads])


__all__ = ["head_patterns"]
