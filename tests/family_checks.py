"""Each method's invariant, checked on one model: exact, refused (and why), or wrong.

Shared by tests/test_families.py (which fails on anything but "exact" or an expected
refusal) and scripts/family_table.py (which prints the README's architecture table).
Every reference is computed another way than the method computes it: the model's own
forward pass, TL's hooks, autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import tl_lenses as tll
from tl_lenses.lenses.attribute.lre import relation_jacobian, subject_position
from tl_lenses.lenses.tuned.lens import TunedLens
from tl_lenses.readout.apply import apply_lens

# Byte-level prompt: every character is one token.
PROMPT = "ab cd ef gh"
SUBJECT = "cd"
FIELDS = ("top_ids", "top_logits", "entropy", "kl_to_final", "target_rank")


@dataclass(frozen=True)
class Outcome:
    """``status``: "exact", "refused" or "wrong"; ``detail``: the refusal or the mismatch."""

    status: str
    detail: str = ""


def tokens_of(model) -> torch.Tensor:
    return model.to_tokens(PROMPT, prepend_bos=False)


def _soft_cap(model) -> float | None:
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0)
    return cap if cap is not None and cap > 0 else None


def _close(a, b, what: str, atol: float = 1e-4) -> None:
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}")
    err = (a - b).abs().max().item()
    if not err <= atol * (1 + b.abs().max().item()):
        raise AssertionError(f"{what}: off by {err:.3g}")


def _direction(model, logits: torch.Tensor) -> tuple[int, int]:
    """(the model's top-1 at the last token, its 5th) as an answer/wrong pair."""
    order = logits[0, -1].argsort(descending=True)
    return int(order[0]), int(order[4])


def check_logit_lens(model) -> None:
    tokens = tokens_of(model)
    result = tll.logit_lens(model, tokens, keep_logits=True)
    with torch.no_grad():
        _close(result.logits[-1], model(tokens), "final lens row vs model(tokens)")


def _dla_reference(model, tokens, pair):
    """The model's own logit difference at the last token, and the pre-cap one."""
    with torch.no_grad():
        logits = model(tokens)[:, -1].float()
    own = logits[:, pair[0]] - logits[:, pair[1]]
    cap = _soft_cap(model)
    if cap is None:
        return own, own
    pre = cap * torch.atanh(logits / cap)  # invert the model's own cap * tanh(x / cap)
    return own, pre[:, pair[0]] - pre[:, pair[1]]


def _check_dla(model, **kwargs) -> None:
    tokens = tokens_of(model)
    with torch.no_grad():
        pair = _direction(model, model(tokens))
    result = tll.dla(model, tokens, pair, **kwargs)
    own, pre_cap = _dla_reference(model, tokens, pair)
    _close(result.total()[:, 0, 0], result.logits[:, 0, 0], "parts vs result.logits")
    _close(result.logits[:, 0, 0], pre_cap, "result.logits vs the model's (pre-cap) logit")
    capped = getattr(result, "capped_logits", None)
    if _soft_cap(model) is not None or capped is not None:
        if capped is None:
            raise AssertionError("soft-capped model, but the result has no capped_logits")
        _close(capped[:, 0, 0], own, "result.capped_logits vs model(tokens)")


def check_dla_layers(model) -> None:
    _check_dla(model, heads=False)


def check_dla_heads(model) -> None:
    _check_dla(model, heads=True)


def check_dla_neurons(model) -> None:
    _check_dla(model, heads=True, neurons=True)


def check_head_paths(model) -> None:
    tokens = tokens_of(model)
    with torch.no_grad():
        pair = _direction(model, model(tokens))
    paths = tll.head_path_dla(model, tokens, pair)
    heads = tll.dla(model, tokens, pair).heads()
    totals = paths.head_totals()[:, :, 0]                      # head batch
    _close(totals, heads.values[:, :, 0, 0], "head paths vs each head's DLA")


def check_patchscope(model) -> None:
    tokens = tokens_of(model)[:1]
    for layer in (0, model.cfg.n_layers):
        result = tll.patchscope(model, tokens, tokens, source_layer=layer, source_position=3,
                                target_position=3)
        with torch.no_grad():
            clean = model(tokens)[0, -1]
        if not torch.equal(result.logits, clean):
            _close(result.logits, clean, f"identity patchscope at layer {layer}", atol=0)


def check_tuned_lens(model) -> None:
    tokens = tokens_of(model)
    tuned = apply_lens(model, tokens, TunedLens.for_model(model))
    logit = apply_lens(model, tokens)
    for field in FIELDS:
        if not torch.equal(getattr(tuned, field), getattr(logit, field)):
            raise AssertionError(f"zero-init tuned lens differs from the logit lens in {field}")


def _autograd_jacobian(model, layer: int) -> torch.Tensor:
    """dz/ds by torch.autograd.functional.jacobian through a hook that writes s."""
    tokens, pos = subject_position(model, PROMPT, SUBJECT)
    names = [f"blocks.{layer}.hook_resid_pre", f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]

    def final(s):
        seen = {}

        def put(resid, hook):
            return torch.cat([resid[:, :pos], s[None, None].to(resid.dtype), resid[:, pos + 1:]], 1)

        def keep(resid, hook):
            seen["z"] = resid[0, -1]

        model.run_with_hooks(tokens, fwd_hooks=list(zip(names, [put, keep])), return_type=None)
        return seen["z"]

    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == names[0])
    s0 = cache[names[0]][0, pos].detach().clone()
    return torch.autograd.functional.jacobian(final, s0)


