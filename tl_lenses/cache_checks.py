"""Whether a cache the user gives holds this model's forward pass of its input.

DLA and the lens on a cache read what a given cache holds and trust it, and a cache of the
wrong run is still a self-consistent forward pass: neither DLA's exact sums nor the lens's
statistics can tell. Three mistakes give silently wrong numbers, each visible at one cheap
place (a few tensor ops per call):

* a cache of other tokens, or of another model, of the same shape: at the cells read, the
  embedding is not this model's ``W_E`` row of the input's token. Read at ``hook_embed``;
  where only the residual stream was cached, at ``blocks.0.hook_resid_pre``, which is the
  token's embedding plus, for learned positions, ``W_pos`` at its position within its prompt
  (where TL counts positions from each prompt's first real token when given the mask); where
  neither is cached, not checked.
* a left-padded batch run without its attention mask: each prompt then attends to its pads
  (and TL counts its positions from the first pad), which only the attention pattern shows.
  Such a cache must hold ``blocks.0.attn.hook_pattern``, read there.
* a cache of another width: named as another model's.

The messages name the argument and what to do instead (:class:`Given`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tl_lenses.hooks import SAE_OUTPUT
from tl_lenses.inputs import Batch, Selection

# A cached embedding and the embedding of the token it should hold point the same way
# (cosine 1, or ~1 where the model scales or normalises its embeddings); another token's
# is near orthogonal.
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
    """Raise ValueError unless the cached embeddings at ``selection`` are of ``batch``'s tokens.

    Reads ``hook_embed``, else ``blocks.0.hook_resid_pre`` less the learned position
    embedding (the SAE's input where sae-lens spliced one in there), else checks nothing.
    Exact equality with this model's ``W_E`` rows first (one comparison), cosine
    :data:`SAME_TOKEN_COSINE` otherwise (a scaled or bfloat16 embedding).
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
    column = selection.shared_column
    if column is not None:  # one column for every prompt (the default): views, no index
        cached, ids = cached.select(1, column), batch.tokens.select(1, column)   # [batch, d]
        columns = column
    else:
        cached = selection.gather(cached)                                       # [batch, n, d]
        columns = selection.columns.to(batch.tokens.device)
        ids = batch.tokens.gather(1, columns)
    own, pos = _own_embeddings(model, name, ids, columns, batch, cached)
    if torch.equal(cached, own if pos is None else own + pos):
        return  # the embeddings themselves (no scale): one comparison, no cosine
    if pos is not None:
        cached = cached - pos
    off = torch.nn.functional.cosine_similarity(cached, own, dim=-1) < SAME_TOKEN_COSINE
    if not selection.complete:
        off = off & selection.mask.to(off.device).view(off.shape)
    if bool(off.any()):
        rows = off.view(len(off), -1).any(1).nonzero()[:, 0].tolist()
        where = (f"its embeddings ({EMBED_HOOK})" if name == EMBED_HOOK else
                 f"its {RESID_HOOK}{' less W_pos' if pos is not None else ''}")
        raise ValueError(
            f"{given.argument} does not hold this model's forward pass of {given.input}: in "
            f"prompts {rows[:8]} {where} are not this model's embeddings of the "
            f"{given.input}'s tokens (a cache of other tokens, of another model, or of a run "
            f"whose hooks edited them); pass the {given.input} it was taken on, or {given.fix}")


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
                    cached: Tensor) -> tuple[Tensor, Tensor | None]:
    """This model's embeddings of ``ids``, and its ``W_pos`` rows at their positions or None.

    The positions only where ``name`` is the residual of a model with learned positions.
    Both come placed and typed like ``cached``. ``columns``: the columns of ``ids``
    (``[batch, n]``), or the one column they share.
    """
    W_E = model.embed.W_E.detach()  # (model.W_E on the Bridge is a property over this)
    own = _rows(W_E, ids, cached)
    if name == EMBED_HOOK or not has_pos_embed(model):
        return own, None
    W_pos = model.pos_embed.W_pos.detach()
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
