"""Hook-point names and checks shared by every method (TL's names, both backends)."""

from __future__ import annotations

import re

RESID_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.hook_(\w+)$")


def block_hook(model, layer: int, kind: str = "resid_pre", *, argument: str = "layer") -> str:
    """``blocks.{layer}.hook_{kind}``, with ``layer`` checked (negative counts from the end)."""
    n_layers = model.cfg.n_layers
    if not isinstance(layer, int) or not -n_layers <= layer < n_layers:
        raise ValueError(f"{argument} must be an int in [-{n_layers}, {n_layers}), got {layer!r}")
    if kind not in RESID_KINDS:
        raise ValueError(f"kind must be one of {RESID_KINDS}, got {kind!r}")
    return f"blocks.{layer % n_layers}.hook_{kind}"


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
    known = set(model.hook_dict)
    unknown = [name for name in names if name not in known]
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
