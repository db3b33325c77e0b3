"""The family matrix: every method's invariant on every model family, both backends.

Each (family, backend) member runs every check of tests/family_checks.py; a member passes
when every method is exact, or refuses with the error this file expects (naming the
feature). The README's architecture table is this matrix, printed by
scripts/family_table.py.
"""

from __future__ import annotations

import functools

import pytest
import torch
from family_checks import METHODS, run_check, tokens_of

from tl_lenses._compat import DEFAULT_BACKEND
from tl_lenses.tiny_families import (
    BRIDGE_FAMILIES,
    HOOKED_FAMILIES,
    family_members,
    folds_norms,
    tiny_family,
    tiny_family_hf,
    tiny_family_hooked,
)

# (family, backend, method) -> a phrase the refusal must contain. Anything else must be exact.
EXPECTED_REFUSALS = {
    ("mixtral", "hooked", "DLA neurons"): "mixtures of experts",
    ("mixtral", "bridge", "DLA neurons"): "mixtures of experts",
    ("gemma2", "hooked", "head-path DLA"): "normalises each sublayer's output",
    ("gemma2", "bridge", "head-path DLA"): "normalises each sublayer's output",
    ("olmo2-post-norm", "hooked", "head-path DLA"): "normalises each sublayer's output",
    ("olmo2", "bridge", "head-path DLA"): "normalises each sublayer's output",
    ("shortformer", "hooked", "head-path DLA"): "not folded",
    ("gpt-j", "bridge", "head-path DLA"): "attention pattern",
    ("opt", "bridge", "head-path DLA"): "attention pattern",
}


# Bridge members with features of their own run by default; the rest of the Bridge matrix
# (plain pre-norm families, each already exact on the HookedTransformer side) is marked slow
# to keep the default run short on a shared 2-core machine.
DEFAULT_BRIDGES = {"gemma2", "olmo2", "mixtral", "gpt-j", "pythia", "bloom"}


def _members():
    return [pytest.param(f, b, id=f"{f}-{b}", marks=[pytest.mark.slow]
                         if b == "bridge" and f not in DEFAULT_BRIDGES else [])
            for f, b in family_members()]


@functools.lru_cache(maxsize=None)
def member(family: str, backend: str):
    """One tiny model per member for the whole run (every check leaves it unchanged)."""
    return tiny_family(family, backend)


@pytest.mark.parametrize("family, backend", _members())
def test_every_method_is_exact_or_refuses_clearly(family, backend):
    """Each method on the member: exact, or the refusal EXPECTED_REFUSALS names."""
    model = member(family, backend)
    problems = []
    for method in METHODS:
        outcome = run_check(model, method)
        expected = EXPECTED_REFUSALS.get((family, backend, method))
        if expected is None and outcome.status != "exact":
            problems.append(f"{method}: {outcome.status}: {outcome.detail}")
        elif expected is not None and (outcome.status != "refused"
                                       or expected not in outcome.detail):
            problems.append(f"{method}: expected a refusal naming {expected!r}, got "
                            f"{outcome.status}: {outcome.detail}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("family", sorted(BRIDGE_FAMILIES))
def test_bridge_family_reproduces_its_hf_model(family):
    """The tiny Bridges are the HF models (so the matrix tests TL's wrapping of each)."""
    model, hf_model = member(family, "bridge"), tiny_family_hf(family)
    tokens = tokens_of(model)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_model(tokens).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(HOOKED_FAMILIES))
def test_processing_keeps_the_logits_where_norms_are_folded(family):
    """tl_lenses' processing is exact on every hooked family it folds; TL's fold_ln is not
    exact on the families kept unfolded (the reason they are)."""
    raw, processed = tiny_family_hooked(family, processed=False), member(family, "hooked")
    tokens = tokens_of(raw)
    with torch.no_grad():
        torch.testing.assert_close(processed(tokens), raw(tokens), atol=1e-4, rtol=1e-4)
    if not folds_norms(family):
        assert processed.cfg.normalization_type in ("LN", "RMS")


