"""DLA's exact identities, checked on every result: a silent wrong decomposition is an error.

DLA decomposes the model's own forward pass. Two identities hold exactly (to float rounding)
whenever the cache is that forward pass, and each costs one sum over parts:

* :func:`dla`: the parts add up to the model's logit (difference) read off the final
  residual, ``values.sum(0) == logits``;
* :func:`head_path_dla`: a head's paths add up to its own DLA, ``z[dest, h] @ W_O[h] · u /
  s_f`` read off its cached ``hook_z``.

They fail when something the parts do not see changed the residual stream: a hook that
edits a hook point which is no component's output (``hook_resid_pre``, ``ln_final.hook_scale``,
...), or a ``cache=`` computed by another model. (A hook that edits a component's own output,
``hook_z`` or ``hook_mlp_out``, keeps them: the parts then decompose the edited run. A
recording hook that returns None changes nothing.) The error names the hook points that
carry hooks, found in ``O(number of hook points)`` only once an identity has failed.

The tolerance scales with the activations' dtype: ``TOLERANCE * eps`` times the size of the
sum (the sum of the parts' absolute values), so float32 and bfloat16 runs pass and an
edit well above rounding does not.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tl_lenses.hooks import tl_names

# Multiples of the dtype's eps: the largest error seen over the tiny families (tiny_families,
# both backends) and the tiny models in float32 and bfloat16 is 3.6 eps.
TOLERANCE = 64.0


def check_parts_sum(model, values: Tensor, logits: Tensor, *, dtype: torch.dtype,
                    cache_given: bool) -> None:
    """Raise ValueError unless ``values [component, batch, pos, dir]`` sum to ``logits``.

    Cells that are NaN (pads, non-finite activations) are skipped.
    """
    size = torch.linalg.vector_norm(values, 1, dim=0)            # sum of |part| per cell
    _check(model, values.sum(0), logits.to(values.device), size, dtype, cache_given,
           "the DLA parts do not add up to the model's logit")


def parts_add_up(values: Tensor, logits: Tensor, *, dtype: torch.dtype) -> bool:
    """Whether ``values [component, batch, pos, dir]`` sum to ``logits`` at *every* cell.

    :func:`check_parts_sum`'s test in one pass for the usual case (no pads): False also
    where any part is NaN or inf, which the caller then handles cell by cell.
    """
    error = values.sum(0).sub_(logits).abs_()  # (logits on values' device: the caller's)
    bound = torch.linalg.vector_norm(values, 1, dim=0).mul_(TOLERANCE * _eps(dtype))
    return bool((error <= bound).all())


def check_head_totals(model, totals: Tensor, head_dla: Tensor, *, dtype: torch.dtype,
                      cache_given: bool, size: Tensor) -> None:
    """Raise ValueError unless head paths' ``totals [head, batch, dir]`` equal ``head_dla``."""
    _check(model, totals, head_dla.to(totals.device), size, dtype, cache_given,
           "the head paths do not add up to the head's own DLA")


def _check(model, got: Tensor, want: Tensor, size: Tensor, dtype: torch.dtype,
           cache_given: bool, what: str) -> None:
    error = (got - want).abs_()
    bad = error > size.mul(TOLERANCE * _eps(dtype))  # False where NaN: pads, non-finite parts
    if not bool(bad.any()):
        return
    worst = float(error[bad].max())
    raise ValueError(f"{what} (off by up to {worst:.3g}): {_cause(model, cache_given)}")


def _eps(dtype: torch.dtype) -> float:
    """The activations' float eps, at least float32's (the parts are summed in float32)."""
    eps = torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps
    return max(eps, torch.finfo(torch.float32).eps)


# A cached embedding and the embedding of the token it should hold point the same way
# (cosine 1, or ~1 where the model scales or normalises its embeddings); another token's
# is near orthogonal.
SAME_TOKEN_COSINE = 0.5


def check_cache_input(model, cache, batch, selection) -> None:
    """Raise ValueError unless a given ``cache`` was recorded on ``batch`` (a ``Batch``).

    The parts-sum check cannot see a cache of *other* tokens of the same shape: it is a
    self-consistent forward pass. So at the cells DLA reads (``selection``), the cached
    ``hook_embed`` must point along each token's own ``W_E`` row, and be ``d_model`` wide
    (about eight small tensor ops: DLA from a cache is a few hundred microseconds); and a
    left-padded batch's cache must have been taken with its mask (:func:`check_padded_cache`).
    """
    _check_embeddings(model, cache, batch.tokens, selection)
    check_padded_cache(cache, batch)