def check_lre_jacobian(model) -> None:
    for layer in (1,):  # a block before and after s: both the kv-cache and the hooks path
        sample = relation_jacobian(model, PROMPT, SUBJECT, layer)
        _close(sample.jacobian, _autograd_jacobian(model, layer), f"LRE Jacobian at layer {layer}",
               atol=1e-4)


METHODS = {
    "logit lens": check_logit_lens,
    "DLA layers": check_dla_layers,
    "DLA heads": check_dla_heads,
    "DLA neurons": check_dla_neurons,
    "head-path DLA": check_head_paths,
    "patchscope": check_patchscope,
    "tuned lens": check_tuned_lens,
    "LRE Jacobian": check_lre_jacobian,
}


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _hooks(model) -> dict[str, set[int]]:
    """The ids of the forward and backward hooks on each hook point that has any."""
    return {name: {*hp._forward_hooks, *hp._backward_hooks}
            for name, hp in model.hook_dict.items() if hp._forward_hooks or hp._backward_hooks}


def run_check(model, method: str) -> Outcome:
    """Run one method's check; refusals (NotImplementedError/ValueError) are outcomes too.

    A check that leaves a hook behind or changes a weight is "wrong" whatever it returned.
    """
    before = _snapshot(model)
    # TL 4.3's OPT Bridge keeps hooks of its own on each MLP from construction on: only
    # hooks that were not there before the method count as left behind.
    had = _hooks(model)
    try:
        METHODS[method](model)
        outcome = Outcome("exact")
    except (NotImplementedError, ValueError) as error:
        outcome = Outcome("refused", f"{type(error).__name__}: {error}")
    except AssertionError as error:
        outcome = Outcome("wrong", str(error))
    except Exception as error:  # a crash is a bug, not a refusal
        outcome = Outcome("wrong", f"crashed: {type(error).__name__}: {error}")
    for name, p in model.named_parameters():
        if not torch.equal(p.detach(), before[name]):
            return Outcome("wrong", f"{method} changed {name}")
    left = [name for name, hooks in _hooks(model).items() if hooks - had.get(name, set())]
    if left:
        return Outcome("wrong", f"{method} left hooks on {left[:3]}")
    return outcome


__all__ = ["METHODS", "Outcome", "run_check", "PROMPT"]
