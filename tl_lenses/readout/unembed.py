"""The model's final norm and unembedding as a plain function of any residual vector.

The logit lens decodes a residual ``h`` as ``norm(h) @ W_U + b_U``, where ``norm``
re-normalises ``h`` with *its own* statistics (mean and RMS of ``h``). TL's
``ActivationCache.apply_ln_to_stack`` by default divides by the final layer's cached scale,
which is right for attributing the final logits but wrong for reading an earlier layer
(TL 3.x's ``accumulated_resid(apply_ln=True)`` does recompute, at the cost of materialising
every layer's full logits when multiplied by ``W_U``).

This module reads the norm's parameters once and applies them functionally: calling
``model.ln_final`` would fire its hook points, and inside a ``run_with_cache`` that would
overwrite the cached ``ln_final`` activations with a lens's intermediate values.

A model with a final logit soft cap (Gemma-2: ``cap * tanh(logits / cap)``) gets it applied
in :meth:`Unembed.project`, so a lens's final row is the model's own (capped) output.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from tl_lenses.models import check_model, is_bridge

NormKind = Literal["layernorm", "rmsnorm", "none"]


def output_vocab(model) -> int:
    """How many ids the model's logits cover (``d_vocab_out``; ``d_vocab`` for most models)."""
    return model.W_U.shape[-1]


