"""Per-row softmax statistics of a block of logits: the inner loop of every lens readout.

For logits ``z`` (one row per layer x position) and the final layer's probabilities
``p_f``, a readout needs the top-k, ``lse = log sum exp z``, ``E_p[z]`` (for the entropy),
``E_{p_f}[z]`` (for the KL) and ``count(z > z_target)`` (for the rank). Two implementations
give the same numbers:

- eager: a blocked top-k, then in-place passes through one scratch buffer (five passes);
- fused: one ``torch.compile``d pass that also returns the maximum of each 128-logit block,
  so the top-k only has to look inside the k best blocks. About 2.5x faster on the CPU;
  compiling costs seconds, once per process and vocabulary size.

``fused=None`` (the readouts' default) picks the fused kernel where the compile pays for
itself: large readouts on the CPU, or any readout once the kernel is compiled.
"""

from __future__ import annotations

import functools
import shutil
import warnings
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

BLOCK = 128
# Row-layers (rows x hook points) above which compiling pays for itself: on SmolLM2's
# vocabulary the fused kernel saves ~50 us per row-layer (10 vs 22 ms per 256), and a
# compile costs ~17 s on a cold inductor cache, ~6 s on a warm one (2-core CPU).
AUTO_FUSED_MIN_ROWS = 200_000
_warm: set[tuple[str, int, torch.dtype]] = set()   # (device type, vocab, dtype) compiled
_broken: list[str] = []                             # why compiling failed, once per process


class RowStats(NamedTuple):
    """Statistics of ``[..., d_vocab]`` logits (``sum_exp`` and ``e_z`` relative to
    ``row_max``: ``sum_exp = sum exp(z - max)``, ``e_z = sum exp(z - max) * z``)."""

    top_values: Tensor
    top_ids: Tensor
    row_max: Tensor
    sum_exp: Tensor
    e_z: Tensor
    e_f: Tensor
    n_above: Tensor

    @property
    def lse(self) -> Tensor:
        return self.row_max + self.sum_exp.log()


def row_stats(
    logits: Float[Tensor, "layer row d_vocab"],
    final_probs: Float[Tensor, "row d_vocab"],
    chosen: Float[Tensor, "layer row 1"],
    k: int,
    scratch: Float[Tensor, "layer row d_vocab"],
    fused: bool,
) -> RowStats:
    """Top-k and sums of ``logits``; ``n_above`` counts logits above ``chosen``."""
    n_layers, n_rows, vocab = logits.shape
    flat = logits.view(-1, vocab)
    if fused:
        block_max, *sums = _call_compiled(flat, final_probs, chosen.view(-1, 1))
        row_max, sum_exp, e_z, e_f, n_above = (v.view(n_layers, n_rows) for v in sums)
        top_values, top_ids = topk(flat, k, block_max)
    else:
        top_values, top_ids = topk(flat, k)
        row_max = top_values.view(n_layers, n_rows, k)[..., 0]
        sum_exp, e_z, e_f, n_above = eager_sums(logits, final_probs, row_max[..., None], chosen,
                                                scratch)
    return RowStats(top_values.view(n_layers, n_rows, k), top_ids.view(n_layers, n_rows, k),
                    row_max, sum_exp, e_z, e_f, n_above)


