"""Whether a cache the user gives holds this model's forward pass of its input.

DLA and the lens on a cache read what a given cache holds and trust it, and a cache of the
wrong run is still a self-consistent forward pass: neither DLA's exact sums nor the lens's
statistics can tell. Three mistakes give silently wrong numbers, each visible at one cheap
place (a few tensor ops per call):

* a cache of other tokens, or of another model, of the same shape: at some real token, the
  cached embedding is not this model's embedding of the input's token. Every real token is
  checked, not only the cells read: a cell's residual depends on every token before it (a
  cache of "...Kate...Paul... to" read at " to" is not one of "...Mary...John... to").
  Read at ``hook_embed``; where only the residual stream was cached, at
  ``blocks.0.hook_resid_pre``, which is the token's embedding plus, for learned positions,
  ``W_pos`` at its position within its prompt (where TL counts positions from each
  prompt's first real token when given the mask); where neither is cached, not checked.
* a left-padded batch run without its attention mask: each prompt then attends to its pads
  (and TL counts its positions from the first pad), which only the attention pattern shows.
  Such a cache must hold ``blocks.0.attn.hook_pattern``, read there.
* a cache of another width: named as another model's.

The messages name the argument and what to do instead (:class:`Given`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from tl_lenses.hooks import SAE_OUTPUT
from tl_lenses.inputs import Batch, Selection

# The fast check compares this many leading coordinates of every real token's embedding
# (one cache line a row): a different token differs there, and the rows read are also
# compared whole.
PROBE_WIDTH = 16
# Where the cached embeddings are not W_E's rows (scaled, as Gemma's; normalised, as
# BLOOM's), the model's own embedding of the input is recomputed and compared, to within
# this many units of rounding of the coarser dtype (the same computation: equal in practice).
ROUNDING_UNITS = 8
# Last resort, where the model's own embedding can't be recorded at the cached hook: a
# cached embedding and its token's point the same way; another token's is far off.
SAME_TOKEN_COSINE = 0.5
# The most attention a real query may give a pad key in a cache taken with the mask: zero up
# to softmax underflow (TL masks with -inf or the dtype's minimum).
PAD_ATTENTION = 1e-4
PATTERN_HOOK = "blocks.0.attn.hook_pattern"
EMBED_HOOK, RESID_HOOK = "hook_embed", "blocks.0.hook_resid_pre"


@dataclass(frozen=True)
class Given:
    """How the messages name a given cache and its input, and what to do instead.

    The defaults are DLA's (``dla(..., cache=)``).
    """

    argument: str = "cache="
    input: str = "input"
    input_mask: str = "this input's attention mask"
    fix: str = "pass cache=None to run the model"
    names_hint: str = " (needed_hooks(model, ..., left_padded=True))"


def has_pos_embed(model) -> bool:
    """Whether the model adds a learned position embedding to the residual stream."""
    return model.cfg.positional_embedding_type == "standard"


def check_cache_input(model, cache, batch: Batch, selection: Selection, *,
                      given: Given = Given()) -> None:
    """Raise ValueError unless ``cache`` was recorded on ``batch`` by this model.

    Checks a left-padded batch's mask first (:func:`check_padded_cache`: without it the
    positions, and so ``blocks.0.hook_resid_pre``, differ too), then the embeddings at the
    cells ``selection`` reads (:func:`check_embeddings`).

    Args:
        model: the model the cache should come from.
        cache: an ``ActivationCache`` or a dict of hook name to tensor.
        batch: the tokens and attention mask the cache should have been taken on.
        selection: the cells that will be read (``batch.select(positions)``).
        given: how the messages name the cache and its input.

    Raises:
        ValueError: named by ``given``: a left-padded batch's cache without
            ``blocks.0.attn.hook_pattern`` or taken without the mask; embeddings of another
            width, or not this model's of the input's tokens.
    """
    check_padded_cache(cache, batch, given=given)
    check_embeddings(model, cache, batch, selection, given=given)


def check_embeddings(model, cache, batch: Batch, selection: Selection, *,
                     given: Given = Given()) -> None:
    """Raise ValueError unless the cached embeddings are of ``batch``'s tokens, by this model.

    Reads ``hook_embed``, else ``blocks.0.hook_resid_pre`` (the SAE's input where sae-lens
    spliced one in there), else checks nothing. Fast path (tens of microseconds; 125 on a
    16 x 256 SmolLM2 cache, mostly reading every token's row): the leading
    :data:`PROBE_WIDTH` coordinates of every real token, and the whole rows at the cells
    ``selection`` reads, equal this model's ``W_E`` rows (plus ``W_pos`` at each token's
    position, for learned positions at the residual). Where they don't (another input, or a
    model that scales or normalises its embeddings), the model is run up to that hook on
    ``batch`` and every real token's cached row must equal what it records, to
    :data:`ROUNDING_UNITS` units of rounding.
    """
    keys = getattr(cache, "cache_dict", cache)  # `in` on an ActivationCache scans its keys
    name = _embedding_entry(keys)
    if name is None:
        return
    cached = keys[name]
    if cached.shape[-1] != model.cfg.d_model:
        raise ValueError(f"{given.argument} is of a model with d_model={cached.shape[-1]}, not "
                         f"this model's {model.cfg.d_model}; pass this model's cache, or "
                         f"{given.fix}")
    if cached.dim() != 3 or tuple(cached.shape[:2]) != tuple(batch.tokens.shape):
        raise ValueError(
            f"{given.argument} holds {name} of shape {tuple(cached.shape)}, not [batch, pos, "
            f"d_model] of the {given.input}'s {tuple(batch.tokens.shape)} tokens; pass the "
            f"cache of this {given.input}, or {given.fix}")
    if _equals_w_e_rows(model, name, cached, batch, selection):
        return
    recorded = _recorded(model, batch, name)
    if recorded is not None:
        off = ~_close(cached, recorded)
    else:
        off = _far_from_w_e_rows(model, name, cached, batch)
    off = off & batch.mask.to(off.device)
    if bool(off.any()):
        rows = off.any(1).nonzero()[:, 0].tolist()
        where = (f"its embeddings ({EMBED_HOOK})" if name == EMBED_HOOK else f"its {name}")
        raise ValueError(
            f"{given.argument} does not hold this model's forward pass of {given.input}: in "
            f"prompts {rows[:8]} {where} are not this model's embeddings of the "
            f"{given.input}'s tokens (a cache of other tokens, of another model, or of a run "
            f"whose hooks edited them); pass the {given.input} it was taken on, or {given.fix}")


def _equals_w_e_rows(model, name: str, cached: Tensor, batch: Batch,
                     selection: Selection) -> bool:
    """Whether every real token's leading coordinates, and the rows read, are W_E's rows."""
    width = min(PROBE_WIDTH, cached.shape[-1])
    probe = cached[..., :width]
    if name == EMBED_HOOK or not has_pos_embed(model):   # no positions to build (hot path)
        same = probe == _rows(_leading_columns(model.embed, width), batch.tokens, probe)
    else:
        columns = torch.arange(batch.tokens.shape[1], device=batch.tokens.device)
        own, pos = _own_embeddings(model, name, batch.tokens, columns.expand_as(batch.tokens),
                                   batch, probe, width=width)
        same = probe == own + pos
    if batch.padded:  # pads: whatever the run put there
        same = same.all(-1).logical_or_(~batch.mask.to(same.device))
    if not bool(same.all()):
        return False
    column = selection.shared_column
    if column is not None:  # one column for every prompt (the default): views, no index
        cached, ids = cached.select(1, column), batch.tokens.select(1, column)   # [batch, d]
        columns = column
    else:
        cached = selection.gather(cached)                                       # [batch, n, d]
        columns = selection.columns.to(batch.tokens.device)
        ids = batch.tokens.gather(1, columns)
    own, pos = _own_embeddings(model, name, ids, columns, batch, cached)
    same = cached == (own if pos is None else own + pos)
    if not selection.complete:
        same = same | ~selection.mask.to(same.device).view(*same.shape[:-1], 1)
    return bool(same.all())


# a model's embedding module -> (its W_E's storage and version, W_E's leading columns)
_LEADING: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _leading_columns(embed: torch.nn.Module, width: int) -> Tensor:
    """``embed.W_E[:, :width]``, contiguous, kept per module and remade whenever W_E changes.

    A compact table: gathering a batch's rows from it stays in cache. Keyed by the
    tensor's storage and version counter, so an in-place edit is seen too.
    """
    W_E = embed.W_E  # (a property over the weight on the Bridge)
    key = (W_E.data_ptr(), W_E._version, tuple(W_E.shape), W_E.dtype, W_E.device, width)
    known = _LEADING.get(embed)
    if known is None or known[0] != key:
        known = (key, W_E.detach()[:, :width].contiguous())
        try:
            _LEADING[embed] = known
        except TypeError:  # not weakly referenceable: no table kept
            pass
    return known[1]


class _Recorded(Exception):
    """Stops a forward pass once the hook checked has fired (nothing after it is needed)."""


def _recorded(model, batch: Batch, name: str) -> Tensor | None:
    """What the model itself writes at hook ``name`` on ``batch``, or None where it can't.

    The forward pass stops at the hook (an exception caught here; TL removes its hooks in
    ``finally``), so this costs the embedding alone.
    """
    seen: list[Tensor] = []

    def record(tensor: Tensor, hook) -> Tensor:
        seen.append(tensor.detach())
        raise _Recorded

    if name not in model.hook_dict:
        return None
    try:
        with torch.no_grad():
            model.run_with_hooks(batch.tokens, fwd_hooks=[(name, record)],
                                 **batch.forward_kwargs(model))
    except _Recorded:
        pass
    return seen[0] if seen else None


def _close(cached: Tensor, recorded: Tensor) -> Tensor:
    """``[batch, pos]``: whether each cached row equals the recorded one up to rounding."""
    if recorded.shape != cached.shape:
        return torch.zeros(cached.shape[:2], dtype=torch.bool, device=cached.device)
    recorded = recorded.to(cached.device)
    eps = max(torch.finfo(cached.dtype).eps, torch.finfo(recorded.dtype).eps)
    a, b = cached.float(), recorded.float()
    scale = b.abs().amax(-1, keepdim=True)
    return ((a - b).abs() <= ROUNDING_UNITS * eps * scale).all(-1)


def _far_from_w_e_rows(model, name: str, cached: Tensor, batch: Batch) -> Tensor:
    """``[batch, pos]``: rows pointing away from their token's W_E row (the last resort)."""
    columns = torch.arange(batch.tokens.shape[1], device=batch.tokens.device)
    own, pos = _own_embeddings(model, name, batch.tokens, columns.expand_as(batch.tokens),
                               batch, cached)
    if pos is not None:
        cached = cached - pos
    return torch.nn.functional.cosine_similarity(cached, own, dim=-1) < SAME_TOKEN_COSINE