@dataclass(frozen=True)
class Unembed:
    """``h -> norm(h) @ W_U + b_U`` with ``norm`` using h's own statistics.

    The tensors are the model's own (no copies), so the decoder follows the model's device
    and never changes its weights.
    """

    kind: NormKind
    eps: float
    weight: Float[Tensor, " d_model"] | None
    bias: Float[Tensor, " d_model"] | None
    W_U: Float[Tensor, "d_model d_vocab"]
    b_U: Float[Tensor, " d_vocab"] | None
    soft_cap: float | None = None

    @classmethod
    def from_model(cls, model, *, spread: bool = False,
                   drop_zero_bias: bool = True) -> "Unembed":
        """Read the final norm and unembedding of a HookedTransformer or Bridge.

        ``spread``: accept a model spread over several devices (tuned-lens training), whose
        final norm and unembedding may sit on different devices (see :meth:`to`).
        ``drop_zero_bias``: read an all-zero ``b_U`` (Llama's) as None, so the
        vocabulary-wide matmuls skip the bias add; that costs a pass over ``b_U`` (~80 us
        on SmolLM2), which DLA, indexing ``b_U`` at a few tokens, skips with False.
        """
        check_model(model, spread=spread)
        if model.cfg.normalization_type is None:  # no final norm: HT has no ln_final at all
            kind, weight, bias = "none", None, None
        else:
            kind, weight, bias = norm_params(model, model.ln_final)
        b_U = getattr(model, "b_U", None)
        if drop_zero_bias and b_U is not None and not b_U.detach().any():
            b_U = None  # all zeros (Llama): a plain matmul is ~5% faster than addmm
        return cls(kind, float(model.cfg.eps), weight, bias, model.W_U, b_U, soft_cap(model))

    def to(self, device: torch.device | str) -> "Unembed":
        """This decoder with its tensors on ``device`` (itself when they are all there)."""
        device = torch.device(device)
        tensors = (self.weight, self.bias, self.W_U, self.b_U)
        if all(t is None or t.device == device for t in tensors):
            return self
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, weight=move(self.weight), bias=move(self.bias),
                       W_U=move(self.W_U), b_U=move(self.b_U))

    def at_least_float32(self) -> "Unembed":
        """This decoder with half-precision tensors cast to float32 once (a copy).

        Softmax statistics over 49k logits lose digits in bf16; casting W_U per call would
        copy it for every chunk.
        """
        if self.W_U.dtype in (torch.float32, torch.float64):
            return self
        cast = lambda t: None if t is None else t.float()  # noqa: E731
        return replace(self, weight=cast(self.weight), bias=cast(self.bias),
                       W_U=self.W_U.float(), b_U=cast(self.b_U))

    @property
    def d_model(self) -> int:
        """Residual width (rows of ``W_U``)."""
        return self.W_U.shape[0]

    @property
    def d_vocab(self) -> int:
        """Vocabulary size (columns of ``W_U``)."""
        return self.W_U.shape[1]

    def normalize(self, resid: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows d_model"]:
        """The final norm applied with ``resid``'s own statistics (computed in float32+)."""
        x = resid if resid.dtype in (torch.float32, torch.float64) else resid.float()
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        if self.kind != "none":
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            x = x * self.weight
        if self.bias is not None:
            x = x + self.bias
        return x

    def __call__(
        self, resid: Float[Tensor, "*rows d_model"], out: Tensor | None = None
    ) -> Float[Tensor, "*rows d_vocab"]:
        """Decode residual vectors into vocabulary logits (into ``out`` when given).

        Reusing an ``out`` buffer matters on the CPU: a fresh 50 MB tensor per chunk costs
        more in page faults than the softmax statistics computed on it.
        """
        if resid.shape[-1] != self.d_model:
            raise ValueError(
                f"resid must end in d_model={self.d_model}, got shape {tuple(resid.shape)}"
            )
        return self.project(self.normalize(resid), out=out)

    def project(
        self, x: Float[Tensor, "*rows d_model"], out: Tensor | None = None
    ) -> Float[Tensor, "*rows d_vocab"]:
        """``x @ W_U + b_U`` for normalised ``x`` (into ``out``), then the model's soft cap.

        The cap (``cap * tanh(z / cap)``) is applied only when the model has one.
        """
        W_U = self.W_U if self.W_U.dtype == x.dtype else self.W_U.to(x.dtype)
        if out is not None and torch.is_grad_enabled() and (x.requires_grad or W_U.requires_grad):
            out = None  # out= is not differentiable; keep the autograd path working
        if self.b_U is None:
            logits = torch.matmul(x, W_U, out=out)
        elif out is not None:
            # addmm adds the bias inside the matmul: no extra pass over [rows, d_vocab].
            flat = x.reshape(-1, x.shape[-1])
            logits = torch.addmm(self.b_U.to(x.dtype), flat, W_U,
                                 out=out.view(-1, out.shape[-1])).view(out.shape)
        else:
            logits = torch.addmm(self.b_U.to(x.dtype), x.reshape(-1, x.shape[-1]), W_U)
            logits = logits.view(*x.shape[:-1], logits.shape[-1])
        return logits if self.soft_cap is None else self.cap(logits)

    def cap(self, logits: Tensor) -> Tensor:
        """The model's soft cap applied to pre-cap ``logits`` (in place unless they need grad).

        Gemma-2's ``final_logit_softcapping``: ``cap * tanh(z / cap)``. The identity for a
        model without one.
        """
        if self.soft_cap is None:
            return logits
        if logits.requires_grad:
            return self.soft_cap * torch.tanh(logits / self.soft_cap)
        return logits.div_(self.soft_cap).tanh_().mul_(self.soft_cap)


def soft_cap(model) -> float | None:
    """The model's final logit soft cap (Gemma-2), or None when it has none."""
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    return float(cap) if cap is not None and cap > 0 else None


def norm_params(model, module) -> tuple[NormKind, Tensor | None, Tensor | None]:
    """(kind, weight, bias) of any of the model's norm modules, on either backend."""
    return (_bridge_norm if is_bridge(model) else _hooked_norm)(model, module)


def _hooked_norm(model, ln) -> tuple[NormKind, Tensor | None, Tensor | None]:
    """(kind, weight, bias) of a HookedTransformer norm module, folded or not."""
    name = type(ln).__name__
    kinds: dict[str, NormKind] = {
        "LayerNorm": "layernorm", "LayerNormPre": "layernorm",
        "RMSNorm": "rmsnorm", "RMSNormPre": "rmsnorm",
    }
    if name not in kinds:
        if isinstance(ln, torch.nn.Identity):
            return "none", None, None
        raise NotImplementedError(f"a norm module of type {name} is not supported")
    return kinds[name], getattr(ln, "w", None), getattr(ln, "b", None)


def _bridge_norm(model, ln) -> tuple[NormKind, Tensor | None, Tensor | None]:
    """(kind, weight, bias) of a Bridge norm component (weight is ones once folded)."""
    original = ln.original_component
    if original is None or isinstance(original, torch.nn.Identity):
        return "none", None, None
    weight = getattr(original, "weight", None)
    if weight is not None and getattr(model.cfg, "rmsnorm_uses_offset", False):
        weight = 1.0 + weight
    kind: NormKind = "rmsnorm" if ln.uses_rms_norm else "layernorm"
    bias = getattr(original, "bias", None) if kind == "layernorm" else None
    return kind, weight, bias
