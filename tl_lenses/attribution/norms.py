"""Norms on a sublayer's output, read at their frozen forward scale for attribution.

Gemma-2 normalises each attention and MLP output before adding it to the residual
(``ln1_post`` / ``ln2_post``; TL's ``use_normalization_before_and_after``), and OLMo-2's
post-norm blocks do the same with ``ln1`` / ``ln2``. With the norm's scale ``s`` frozen at
its forward value (``blocks.{l}.ln1_post.hook_scale``), exactly as the final norm's is, the
sublayer's output ``norm(x) = center(x) / s * w`` is linear in ``x``, so each head's or
neuron's share of it reads the direction ``u`` through ``w`` (and centering) and is divided
by ``s``.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

from tl_lenses._compat import post_norm_architectures
from tl_lenses.readout.unembed import norm_params


@dataclass(frozen=True)
class SublayerNorm:
    """A norm on a sublayer's *output* (before the residual add), read at a frozen scale."""

    name: str                              # "blocks.3.ln1_post"
    kind: str                              # "layernorm" or "rmsnorm"
    weight: Tensor | None

    @property
    def scale_hook(self) -> str:
        """The hook point caching the norm's forward scale."""
        return f"{self.name}.hook_scale"

    def direction(self, u: Float[Tensor, "d_model direction"]) -> Tensor:
        """``u`` as read by the sublayer's raw output: through the weight (and centering)."""
        if self.weight is not None:
            u = u * self.weight.detach().float()[:, None]
        return u - u.mean(0, keepdim=True) if self.kind == "layernorm" else u


def sublayer_norm(model, layer: int, sublayer: str) -> SublayerNorm | None:
    """The norm between ``sublayer`` ("attn" or "mlp") of ``layer`` and the residual, if any.

    Gemma-2 has ``ln1_post`` / ``ln2_post`` (TL's ``use_normalization_before_and_after``);
    OLMo-2's post-norm blocks use ``ln1`` / ``ln2`` there (and nothing on the input) on
    TL 3.x, and ``ln1_post`` / ``ln2_post`` on TL 4.x's Bridge.
    """
    block = model.blocks[layer]
    short = "ln1" if sublayer == "attn" else "ln2"
    if hasattr(block, f"{short}_post"):
        name = f"{short}_post"
    elif _architecture(model) in post_norm_architectures():
        name = short
    else:
        return None
    kind, weight, bias = norm_params(model, getattr(block, name))
    if kind == "none":
        return None
    if bias is not None and bool(bias.detach().any()):
        raise NotImplementedError(
            f"blocks.{layer}.{name} is a norm with a bias after the {sublayer} sublayer; "
            "per-head and per-neuron attribution through it is not supported (use heads=False)"
        )
    return SublayerNorm(f"blocks.{layer}.{name}", kind, weight)


def _architecture(model) -> str | None:
    """The HF architecture (``Olmo2ForCausalLM``); a Bridge's cfg may not carry it."""
    original = getattr(model, "original_model", None)
    if original is not None:
        return type(original).__name__
    return getattr(model.cfg, "original_architecture", None)


__all__ = ["SublayerNorm", "sublayer_norm"]
