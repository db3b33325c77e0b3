"""The host's conventions in one place: hook names, layers, positions, hook functions, caches.

Every method names residual-stream layers the same way: an index into :func:`resid_names`
at ``incl_mid=False``, 0 = the embedding (``blocks.0.hook_resid_pre``), ``l`` =
``blocks.{l}.hook_resid_pre`` (the input of block ``l``), ``n_layers`` = the final
``blocks.{n_layers-1}.hook_resid_post``; negative indices count from the end where a method
allows them. Positions are token indices, negative ones counting from the end.
"""

from __future__ import annotations

import functools
import re
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from tl_lenses._ints import as_int, as_ints
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

    Raises:
        ValueError: naming ``incl_mid``, for a model without ``resid_mid`` hook points
            (:func:`no_resid_mid`).
    """
    # Checked here: without it a method asking for resid_mid failed later, with a message
    # about a cache's names_filter.
    if incl_mid and (why := no_resid_mid(model)) is not None:
        raise ValueError(f"incl_mid=True needs resid_mid hook points, and this model has none "
                         f"({why}); name the hook points to read in hook_names instead")
    names = []
    for layer in range(model.cfg.n_layers):
        names.append(f"blocks.{layer}.hook_resid_pre")
        if incl_mid:
            names.append(f"blocks.{layer}.hook_resid_mid")
    return names + [final_resid_name(model)]


def no_resid_mid(model) -> str | None:
    """Why ``model``'s blocks have no ``resid_mid`` hook point, or None when they all have one.

    Blocks that run attention and MLP in parallel (GPT-J, Pythia, Phi) or have no MLP
    (attention-only models) have none, on either backend.
    """
    hooks = model.hook_dict
    if all(flowing_name(hooks, f"blocks.{layer}.hook_resid_mid") in hooks
           for layer in range(model.cfg.n_layers)):
        return None
    if getattr(model.cfg, "parallel_attn_mlp", False):
        return "it runs attention and MLP in parallel"
    if getattr(model.cfg, "attn_only", False):
        return "its blocks are attention-only"
    return "it has no hook point between its attention and MLP"


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
    if (value := as_int(layer)) is not None:  # numpy ints, 0-d tensors
        layer = value
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
    if (value := as_int(position)) is not None:
        position = value
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
    given, positions = positions, as_ints(positions)
    if positions is None:
        raise ValueError(f"{argument} must be None, an int or ints in [-{n_pos}, {n_pos}), "
                         f"got {given!r}")
    bad = [p for p in positions
           if isinstance(p, bool) or not isinstance(p, int) or not -n_pos <= p < n_pos]
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


def tl_names(hook_dict) -> dict[int, str]:
    """Each hook point's TL name (the one tl_lenses' docs use), keyed by ``id(point)``.

    A TransformerBridge's ``hook_dict`` lists one point under several names: its own
    (``point.name``, e.g. ``blocks.1.hook_in``) and the compatibility aliases the user hooks
    (``blocks.1.hook_resid_pre``); TL tells an alias by ``name != point.name``. An alias is
    preferred, so messages name the point as the user named it; a HookedTransformer's
    points have one name each, which is kept.
    """
    names: dict[int, str] = {}
    for name, point in hook_dict.items():
        key = id(point)
        if key not in names or (names[key] == getattr(point, "name", None)
                                and name != names[key]):
            names[key] = name
    return names


def tl_name(name: str) -> str:
    """The TL name for a Bridge hook point's own name, where only the hook point is at hand.

    ``blocks.1.hook_in`` -> ``blocks.1.hook_resid_pre``, read off the Bridge's alias tables
    (its blocks' and its own ``hook_aliases``); any other name (a HookedTransformer's, one
    without an alias) comes back as it is. Where the model is at hand, :func:`tl_names` on
    its ``hook_dict`` also sees per-model aliases.
    """
    block = re.match(r"^(blocks\.\d+\.)(.+)$", name)
    in_block, at_root = _legacy_aliases()
    if block:
        return block.group(1) + in_block.get(block.group(2), block.group(2))
    return at_root.get(name, name)


@functools.cache
def _legacy_aliases() -> tuple[dict[str, str], dict[str, str]]:
    """(own name -> TL name) inside a block and at the root, from TL's Bridge classes."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
        from transformer_lens.model_bridge.generalized_components.block import BlockBridge
    except ImportError:  # a TL without the Bridge: every name is already a TL name
        return {}, {}

    def invert(aliases) -> dict[str, str]:
        out: dict[str, str] = {}
        for alias, targets in dict(aliases or {}).items():
            for target in targets if isinstance(targets, list) else [targets]:
                out.setdefault(target, alias)
        return out

    # At the root only the embeddings' aliases: TL 3.x's HookedTransformer has its own
    # ``unembed.hook_out``, which the Bridge's table would rename.
    root = {own: alias for own, alias in invert(getattr(TransformerBridge, "hook_aliases",
                                                        None)).items()
            if alias in ("hook_embed", "hook_pos_embed")}
    return invert(getattr(BlockBridge, "hook_aliases", None)), root


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
