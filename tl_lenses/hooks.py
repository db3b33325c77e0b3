"""The host's conventions in one place: hook names, layers, positions, hook functions, caches.

Every method names residual-stream layers the same way: an index into :func:`resid_names`
at ``incl_mid=False``, 0 = the embedding (``blocks.0.hook_resid_pre``), ``l`` =
``blocks.{l}.hook_resid_pre`` (the input of block ``l``), ``n_layers`` = the final
``blocks.{n_layers-1}.hook_resid_post``; negative indices count from the end where a method
allows them. Positions are token indices, negative ones counting from the end.
"""

from __future__ import annotations

import re
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from tl_lenses.inputs import Batch

RESID_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.hook_(\w+)$")
# sae-lens's HookedSAETransformer puts an SAE in place of the hook point it sits at; what
# flows on from there is seen at "{hook point}.hook_sae_output".
SAE_OUTPUT = "hook_sae_output"


def flowing_name(names, name: str) -> str:
    """The hook point where the value that flows on at ``name`` is seen.

    ``name`` itself, or ``{name}.hook_sae_output`` where sae-lens has spliced an SAE in at
    ``name`` (``add_sae``; the plain name is then no hook point). ``names``: the model's
    ``hook_dict`` or a cache (e.g. from ``run_with_cache_with_saes``).
    """
    if name in names:  # the usual case, before building the other name
        return name
    wrapped = f"{name}.{SAE_OUTPUT}"
    return wrapped if wrapped in names else name


def spliced_sites(names) -> list[str]:
    """Hook points where sae-lens has spliced an SAE in (``names``: a hook_dict or cache)."""
    tail = f".{SAE_OUTPUT}"
    names = list(names)
    # Every DLA call asks this of a cache with thousands of names and almost never finds
    # one: one substring search over the joined names answers the common case.
    if tail not in "\n".join(names):
        return []
    return [name[:-len(tail)] for name in names if name.endswith(tail)]


@runtime_checkable
class HookFn(Protocol):
    """A TransformerLens hook function: ``hook(tensor, hook) -> tensor or None``.

    Returning None leaves the activation unchanged; returning a tensor replaces it. Every
    hook factory in tl_lenses returns one of these, usable in ``run_with_hooks`` lists.
    """

    def __call__(self, tensor: Tensor, hook) -> Tensor | None:
        """Read or replace the activation at ``hook.name``."""


def final_resid_name(model) -> str:
    """The residual the final norm reads: ``blocks.{n_layers-1}.hook_resid_post``."""
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


def resid_names(model, *, incl_mid: bool = False) -> list[str]:
    """The residual stream as TL's ``accumulated_resid`` lays it out.

    ``resid_pre`` of every block (``resid_pre`` of block 0 is the embedding), optionally
    each ``resid_mid``, then the final ``resid_post``: ``n_layers + 1`` names, or
    ``2 * n_layers + 1`` with ``incl_mid``.
    """
    names = []
    for layer in range(model.cfg.n_layers):
        names.append(f"blocks.{layer}.hook_resid_pre")
        if incl_mid:
            names.append(f"blocks.{layer}.hook_resid_mid")
    return names + [final_resid_name(model)]


def resolve_layer(model, layer, *, argument: str = "layer",
                  negative: bool = True) -> tuple[int, str]:
    """``(index in [0, n_layers], hook name)`` of a residual-stream layer.

    Args:
        model: the model whose ``cfg.n_layers`` sets the range.
        layer: an int in ``[0, n_layers]`` (0 = embedding, ``n_layers`` = final
            ``resid_post``), or in ``[-(n_layers + 1), -1]`` when ``negative``.
        argument: the argument's name, for the error message.
        negative: whether negative indices (counting from the end) are allowed.

    Raises:
        ValueError: naming ``argument``, for a bool, a non-int or an index out of range.
    """
    n = model.cfg.n_layers
    low = -(n + 1) if negative else 0
    if isinstance(layer, bool) or not isinstance(layer, int) or not low <= layer <= n:
        raise ValueError(
            f"{argument} must be an int in [0, n_layers={n}] (0 = embedding, {n} = final "
            f"resid_post{'; negatives count from the end' if negative else ''}), got {layer!r}"
        )
    layer %= n + 1
    name = f"blocks.{layer}.hook_resid_pre" if layer < n else final_resid_name(model)
    return layer, name