def _embedding_entry(keys) -> str | None:
    """The cache entry holding each token's embedding, or None when there is none."""
    if EMBED_HOOK in keys:
        return EMBED_HOOK
    # sae-lens splices an SAE in *at* the hook point: the residual itself is its input
    spliced = f"{RESID_HOOK}.hook_sae_input"
    if spliced in keys:
        return spliced
    if RESID_HOOK in keys and f"{RESID_HOOK}.{SAE_OUTPUT}" not in keys:
        return RESID_HOOK
    return None


def _own_embeddings(model, name: str, ids: Tensor, columns: Tensor | int, batch: Batch,
                    cached: Tensor, *, width: int | None = None
                    ) -> tuple[Tensor, Tensor | None]:
    """This model's embeddings of ``ids``, and its ``W_pos`` rows at their positions or None.

    The positions only where ``name`` is the residual of a model with learned positions.
    Both come placed and typed like ``cached``, of its leading ``width`` coordinates where
    given. ``columns``: the columns of ``ids`` (``[batch, n]``), or the one column they share.
    """
    # (model.W_E on the Bridge is a property over model.embed.W_E)
    W_E = model.embed.W_E.detach() if width is None else _leading_columns(model.embed, width)
    own = _rows(W_E, ids, cached)
    if name == EMBED_HOOK or not has_pos_embed(model):
        return own, None
    W_pos = model.pos_embed.W_pos.detach()
    if width is not None:
        W_pos = W_pos[:, :width]
    # Rows before position 0: OPT's table (Bridge) keeps two that its positions skip.
    first = max(W_pos.shape[0] - model.cfg.n_ctx, 0)
    # Positions within each prompt: TL (both backends) counts a masked left-padded prompt's
    # from its first real token, and every other batch's from column 0.
    if batch.padding_side == "left" and batch.padded:
        offsets = batch.offsets.to(ids.device)
        positions = columns - (offsets if isinstance(columns, int) else offsets[:, None])
        return own, _rows(W_pos, positions.clamp(min=0) + first, cached)
    if isinstance(columns, int):  # one row, broadcast over the prompts
        return own, W_pos[first + columns].to(cached.device, cached.dtype)
    return own, _rows(W_pos, columns + first if first else columns, cached)


