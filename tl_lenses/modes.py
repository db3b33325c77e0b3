"""Training mode: refuse a model whose forward pass it changes (dropout, TL's log-n scaling).

Every method reads the model's *evaluation* forward pass. ``model.train()`` sets the mode on
the roots (``model``, a Bridge's ``original_model``), but ``model.blocks[3].train()`` sets it
on one subtree only, and a GPT-2 or OPT Bridge then drops out at random in that block while
the roots say "eval". So, besides the roots, the modules whose forward pass reads the mode
are found once per module tree and their flags read on every check:

* a Bridge (the HF model runs): every dropout module with ``p > 0``, and every module
  holding a positive dropout rate as a plain number (``attention_dropout``, OPT's
  ``dropout`` and ``layerdrop``, a router's ``jitter_noise``), which its forward passes to a
  functional dropout or to SDPA only in training mode. A model without dropout (Llama,
  SmolLM2: rates of 0) has none, and a block in training mode changes nothing there.
* a HookedTransformer (TL 3.x, no dropout): each block's attention, when log-n attention
  scaling or dynamic NTK RoPE is on (TL skips both in training mode); else nothing.

``.train()`` sets a subtree's every module, so a reader below the call is always seen. The
readers are found again whenever any module registers a submodule, parameter or buffer
(the device check's trigger); a dropout rate changed in place later is not noticed.
"""

from __future__ import annotations

import re
import weakref

import torch

from tl_lenses.devices import tree_version

# Plain-number attributes a module's forward turns into a dropout (or noise) in training mode.
_RATE = re.compile(r"drop|jitter")
_DROPOUTS = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
             torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)
# model -> (structure count, [(name, module)] whose forward reads the training flag)
_READERS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def check_eval_mode(model, argument: str, *, bridge: bool) -> None:
    """Raise ValueError if ``model`` is in training mode where that changes its forward pass.

    Args:
        model: a HookedTransformer or TransformerBridge.
        argument: the name used in the message.
        bridge: whether ``model`` is a TransformerBridge.

    Raises:
        ValueError: naming the modules in training mode, with the fix (``.eval()``).
    """
    if bridge:
        roots = (model, getattr(model, "original_model", model))
        why = "the HF model's dropout is active: each pass is random"
    elif _reads_mode(model.cfg):
        roots = (model,)
        why = "TL skips its log-n attention scaling and dynamic NTK RoPE in training mode"
    else:
        return  # no dropout, nothing reads the mode
    if any(root.training for root in roots):
        raise ValueError(f"{argument} is in training mode, where its forward pass differs "
                         f"from evaluation ({why}); call {argument}.eval() first")
    training = [name for name, module in _readers(model, bridge) if module.training]
    if training:
        raise ValueError(
            f"{argument} has modules in training mode ({', '.join(training[:4])}"
            f"{' ...' if len(training) > 4 else ''}), where its forward pass differs from "
            f"evaluation ({why}); call {argument}.eval() first")


def _reads_mode(cfg) -> bool:
    """Whether a HookedTransformer's forward pass reads the training flag (TL 3.x)."""
    return bool(getattr(cfg, "use_logn_attn", False) or getattr(cfg, "use_dynamic_ntk_rope",
                                                                 False))


def _readers(model, bridge: bool) -> list[tuple[str, torch.nn.Module]]:
    """The ``(name, module)`` pairs whose forward pass reads the mode, kept per tree."""
    cached = _READERS.get(model)
    if cached is not None and cached[0] == tree_version():
        return cached[1]
    if bridge:
        found = [(name, module) for name, module in _walk(model) if _drops_out(module)]
    else:
        found = [(f"blocks.{i}.attn", block.attn) for i, block in enumerate(model.blocks)]
    _READERS[model] = (tree_version(), found)
    return found


def _walk(model):
    """Every module of the Bridge and of its HF model, each once, with a name."""
    seen = set()
    roots = [("", model)]
    original = getattr(model, "original_model", None)
    if isinstance(original, torch.nn.Module):
        roots.append(("original_model.", original))
    for prefix, root in roots:
        for name, module in root.named_modules():
            if id(module) not in seen:
                seen.add(id(module))
                # the Bridge's wrapper segments say nothing to a user: blocks.1.attn.attn_dropout
                yield prefix + name.replace("._original_component", ""), module


def _drops_out(module: torch.nn.Module) -> bool:
    """Whether ``module`` drops out (or adds noise) in training mode: a positive rate."""
    if isinstance(module, _DROPOUTS):
        return module.p > 0
    return any(_RATE.search(key) and isinstance(value, (int, float))
               and not isinstance(value, bool) and value > 0
               for key, value in vars(module).items())


__all__ = ["check_eval_mode"]
