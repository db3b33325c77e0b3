"""Per-row softmax statistics of a block of logits: the inner loop of every lens readout.

For logits ``z`` (one row per layer x position) a readout needs the top-k, the row maximum,
``sum exp(z - max)`` and ``sum exp(z - max) * z`` (for the log-sum-exp and the entropy) and
``count(z > z_target)`` (for the rank). (``E_{p_final}[z]``, for the KL, is a d_model-wide
dot product computed before the unembedding: see :mod:`tl_lenses.readout.engine`.) Two
implementations give the same numbers:

- fused: a C kernel (``kernels/row_stats.c``, built by :mod:`tl_lenses.readout._native`) that sweeps
  each row twice while it sits in the core's cache: block maxima and row maximum, then the
  sums; the 128-logit block maxima also serve an exact top-k from the k best blocks.
- eager: a blocked top-k, then in-place torch passes through one scratch buffer.

- compiled (CUDA): the same sums written as plain torch ops (:func:`compiled_sums`) and
  fused by ``torch.compile`` into Triton kernels: block maxima and row maximum in one pass
  over the logits, the sums in a second; the block maxima serve the same exact top-k.

``fused=None`` (the readouts' default) takes the kernel for float32 logits on the CPU
whenever it builds, the compiled sums on CUDA when Triton is there
(:func:`tl_lenses.devices.compile_enabled`), and the eager path otherwise
(:func:`stats_backend`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_lenses import devices
from tl_lenses.readout import _native as native

BLOCK = 128  # the kernel's block (kernels/row_stats.c)


class RowStats(NamedTuple):
    """Statistics of ``[layer, row, d_vocab]`` logits.

    ``sum_exp = sum exp(z - row_max)``, ``e_z = sum exp(z - row_max) * z``,
    ``n_above = count(z > chosen)``.

    ``finite`` is False for a row holding a NaN or an infinite logit; such a row has top-k
    ids -1 and NaN top-k values (its order and sums mean nothing).
    """

    top_values: Tensor
    top_ids: Tensor
    row_max: Tensor
    sum_exp: Tensor
    e_z: Tensor
    n_above: Tensor
    finite: Tensor

    @property
    def lse(self) -> Tensor:
        return self.row_max + self.sum_exp.log()


def row_stats(
    logits: Float[Tensor, "layer row d_vocab"],
    chosen: Float[Tensor, "layer row 1"],
    k: int,
    scratch: Float[Tensor, "layer row d_vocab"] | None,
    fused: bool | str,
) -> RowStats:
    """Top-k and sums of ``logits``; ``n_above`` counts logits above ``chosen``.

    ``fused``: the backend, ``"native"`` (or True), ``"compiled"``, or ``"eager"`` (or
    False; it needs ``scratch``).
    """
    backend = ("native" if fused else "eager") if isinstance(fused, bool) else fused
    n_layers, n_rows, vocab = logits.shape
    flat = logits.view(-1, vocab)
    if backend in ("native", "compiled"):
        sums_of = native_sums if backend == "native" else compiled_sums
        block_max, *sums = sums_of(flat, chosen.reshape(-1))
        row_max, sum_exp, e_z, n_above = (value.view(n_layers, n_rows) for value in sums)
        top_values, top_ids = topk(flat, k, block_max)
    else:
        top_values, top_ids = topk(flat, k)
        row_max = top_values.view(n_layers, n_rows, k)[..., 0]
        sum_exp, e_z, n_above = eager_sums(logits, row_max[..., None], chosen, scratch)
    # Any NaN or +-inf logit reaches the row's maximum or its sums in both paths: NaN
    # propagates through exp and the sums; +inf is the maximum; -inf gives e_z = -inf
    # (the kernel clamps exp's argument, so exp * z = tiny * -inf) or NaN (eager: 0 * -inf).
    finite = row_max.isfinite() & sum_exp.isfinite() & e_z.isfinite()
    top_values, top_ids = top_values.view(n_layers, n_rows, k), top_ids.view(n_layers, n_rows, k)
    if not bool(finite.all()):
        top_values = top_values.masked_fill(~finite[..., None], float("nan"))
        top_ids = top_ids.masked_fill(~finite[..., None], -1)
    return RowStats(top_values, top_ids, row_max, sum_exp, e_z, n_above, finite)


def native_sums(
    logits: Float[Tensor, "rows d_vocab"], chosen: Float[Tensor, " rows"]
) -> tuple[Float[Tensor, "rows n_blocks"], Float[Tensor, " rows"], Float[Tensor, " rows"],
           Float[Tensor, " rows"], Float[Tensor, " rows"]]:
    """(block maxima, row max, sum e, sum e*z, count(z > chosen)) from the C kernel."""
    kernel = native.row_stats_kernel()
    if kernel is None:
        raise RuntimeError(f"the lens statistics kernel is unavailable: {native.build_error()}")
    rows, vocab = logits.shape
    if (logits.dtype != torch.float32 or logits.device.type != "cpu"
            or not logits.is_contiguous()):
        raise ValueError(f"logits must be contiguous float32 on the CPU, got {logits.dtype} "
                         f"on {logits.device}")
    if chosen.numel() != rows:  # the kernel reads one chosen value per row: never fewer
        raise ValueError(f"chosen must hold one value per row ({rows}), got "
                         f"{tuple(chosen.shape)}")
    chosen = chosen.to(device="cpu", dtype=torch.float32).contiguous()
    block_max = logits.new_empty(rows, vocab // BLOCK)
    row_max, sum_exp, e_z, n_above = logits.new_empty(4, rows)
    kernel(logits.data_ptr(), chosen.data_ptr(), rows, vocab, torch.get_num_threads(),
           block_max.data_ptr(), row_max.data_ptr(), sum_exp.data_ptr(), e_z.data_ptr(),
           n_above.data_ptr())
    return block_max, row_max, sum_exp, e_z, n_above


def _sums(logits: Tensor, chosen: Tensor):
    """(block maxima, row max, sum e, sum e*z, count(z > chosen)) as plain torch ops.

    Eager, this makes [rows, d_vocab] temporaries; under ``torch.compile`` it becomes two
    passes over the logits (block maxima, then the three sums) and no temporary.
    """
    rows, vocab = logits.shape
    n_blocks = vocab // BLOCK
    block_max = logits[:, : n_blocks * BLOCK].reshape(rows, n_blocks, BLOCK).amax(-1)
    row_max = block_max.amax(-1) if n_blocks else logits.amax(-1)
    if 0 < n_blocks * BLOCK < vocab:
        row_max = torch.maximum(row_max, logits[:, n_blocks * BLOCK:].amax(-1))
    e = torch.exp(logits - row_max[:, None])
    return (block_max, row_max, e.sum(-1), (e * logits).sum(-1),
            (logits > chosen[:, None]).sum(-1))


# Compiled where CUDA and Triton are (eager elsewhere, and after any compile failure).
compiled_sums = devices.compiled(_sums)


def stats_backend(fused: bool | None, device: torch.device, dtype: torch.dtype) -> str:
    """``"native"`` (the C kernel), ``"compiled"`` (CUDA) or ``"eager"`` for ``fused``.

    ``fused=True`` insists on the C kernel (float32 on the CPU); None takes the fastest
    that applies; False the eager torch passes.
    """
    if use_fused(fused, device, dtype):
        return "native"
    if fused is None and dtype == torch.float32 and devices.compile_enabled(device):
        return "compiled"
    return "eager"


def eager_sums(logits, row_max, chosen, scratch):
    """Sum e, sum e*z, count(z > chosen) through one reused scratch buffer."""
    torch.sub(logits, row_max, out=scratch).exp_()
    sum_exp = scratch.sum(-1)
    e_z = torch.mul(scratch, logits, out=scratch).sum(-1)
    n_above = torch.gt(logits, chosen, out=scratch).sum(-1)
    return sum_exp, e_z, n_above


def topk(
    logits: Float[Tensor, "rows d_vocab"], k: int,
    block_max: Float[Tensor, "rows n_blocks"] | None = None,
) -> tuple[Float[Tensor, "rows k"], Int[Tensor, "rows k"]]:
    """Exact top-k along the vocabulary, ~6x faster than ``torch.topk`` on a large vocabulary.

    The k largest values lie in the k blocks with the largest maxima, plus the tail when
    the vocabulary isn't a multiple of the block (any other block's maximum is beaten by k
    values in distinct blocks). So one ``amax`` per block (or the ``block_max`` the kernel
    already found) and a top-k over ``k * block`` candidates suffice. Ties may pick other
    indices of the same value than ``torch.topk`` would.
    """
    rows, vocab = logits.shape
    if not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, d_vocab={vocab}], got {k!r}")
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


def use_fused(fused: bool | None, device: torch.device, dtype: torch.dtype) -> bool:
    """Resolve ``fused=None`` (auto: the kernel where it applies and builds); check True."""
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(f"fused must be True, False or None (auto), got {fused!r}")
    applies = device.type == "cpu" and dtype == torch.float32
    if fused is None:
        return applies and native.row_stats_kernel() is not None
    if fused and not applies:
        raise ValueError(f"fused=True needs float32 logits on the CPU (the C kernel), got "
                         f"{dtype} on {device}; pass fused=None or False")
    if fused and native.row_stats_kernel() is None:
        raise RuntimeError(f"fused=True: the lens statistics kernel could not be built "
                           f"({native.build_error()}); pass fused=None or False")
    return fused
