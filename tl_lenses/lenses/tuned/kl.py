"""The KL step of tuned-lens training: the loss and its gradient, taken by hand.

d KL / d logits = softmax(lens logits) - p_final, pushed back through the frozen unembedding
with one matmul, so no vocabulary-sized autograd graph is kept and the final layer's
distribution is computed once per batch for all layers; layers are chunked to bound the
``[layers, tokens, d_vocab]`` logits (``max_chunk_elements``).

On CUDA the softmax, the KL and that gradient are one compiled function
(:func:`tl_lenses.devices.compiled`: two passes over the bf16 logits instead of six eager
float32 ones); the CPU path is eager.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_lenses import devices
from tl_lenses.hooks import run_cache
from tl_lenses.lenses.tuned.lens import TunedLens
from tl_lenses.readout.unembed import Unembed


def residuals(model, lens: TunedLens, tokens: Int[Tensor, "batch pos"]
              ) -> tuple[Float[Tensor, "layer rows d_model"], Float[Tensor, "rows d_model"]]:
    """One forward pass: the residual at every hook point of ``lens`` and the final one.

    Each is moved to the lens's device (a model spread over devices caches each layer's
    residual on that layer's device).
    """
    device = lens.bias.device
    cache = run_cache(model, tokens, [*lens.hook_names, lens.final_name])
    stack = torch.stack([cache[name].reshape(-1, lens.d_model).to(device)
                         for name in lens.hook_names])
    return stack.float(), cache[lens.final_name].reshape(-1, lens.d_model).to(device).float()


def kl_backward(model, lens: TunedLens, unembed: Unembed, W: Tensor,
                tokens: Int[Tensor, "batch pos"], max_chunk_elements: int,
                grad_scale: float | None = None) -> Float[Tensor, " layer"]:
    """Accumulate d(sum over layers of KL)/d(lens) for one batch; return each layer's mean KL.

    The gradient is that of the mean over the batch's tokens, or of the sum times
    ``grad_scale`` when given (micro-batches add sums; the step divides by its tokens).
    """
    resids, final = residuals(model, lens, tokens)
    n_layers, n_rows = resids.shape[:2]
    scale = 1.0 / n_rows if grad_scale is None else grad_scale
    with torch.no_grad():
        final_logits = unembed(final)
        final_logp = torch.log_softmax(final_logits, dim=-1)
        final_p = final_logp.exp()
        neg_entropy = (final_p * final_logp).sum(-1)                       # [rows]
    chunk = max(1, max_chunk_elements // (n_rows * unembed.d_vocab))
    kls = []
    for start in range(0, n_layers, chunk):
        rows = list(range(start, min(start + chunk, n_layers)))
        normed = unembed.normalize(lens.translate_stack(resids[rows], rows))
        grad, kl = _kl_grad(normed.detach(), W, unembed.b_U, final_p, neg_entropy)
        normed.backward(grad * scale)
        kls.append(kl.mean(-1))
    return torch.cat(kls)


def _kl_grad(normed, W, b_U, final_p, neg_entropy):
    """(d sum KL / d normed, KL per row) with the softmax gradient computed in place."""
    with torch.no_grad():
        logits = torch.matmul(normed.to(W.dtype), W)                      # [c, rows, vocab]
        if devices.compile_enabled(logits.device):
            softmax_minus_p, kl = fused_kl_grad(logits, final_p, neg_entropy, b_U)
            return torch.matmul(softmax_minus_p, W.T).float(), kl
        logits = logits.float()
        if b_U is not None:
            logits += b_U.float()
        lse = torch.logsumexp(logits, dim=-1)
        kl = neg_entropy - torch.einsum("crv,rv->cr", logits, final_p) + lse
        logits.sub_(lse[..., None]).exp_().sub_(final_p)                   # softmax - p
        grad = torch.matmul(logits.to(W.dtype), W.T).float()
    return grad, kl


def _kl_grad_terms(logits: Tensor, final_p: Tensor, neg_entropy: Tensor, b_U: Tensor | None):
    """(softmax(z) - p_final in z's dtype, KL(p_final || softmax(z)) per row), float32 inside.

    The eager branch of :func:`_kl_grad` in one function, for ``torch.compile`` to fuse
    into two passes over ``z`` (bf16 in the fast recipe) with no float32 copy of it.
    """
    z = logits.float()
    if b_U is not None:
        z = z + b_U.float()
    lse = torch.logsumexp(z, dim=-1)
    kl = neg_entropy - (z * final_p).sum(-1) + lse
    return (torch.exp(z - lse[..., None]) - final_p).to(logits.dtype), kl


fused_kl_grad = devices.compiled(_kl_grad_terms)
