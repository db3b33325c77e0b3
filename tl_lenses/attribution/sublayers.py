"""Per-sublayer DLA terms (``dla(heads=False)``) in one stack and one projection.

With no heads or neurons to split and no SAE in the stream, each component's part is its
cached output (the embeddings, each attention output, each MLP output) at the selected
positions, read along ``u``. The general path in :mod:`tl_lenses.attribution.core` builds
every component through its own closures, labels and checks (about 20 us of Python each,
which made a 61-component DLA slower than TransformerLens 4.3's own per-component tool).
Here the labels and hook names are built once per model shape, and the cached tensors are
read in one pass and projected together.

On the CPU, float32 values are projected by a C kernel (``readout/kernels/row_dots.c``)
that reads each row where it lies: no view, copy or matmul per component (61 of each on
SmolLM2 made most of a small DLA's time), with the sums in double (within 1 ulp of a
float64 reference). Elsewhere (CUDA, half precision, no C compiler) torch projects them.
The general path goes through :func:`project_stacked` too, so both give the same numbers
bit for bit.
"""

from __future__ import annotations

import array
import functools
import operator
from itertools import repeat
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_lenses.hooks import flowing_name
from tl_lenses.inputs import Selection
from tl_lenses.readout import _native as native

# Values are stacked in groups of at most this many elements before projecting: bounded
# memory for long all-position reads, and the general path's grouping (so its numbers).
MAX_STACK_ELEMENTS = 1 << 22
# Values of at least this many elements (16 rows of d_model 576) are projected one by one:
# the per-call cost of a matmul is then below that of copying them into a stack.
PER_VALUE_ELEMENTS = 1 << 13
# Row elements read (values x rows x d_model) from which the C kernel takes torch's thread
# count (a 16-prompt DLA on SmolLM2 reads 2^19); below, one thread: no start-up cost.
PARALLEL_ELEMENTS = 1 << 19
_DTYPE, _CPU, _GRAD = Tensor.dtype.__get__, Tensor.is_cpu.__get__, Tensor.requires_grad.__get__


