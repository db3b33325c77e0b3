"""Per-sublayer DLA terms (``dla(heads=False)``) in one stack and one projection.

With no heads or neurons to split and no SAE in the stream, each component's part is its
cached output (the embeddings, each attention output, each MLP output) at the selected
positions, read along ``u``. The general path in :mod:`tl_lenses.attribution.core` builds
every component through its own closures, labels and checks (about 20 us of Python each,
which made a 61-component DLA slower than TransformerLens 4.3's own per-component tool).
Here the labels and hook names are built once per model shape, and the cached tensors are
read in one pass, stacked and projected together: the same matmuls on the same stacked
values as the general path, so the same numbers bit for bit.
"""

from __future__ import annotations

import functools
import operator
from itertools import repeat

import torch
from jaxtyping import Float
from torch import Tensor

from tl_lenses.hooks import flowing_name
from tl_lenses.inputs import Selection

# Values are stacked in groups of at most this many elements before projecting: bounded
# memory for long all-position reads, and the general path's grouping (so its numbers).
MAX_STACK_ELEMENTS = 1 << 22
# Values of at least this many elements (16 rows of d_model 576) are projected one by one:
# the per-call cost of a matmul is then below that of copying them into a stack.
PER_VALUE_ELEMENTS = 1 << 13


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
        # One column for every prompt (the default, each prompt's last token): `select`
        # is the cheapest view, and [n, batch, d] @ u is the same matmul as with the
        # position axis kept.
        views = list(map(Tensor.select, values, repeat(1), repeat(column)))
        return list(labels), project_stacked(views, u).unsqueeze(2)
    return list(labels), project_stacked([selection.gather(value) for value in values], u)


def project_stacked(values: list[Tensor], u: Float[Tensor, "d_model direction"],
                    max_elements: int = MAX_STACK_ELEMENTS) -> Tensor:
    """``stack(values).float() @ u``, ``[n, batch, pos, direction]``, in bounded groups.

    Each group holds as many values as fit in ``max_elements`` (at least one); the groups'
    projections are concatenated (no copy when there is one group, the usual case for a
    few positions). Values of many rows each (a batch read at its last tokens) are
    projected one by one into the result instead: a stacked copy of them would be a
    fresh buffer of megabytes whose first touch costs more than the projection.
    """
    first = values[0]
    if first.numel() >= PER_VALUE_ELEMENTS:
        out = torch.empty(len(values), *first.shape[:-1], u.shape[-1], dtype=u.dtype,
                          device=u.device)
        for value, row in zip(values, out):
            torch.matmul(value if value.dtype == u.dtype else value.to(u.dtype), u, out=row)
        return out
    groups, start = [], 0
    while start < len(values):
        size = max(1, max_elements // max(1, values[start].numel()))
        groups.append(torch.stack(values[start:start + size]).float() @ u)
        start += size
    return groups[0] if len(groups) == 1 else torch.cat(groups)


__all__ = ["sublayer_components", "sublayer_parts", "project_stacked"]
