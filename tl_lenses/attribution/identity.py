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

A cache of *other tokens*, or of a left-padded batch taken without its mask, is a
self-consistent forward pass these sums cannot see: :mod:`tl_lenses.cache_checks` (shared
with the lens on a cache) checks a given cache against the input first.

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