@functools.lru_cache(maxsize=64)
def sublayer_components(
    n_layers: int, pos_embed: bool, attn_only: bool
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(labels, hook names)`` of the whole-sublayer writers, in :func:`dla`'s order.

    A pure function of the model's shape (cached on it, holding no model): ``embed``,
    ``pos_embed`` where the model adds learned positions, then per layer ``L3 attn`` and
    ``L3 MLP`` (none for an attention-only model).
    """
    pairs = [("embed", "hook_embed")]
    if pos_embed:
        pairs.append(("pos_embed", "hook_pos_embed"))
    for layer in range(n_layers):
        pairs.append((f"L{layer} attn", f"blocks.{layer}.hook_attn_out"))
        if not attn_only:
            pairs.append((f"L{layer} MLP", f"blocks.{layer}.hook_mlp_out"))
    labels, names = zip(*pairs)
    return labels, names


def sublayer_parts(
    model, keys, selection: Selection, u: Float[Tensor, "d_model direction"]
) -> tuple[list[str], Float[Tensor, "component batch pos direction"]]:
    """Labels and ``value · u`` of every whole-sublayer writer (not yet divided by ``s``).

    ``keys``: the cache's dict (``cache_dict``); ``selection``: the cells read. The result
    is a fresh tensor (callers may write to it).
    """
    cfg = model.cfg
    labels, names = sublayer_components(cfg.n_layers, cfg.positional_embedding_type
                                        == "standard", bool(cfg.attn_only))
    try:
        values = operator.itemgetter(*names)(keys)  # one C call for the ~60 lookups
    except KeyError:  # an SAE spliced in somewhere: read what flows on there
        values = [keys[flowing_name(keys, name)] for name in names]
    column = selection.shared_column
    if column is not None:
        # One column for every prompt (the default, each prompt's last token): the kernel
        # reads it in place; else `select` is the cheapest view, and [n, batch, d] @ u is
        # the same matmul as with the position axis kept.
        first = values[0]
        if first.dim() == 3 and column < first.shape[1]:   # (checked against the tokens)
            offsets = _column_offsets(first.shape[0], first.stride(0), column * first.stride(1))
            projected = native_dots(values, offsets, u)
            if projected is not None:
                return list(labels), projected.unsqueeze(2)
        views = list(map(Tensor.select, values, repeat(1), repeat(column)))
        return list(labels), project_stacked(views, u).unsqueeze(2)
    return list(labels), project_stacked([selection.gather(value) for value in values], u)


def native_dots(
    values: Sequence[Tensor], offsets: Int[Tensor, " row"], u: Float[Tensor, "d_model direction"]
) -> Float[Tensor, "component row direction"] | None:
    """Each value's rows at ``offsets`` along ``u``, by the C kernel; None where it can't.

    ``values``: tensors of one layout (shape and strides; checked) whose rows, ``d_model``
    contiguous floats, start ``offsets`` elements after each one's data pointer (offsets
    valid for that layout: the caller's). None, for the torch path, where the kernel is not
    built, or the values are not float32 CPU tensors of one layout free of autograd, or
    ``u`` is not a float32 CPU tensor free of autograd.
    """
    kernel = native.row_dots_kernel()
    # u in float32 and free of autograd too: the kernel's output carries no graph, and a
    # float64 u would be rounded to float32 where torch keeps its precision.
    if (kernel is None or u.device.type != "cpu" or u.dtype != torch.float32
            or u.requires_grad or not _one_float_cpu_layout(values)):
        return None
    d = values[0].shape[-1]
    if u.dim() != 2 or u.shape[0] != d:
        raise ValueError(f"u must be [d_model={d}, direction], got {tuple(u.shape)}")
    if offsets.dtype != torch.int64 or offsets.device.type != "cpu" or offsets.dim() != 1:
        raise ValueError(f"offsets must be a 1-d int64 CPU tensor, got {offsets.dtype} "
                         f"{tuple(offsets.shape)} on {offsets.device}")
    directions = u.T.to(torch.float32).contiguous()                   # [direction, d]
    offsets = offsets.contiguous()
    pointers = array.array("q", map(Tensor.data_ptr, values))   # int64, as the kernel reads
    out = torch.empty(len(values), len(offsets), len(directions))
    work = len(values) * len(offsets) * d
    threads = torch.get_num_threads() if work >= PARALLEL_ELEMENTS else 1
    kernel(pointers.buffer_info()[0], len(values), offsets.data_ptr(), len(offsets),
           directions.data_ptr(), len(directions), d, threads, out.data_ptr())
    return out


def _one_float_cpu_layout(values: Sequence[Tensor]) -> bool:
    """Whether ``values`` are float32 CPU tensors without autograd, of one shape and strides.

    The kernel reads raw memory at offsets computed for the first: every other value must
    span the same elements (a shorter one would be read past its end).
    """
    first = values[0]
    if first.dtype != torch.float32 or not first.is_cpu or first.stride(-1) != 1:
        return False
    # getters mapped in C: ~0.1 us a tensor (a tuple of five attributes each cost ~0.8)
    if (set(map(_DTYPE, values)) != {torch.float32} or not all(map(_CPU, values))
            or any(map(_GRAD, values)) or len(set(map(Tensor.size, values))) != 1):
        return False
    # one shape, all contiguous: one set of strides (else compare them)
    return all(map(Tensor.is_contiguous, values)) or len(set(map(Tensor.stride, values))) == 1


@functools.lru_cache(maxsize=64)
def _column_offsets(batch: int, batch_stride: int, start: int) -> Tensor:
    """Offsets of each prompt's row at one column, ``b * batch_stride + start``.

    Shared between calls: read only.
    """
    return torch.arange(batch, dtype=torch.int64) * batch_stride + start


@functools.lru_cache(maxsize=64)
def _row_offsets(shape: tuple[int, ...], stride: tuple[int, ...]) -> Tensor:
    """Offsets of every row of a ``[*rows, d]`` layout, row-major (shared: read only)."""
    offsets = torch.zeros((), dtype=torch.int64)
    for size, step in zip(shape[:-1], stride[:-1]):
        offsets = offsets[..., None] + torch.arange(size, dtype=torch.int64) * step
    return offsets.flatten()


def project_stacked(values: list[Tensor], u: Float[Tensor, "d_model direction"],
                    max_elements: int = MAX_STACK_ELEMENTS) -> Tensor:
    """``stack(values).to(u.dtype) @ u``, ``[n, batch, pos, direction]``.

    On the CPU, float32 values of one layout go to the C kernel (:func:`native_dots`),
    which reads them in place. Otherwise torch projects them in bounded groups: each holds
    as many values as fit in ``max_elements`` (at least one), and the groups' projections
    are concatenated (no copy when there is one group, the usual case for a few
    positions). Values of many rows each (a batch read at its last tokens) are projected
    one by one instead: a stacked copy of them would be a fresh buffer of megabytes whose
    first touch costs more than the projection.
    """
    first = values[0]
    projected = native_dots(values, _row_offsets(tuple(first.shape), first.stride()), u)
    if projected is not None:
        return projected.view(len(values), *first.shape[:-1], u.shape[-1])
    if first.numel() >= PER_VALUE_ELEMENTS:
        if any(value.dtype != u.dtype for value in values):
            values = [value.to(u.dtype) for value in values]
        # matmul mapped in C, then one stack of the small products (cheaper than a Python
        # loop writing into rows of one buffer, an index per row)
        return torch.stack(list(map(torch.matmul, values, repeat(u))))
    groups, start = [], 0
    while start < len(values):
        size = max(1, max_elements // max(1, values[start].numel()))
        groups.append(torch.stack(values[start:start + size]).to(u.dtype) @ u)
        start += size
    return groups[0] if len(groups) == 1 else torch.cat(groups)


__all__ = ["sublayer_components", "sublayer_parts", "project_stacked", "native_dots"]