def _rows(weight: Tensor, ids: Tensor, like: Tensor) -> Tensor:
    """``weight[ids]`` shaped, typed and placed like ``like``."""
    if ids.device != weight.device:  # (a Batch built elsewhere)
        ids = ids.to(weight.device)
    # index_select: the rows without advanced indexing's argument parsing
    rows = weight.index_select(0, ids if ids.dim() == 1 else ids.flatten()).view(like.shape)
    if rows.dtype != like.dtype or rows.device != like.device:
        rows = rows.to(like.device, like.dtype)
    return rows


def check_padded_cache(cache, batch: Batch, *, given: Given = Given()) -> None:
    """Raise ValueError unless a left-padded batch's ``cache`` was taken with its mask.

    Without the attention mask each prompt attends to its pads (and TL counts its positions
    from the first pad), so every value changes while the cache stays a self-consistent
    forward pass of the same tokens: the other checks pass it. Right padding cannot change
    a real token (attention is causal). Read at layer 0's attention pattern
    (``blocks.0.attn.hook_pattern``, ``[batch, head, query, key]``): the weight real queries
    give pad keys. The pattern may hold only the last queries (``query <= key``; a
    :class:`~tl_lenses.readout.apply.LensCollector` keeps the last one): they are read as
    the last columns.
    """
    if batch.padding_side != "left" or not batch.padded:
        return
    keys = getattr(cache, "cache_dict", cache)
    pattern = keys.get(PATTERN_HOOK)
    if pattern is None:
        raise ValueError(
            f"{given.argument} of a left-padded batch must hold {PATTERN_HOOK!r}: it shows "
            "whether the run had the attention mask (without it each prompt attends to its "
            "pads and every number changes); add it to run_with_cache's names_filter"
            f"{given.names_hint}, or (where the model does not record it, as some Bridges' "
            f"attention does not) {given.fix}")
    mask = batch.mask.to(pattern.device)
    queries = mask[:, mask.shape[1] - pattern.shape[-2]:]
    leak = pattern.float().mul(queries[:, None, :, None]).mul(~mask[:, None, None, :]).amax()
    if float(leak) > PAD_ATTENTION:
        raise ValueError(
            f"{given.argument} was taken without {given.input_mask}: at layer 0 real tokens "
            f"give up to {float(leak):.3g} of their attention to pads; take it with "
            "run_with_cache(tokens, attention_mask=mask) (or from the strings, padded on the "
            f"left), or {given.fix}")