def fused_sums(logits: Tensor, final_probs: Tensor, chosen: Tensor):
    """One pass over ``logits``: (block maxima, row max, sum e, sum e*z, sum p_f*z, count).

    The reference form that ``torch.compile`` turns into a single loop. Each block's
    exponentials are taken relative to the block's own maximum and rescaled afterwards (the
    online softmax), so the row maximum is not needed before the pass; the block maxima then
    serve the top-k. A vocabulary that isn't a multiple of the block keeps a short tail.
    Shapes: ``logits [layer * row, d_vocab]`` (layer-major), ``final_probs [row, d_vocab]``
    (repeated over the layers), ``chosen [layer * row, 1]``. No runtime type checks here:
    the function is traced by ``torch.compile``.
    """
    vocab = logits.shape[-1]
    block = min(BLOCK, vocab)
    split = vocab - vocab % block
    main = logits[:, :split].unflatten(-1, (split // block, block))
    block_max = main.amax(-1)
    e = torch.exp(main - block_max[..., None])
    block_sum, block_ez = e.sum(-1), (e * main).sum(-1)
    row_max = block_max.amax(-1, keepdim=True)
    if split < vocab:
        row_max = torch.maximum(row_max, logits[:, split:].amax(-1, keepdim=True))
    scale = torch.exp(block_max - row_max)
    sum_exp, e_z = (block_sum * scale).sum(-1), (block_ez * scale).sum(-1)
    if split < vocab:
        tail = logits[:, split:]
        e_tail = torch.exp(tail - row_max)
        sum_exp, e_z = sum_exp + e_tail.sum(-1), e_z + (e_tail * tail).sum(-1)
    by_layer = logits.view(-1, final_probs.shape[0], vocab)
    e_f = (by_layer * final_probs).sum(-1).view(-1)
    # counted in the logits' float type: exact up to 2**24, far above any vocabulary
    n_above = (logits > chosen).to(logits.dtype).sum(-1)
    return block_max, row_max[:, 0], sum_exp, e_z, e_f, n_above


def eager_sums(logits, final_probs, row_max, chosen, scratch):
    """sum e, sum e*z, sum p_f*z, count(z > chosen) through one reused scratch buffer."""
    torch.sub(logits, row_max, out=scratch).exp_()
    sum_exp = scratch.sum(-1)
    e_z = torch.mul(scratch, logits, out=scratch).sum(-1)
    e_f = torch.mul(final_probs, logits, out=scratch).sum(-1)
    n_above = torch.gt(logits, chosen, out=scratch).sum(-1)
    return sum_exp, e_z, e_f, n_above


def topk(
    logits: Float[Tensor, "rows d_vocab"], k: int,
    block_max: Float[Tensor, "rows n_blocks"] | None = None,
) -> tuple[Float[Tensor, "rows k"], Int[Tensor, "rows k"]]:
    """Exact top-k along the vocabulary, ~6x faster than ``torch.topk`` on a large vocabulary.

    The k largest values lie in the k blocks with the largest maxima, plus the tail when
    the vocabulary isn't a multiple of the block (any other block's maximum is beaten by k
    values in distinct blocks). So one ``amax`` per block (or the ``block_max`` that
    :func:`fused_sums` already found) and a top-k over ``k * block`` candidates suffice.
    Ties may pick other indices of the same value than ``torch.topk`` would.
    """
    rows, vocab = logits.shape
    n_blocks = vocab // BLOCK
    if n_blocks <= k:
        found = torch.topk(logits, k, dim=-1)
        return found.values, found.indices
    split = n_blocks * BLOCK
    blocks = logits[:, :split].unflatten(-1, (n_blocks, BLOCK))
    if block_max is None:
        block_max = blocks.amax(-1)
    best = block_max.topk(k, dim=-1).indices                                   # [rows, k]
    candidates = blocks.gather(1, best[..., None].expand(-1, -1, BLOCK)).view(rows, -1)
    ids = (best[..., None] * BLOCK + torch.arange(BLOCK, device=logits.device)).view(rows, -1)
    if split < vocab:
        candidates = torch.cat([candidates, logits[:, split:]], dim=-1)
        tail_ids = torch.arange(split, vocab, device=logits.device).expand(rows, -1)
        ids = torch.cat([ids, tail_ids], dim=-1)
    values, where = candidates.topk(k, dim=-1)
    return values, ids.gather(1, where)


def use_fused(fused: bool | None, device: torch.device, vocab: int, dtype: torch.dtype,
              row_layers: int) -> bool:
    """Resolve ``fused=None`` (auto) and check that ``fused=True`` can compile."""
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(f"fused must be True, False or None (auto), got {fused!r}")
    if fused is False:
        return False
    if fused is None:
        if device.type != "cpu" or _broken or not _has_compiler():
            return False
        if (device.type, vocab, dtype) not in _warm and row_layers < AUTO_FUSED_MIN_ROWS:
            return False
    return True


def warm_up(logits: Tensor, final_probs: Tensor, chosen: Tensor, *, strict: bool) -> bool:
    """Compile the fused kernel for these shapes now; False (with a warning) if that fails.

    ``strict`` (the user asked for ``fused=True``) raises instead of falling back.
    """
    key = (logits.device.type, logits.shape[-1], logits.dtype)
    if key in _warm:
        return True
    try:
        _call_compiled(logits.view(-1, logits.shape[-1]), final_probs, chosen.view(-1, 1))
    except Exception as error:  # inductor failures have no common base class
        if strict:
            raise RuntimeError(f"fused=True: torch.compile of the lens statistics failed "
                               f"({type(error).__name__}: {error}); pass fused=False") from error
        _broken.append(f"{type(error).__name__}: {error}")
        warnings.warn(f"tl_lenses: compiling the lens statistics failed ({_broken[0]}); "
                      "using the eager path", RuntimeWarning, stacklevel=3)
        return False
    _warm.add(key)
    return True


@functools.lru_cache(maxsize=1)
def _has_compiler() -> bool:
    """Inductor's CPU backend builds C++; without a compiler, auto stays eager."""
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


def _call_compiled(logits, final_probs, chosen):
    # Rows are symbolic from the first call, so every chunk size and layer group shares one
    # compiled kernel (a size-1 dimension can't be marked: it gets its own, once); the
    # vocabulary stays a constant, which vectorises better.
    for tensor in (logits, final_probs, chosen):
        if tensor.shape[0] > 1:
            torch._dynamo.mark_dynamic(tensor, 0)
    return _compiled()(logits, final_probs, chosen)


@functools.lru_cache(maxsize=1)
def _compiled():
    return torch.compile(fused_sums, dynamic=False)