def resolve_position(position, n_pos: int, *, argument: str = "position") -> int:
    """A non-negative index into a prompt of ``n_pos`` tokens (negatives count from the end).

    Raises:
        ValueError: naming ``argument``, for a bool, a non-int or an index out of range.
    """
    if isinstance(position, bool) or not isinstance(position, int) \
            or not -n_pos <= position < n_pos:
        raise ValueError(
            f"{argument} must be an int in [-{n_pos}, {n_pos}) for a prompt of {n_pos} tokens, "
            f"got {position!r}"
        )
    return position % n_pos


def resolve_positions(n_pos: int, positions, *, argument: str = "positions") -> list[int]:
    """``positions`` (None = all, an int, or ints) as non-negative indices into ``n_pos``.

    Raises:
        ValueError: naming ``argument``, for an empty list, non-ints or out-of-range ints.
    """
    if positions is None:
        return list(range(n_pos))
    positions = [positions] if isinstance(positions, int) else list(positions)
    bad = [p for p in positions if not isinstance(p, int) or not -n_pos <= p < n_pos]
    if bad or not positions:
        raise ValueError(f"{argument} must be non-empty ints in [-{n_pos}, {n_pos}), got {bad}")
    return [p % n_pos for p in positions]


def run_cache(model, tokens: Tensor | Batch, names: Sequence[str], *, logits: bool = False):
    """``run_with_cache`` keeping only ``names``, without gradients.

    ``tokens``: token ids, or a :class:`~tl_lenses.inputs.Batch` whose attention mask goes
    to the model (so padded prompts run as they would alone). Returns the cache, or
    ``(logits, cache)`` with ``logits=True``. TL removes its caching hooks even when the
    forward pass raises. Where sae-lens has spliced an SAE in at a name, the cache holds
    what flows on (its ``hook_sae_output``) under that name as well.
    """
    if not isinstance(tokens, Batch):
        # Token ids alone are all real: said so explicitly, since TL pads on the tokenizer's
        # side and, when that is the left, would mask every token equal to the pad id.
        tokens = Batch(tokens, torch.ones_like(tokens, dtype=torch.bool))
    kwargs, ids = tokens.forward_kwargs(model), tokens.tokens
    hook_dict = model.hook_dict  # a property that builds a dict on some backends
    resolved = {name: flowing_name(hook_dict, name) for name in names}
    wanted = set(resolved.values())
    with torch.no_grad():
        out, cache = model.run_with_cache(ids, names_filter=lambda name: name in wanted,
                                          return_type="logits" if logits else None, **kwargs)
    store = getattr(cache, "cache_dict", cache)
    for name, key in resolved.items():
        if key != name and key in store:
            store[name] = store[key]  # what flows on, under the name asked for
    return (out, cache) if logits else cache


def short_label(name: str) -> str:
    """A compact row label: ``blocks.3.hook_resid_pre`` -> ``3 pre``, attn_out -> ``3 attn``."""
    match = _BLOCK_HOOK.match(name)
    if not match:
        return name
    layer, kind = match.groups()
    kind = {"resid_pre": "pre", "resid_mid": "mid", "resid_post": "post",
            "attn_out": "attn", "mlp_out": "mlp"}.get(kind, kind)
    return f"{layer} {kind}"


def check_hook_names(model, names, *, argument: str = "hook_names") -> list[str]:
    """Fail unless every name is a hook point of ``model`` carrying a d_model-wide tensor."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise ValueError(f"{argument} must name at least one hook point")
    known = model.hook_dict
    unknown = [name for name in names if flowing_name(known, name) not in known]
    if unknown:
        raise ValueError(f"{argument} has names that are not hook points of the model: {unknown}")
    narrow = [name for name in names if _BLOCK_HOOK.match(name) is None
              or _BLOCK_HOOK.match(name).group(2) not in RESID_KINDS]
    if narrow:
        raise ValueError(
            f"{argument} must name residual-width hook points ({', '.join(RESID_KINDS)}), "
            f"got {narrow}"
        )
    return names