def test_unfolded_weights_are_refused_where_folding_is_needed():
    """head_path_dla needs ln1 folded: unprocessed weights are a ValueError naming fold_ln."""
    import tl_lenses as tll

    model = tiny_family_hooked("gpt2", processed=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="fold_ln"):
        tll.head_path_dla(model, tokens_of(model), (1, 2))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def _unprocessed_bridge(family: str):
    """A Bridge in compatibility mode without weight processing: its norms keep weights."""
    from tl_lenses._compat import bridge_from_module
    from tl_lenses.tiny import byte_tokenizer

    model = bridge_from_module(tiny_family_hf(family), BRIDGE_FAMILIES[family][2],
                               tokenizer=byte_tokenizer(), model_name=family)
    model.cfg.default_prepend_bos, model.cfg.device = False, "cpu"
    model.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_unfolded_bridge_norms_are_refused_naming_the_norm(family):
    """A Bridge's norm modules stay whether or not they are folded: the weights say which.

    Unprocessed ln1 weights are the same ValueError as on a HookedTransformer (not "the
    paths do not add up"); the same model with every ln1 a pure normalisation (weight 1,
    bias 0) is taken, and its paths add up to the heads' DLA (checked inside).
    """
    import tl_lenses as tll
    from tests.conftest import assert_no_hooks

    model = _unprocessed_bridge(family)
    tokens = tokens_of(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"ln1 weights are not folded \(blocks\.0\.ln1.*"
                                         r"no_processing=True"):
        tll.head_path_dla(model, tokens, (1, 2), heads=["L1H0"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert_no_hooks(model)
    with torch.no_grad():
        for block in model.blocks:
            norm = block.ln1.original_component
            norm.weight.fill_(1.0)
            if getattr(norm, "bias", None) is not None:
                norm.bias.zero_()
    result = tll.head_path_dla(model, tokens, (1, 2), heads=["L1H0"])
    assert torch.isfinite(result.values).all()


def _calls():
    """Each method's entry point called on ``model`` with valid other arguments."""
    import tl_lenses as tll
    from tl_lenses.lenses.attribute.lre import relation_jacobian
    from tl_lenses.lenses.tuned.lens import TunedLens

    tokens = torch.tensor([[97, 98, 32, 99, 100]])
    return {
        "logit lens": lambda model: tll.logit_lens(model, tokens),
        "DLA": lambda model: tll.dla(model, tokens, (97, 98)),
        "head-path DLA": lambda model: tll.head_path_dla(model, tokens, (97, 98)),
        "patchscope": lambda model: tll.patchscope(model, tokens, tokens, source_layer=1),
        "tuned lens": lambda model: TunedLens.for_model(model),
        "LRE Jacobian": lambda model: relation_jacobian(model, "ab cd", "ab", 1),
    }


@pytest.mark.parametrize("method", list(_calls()))
def test_a_model_of_neither_backend_is_a_type_error_naming_model(method):
    plain = torch.nn.Linear(4, 4)
    plain.cfg = member("gpt2", DEFAULT_BACKEND).cfg  # looks like a model to duck typing
    with pytest.raises(TypeError, match="model must be a HookedTransformer"):
        _calls()[method](plain)


@functools.lru_cache(maxsize=None)
def _raw_bridge():
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    from tl_lenses.tiny import byte_tokenizer

    hf_model = tiny_family_hf("llama")
    return build_bridge_from_module(hf_model, "LlamaForCausalLM", hf_config=hf_model.config,
                                    tokenizer=byte_tokenizer(), model_name="raw")


@pytest.mark.parametrize("method", list(_calls()))
def test_a_bridge_without_compatibility_mode_is_refused(method):
    with pytest.raises(ValueError, match="model is a TransformerBridge without compatibility"):
        _calls()[method](_raw_bridge())