def _check_embeddings(model, cache, tokens: Tensor, selection) -> None:
    embed = cache["hook_embed"]
    if embed.shape[-1] != model.cfg.d_model:
        raise ValueError(f"cache= is of a model with d_model={embed.shape[-1]}, not this "
                         f"model's {model.cfg.d_model}; pass this model's cache or cache=None")
    W_E = model.embed.W_E.detach()  # (model.W_E on the Bridge is a property over this)
    column = selection.shared_column
    if column is not None:  # one column for every prompt (the default): views, no index
        cached, ids = embed.select(1, column), tokens.select(1, column)      # [batch, d]
    else:
        cached = selection.gather(embed)                                     # [batch, n, d]
        ids = tokens.gather(1, selection.columns.to(tokens.device))
    if ids.device != W_E.device:  # (a Batch built elsewhere)
        ids = ids.to(W_E.device)
    # index_select: the rows without advanced indexing's argument parsing
    own = W_E.index_select(0, ids if ids.dim() == 1 else ids.flatten()).view(cached.shape)
    if own.dtype != cached.dtype or own.device != cached.device:
        own = own.to(cached.device, cached.dtype)
    if torch.equal(cached, own):
        return  # the embeddings themselves (no scale): one comparison, no cosine
    off = torch.nn.functional.cosine_similarity(cached, own, dim=-1) < SAME_TOKEN_COSINE
    if not selection.complete:
        off = off & selection.mask.to(off.device).view(off.shape)
    if bool(off.any()):
        rows = off.view(len(off), -1).any(1).nonzero()[:, 0].tolist()
        raise ValueError(f"cache= does not hold this model's forward pass of input: in "
                         f"prompts {rows[:8]} its embeddings are not this model's embeddings "
                         "of the input's tokens (a cache of other tokens, or of another "
                         "model); pass the cache of this input, or cache=None")


# The most attention a real query may give a pad key in a cache taken with the mask: zero up
# to softmax underflow (TL masks with -inf or the dtype's minimum).
PAD_ATTENTION = 1e-4
PATTERN_HOOK = "blocks.0.attn.hook_pattern"


def check_padded_cache(cache, batch) -> None:
    """Raise ValueError unless a left-padded batch's ``cache=`` was taken with its mask.

    Without the attention mask each prompt attends to its pads (and TL counts its positions
    from the first pad), so every value changes while the cache stays a self-consistent
    forward pass of the same tokens: the other checks pass it. Right padding cannot change
    a real token (attention is causal). Read at layer 0's attention pattern
    (``blocks.0.attn.hook_pattern``): the weight real queries give pad keys.
    """
    if batch.padding_side != "left" or not batch.padded:
        return
    keys = getattr(cache, "cache_dict", cache)
    pattern = keys.get(PATTERN_HOOK)
    if pattern is None:
        raise ValueError(
            f"cache= of a left-padded batch must hold {PATTERN_HOOK!r}: DLA reads there "
            "that it was taken with the attention mask (without it each prompt attends to its "
            "pads and every number changes); add it to the names_filter "
            "(needed_hooks(model, ..., left_padded=True)), or pass cache=None")
    mask = batch.mask.to(pattern.device)
    leak = pattern.float().mul(mask[:, None, :, None]).mul(~mask[:, None, None, :]).amax()
    if float(leak) > PAD_ATTENTION:
        raise ValueError(
            f"cache= was taken without this input's attention mask: at layer 0 real tokens "
            f"give up to {float(leak):.3g} of their attention to pads; take it with "
            "run_with_cache(tokens, attention_mask=mask) (or from the strings, padded on the "
            "left), or pass cache=None")


def _cause(model, cache_given: bool) -> str:
    hooked = hooked_points(model)
    if hooked:
        return (f"hooks on {hooked[:8]}{' ...' if len(hooked) > 8 else ''} change the "
                "forward pass outside the components' outputs, and DLA decomposes the model's "
                "own forward pass. Remove them (model.reset_hooks()), or make the edit on a "
                "component's output (attn.hook_z, hook_mlp_out), which the parts then carry")
    if cache_given:
        return ("cache= does not hold this model's forward pass (another model's cache, or "
                "one taken with hooks that edited it); pass cache=None to run the model")
    return ("the model's forward pass is not the sum DLA decomposes (a module hook or a "
            "patched forward?); run it without modifications")


def hooked_points(model) -> list[str]:
    """Names of the model's hook points that carry forward hooks (each point once).

    Each under its TL name (``blocks.1.hook_resid_pre``, not a Bridge's own
    ``blocks.1.hook_in``): the name the user hooked and tl_lenses' docs use.
    """
    hook_dict = model.hook_dict
    names = tl_names(hook_dict)
    seen, hooked = set(), []
    for point in hook_dict.values():
        if id(point) in seen:  # the Bridge lists aliases of one point
            continue
        seen.add(id(point))
        if getattr(point, "_forward_hooks", None) or getattr(point, "fwd_hooks", None):
            hooked.append(names[id(point)])
    return hooked


def check_paths(model, cache, chosen, dest: Tensor, u: Tensor, s_f: Tensor, values: Tensor,
                *, cache_given: bool) -> None:
    """:func:`check_head_totals` for :func:`head_path_dla`'s ``values``.

    Args:
        model: the model.
        cache: the cache the paths were read from (holding each chosen layer's ``hook_z``).
        chosen: the destination heads ``(layer, head)``.
        dest: each prompt's destination column ``[batch]``.
        u: the readout directions ``[d_model, direction]``.
        s_f: the final norm's scale at ``dest`` ``[batch]``.
        values: ``[head, source, batch, src_pos, direction]``.
        cache_given: whether the user passed the cache (for the message).
    """
    rows = torch.arange(len(dest))
    own = torch.stack([
        cache[f"blocks.{l}.attn.hook_z"][rows, dest, h].float().to(u.device)
        @ (model.blocks[l].attn.W_O[h].detach().float() @ u)
        for l, h in chosen]) / s_f[None, :, None]                       # [head, batch, dir]
    dtype = cache["hook_embed"].dtype
    check_head_totals(model, values.sum((1, 3)), own, dtype=dtype, cache_given=cache_given,
                      size=values.abs().sum((1, 3)))
