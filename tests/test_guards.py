"""Silent wrong numbers turned into errors: DLA's identities, results and lenses tied to a model.

* DLA decomposes the model's own forward pass: a hook that edits the residual stream (or a
  cache of another model) breaks "the parts add up to the logit", which is checked on every
  result and refused naming the hooks; an edit of a component's own output is decomposed.
* ``with_attention`` refuses a model that is not the one the result came from.
* A lens or LRE carries the fingerprint of its model, checked at every use by one function
  (:func:`tl_lenses.readout.fingerprint.check_lens`); a string where a lens belongs is a
  TypeError naming the argument.
"""

from __future__ import annotations

import gc
import re

import pytest
import torch
from conftest import assert_no_hooks

import tl_lenses as tll
from tl_lenses import analysis
from tl_lenses.attribution.core import dla
from tl_lenses.attribution.paths import head_path_dla
from tl_lenses.lenses.attribute.io import load_lre, save_lre
from tl_lenses.lenses.attribute.lens import attribute_lens
from tl_lenses.lenses.attribute.lre import LRE, check_lre, estimate_lre
from tl_lenses.lenses.attribute.relations import Relation, Sample
from tl_lenses.lenses.tl_hook import tl_lens_hook
from tl_lenses.lenses.tuned.eval import evaluate_lenses
from tl_lenses.lenses.tuned.lens import TunedLens
from tl_lenses.patchscopes.presets import token_identity
from tl_lenses.readout.apply import LensCollector, apply_lens, apply_lens_to_cache
from tl_lenses.readout.fingerprint import check_each_lens, check_lens
from tl_lenses.sae.decoder_lens import latent_lens
from tl_lenses.tiny import tiny_bridge, tiny_default, tiny_hooked

PROMPT = "When Mary and John went"
PAIR = ("M", "J")
FACTS = tuple(Sample(s, o) for s, o in zip("abcdef", "uvwxyz"))


def _rows(model, batch=2, n_pos=8, seed=0):
    return torch.randint(0, 256, (batch, n_pos), generator=torch.Generator().manual_seed(seed))


def _zero_dims(resid, hook):
    resid = resid.clone()
    resid[..., :8] = 0
    return resid


def _twin(model, seed=0):
    """A fresh model of ``model``'s arch and backend (same weights at the same seed)."""
    arch = "gpt2" if model.cfg.normalization_type in ("LN", "LNPre") else "llama-gqa"
    build = tiny_bridge if type(model).__name__ == "TransformerBridge" else tiny_hooked
    return build(arch, seed=seed)


# --- DLA: the identities --------------------------------------------------------------------

def test_a_hook_editing_the_residual_stream_is_refused_naming_it(tiny_model):
    tokens = _rows(tiny_model)
    tiny_model.add_hook("blocks.1.hook_resid_pre", _zero_dims)
    try:
        with pytest.raises(ValueError, match=r"do not add up.*hooks on \['blocks\.1\."):
            dla(tiny_model, tokens, PAIR)
        with pytest.raises(ValueError, match=r"head's own DLA.*hooks on \['blocks\.1\."):
            head_path_dla(tiny_model, tokens, PAIR, heads=["L2H0"])
    finally:
        tiny_model.reset_hooks()
    assert_no_hooks(tiny_model)
    dla(tiny_model, tokens, PAIR)  # and without the hook it holds again


def test_a_recording_hook_changes_nothing(tiny_model):
    tokens = _rows(tiny_model)
    plain = dla(tiny_model, tokens, PAIR, positions=None)
    plain_paths = head_path_dla(tiny_model, tokens, PAIR, heads=["L2H0", "L1H3"])
    seen = []
    tiny_model.add_hook("blocks.1.hook_resid_pre", lambda resid, hook: seen.append(resid.shape))
    try:
        hooked = dla(tiny_model, tokens, PAIR, positions=None)
        paths = head_path_dla(tiny_model, tokens, PAIR, heads=["L2H0", "L1H3"])
    finally:
        tiny_model.reset_hooks()
    assert seen
    assert torch.equal(hooked.values, plain.values)
    assert torch.equal(paths.values, plain_paths.values)


def test_an_edit_of_a_components_output_is_decomposed(tiny_model):
    """Zeroing head L0H1's z: its part is 0 and the rest still add up to the edited logit."""
    tokens = _rows(tiny_model)

    def ablate_head(z, hook):
        z = z.clone()
        z[:, :, 1] = 0
        return z

    tiny_model.add_hook("blocks.0.attn.hook_z", ablate_head)
    try:
        result = dla(tiny_model, tokens, PAIR, positions=None)
        with torch.no_grad():
            logits = tiny_model(tokens)
    finally:
        tiny_model.reset_hooks()
    assert torch.equal(result["L0H1"].values, torch.zeros_like(result["L0H1"].values))
    a, b = (tiny_model.to_single_token(t) for t in PAIR)
    torch.testing.assert_close(result.total(), (logits[..., a] - logits[..., b])[..., None],
                               atol=1e-5, rtol=1e-5)


def test_another_models_cache_is_refused(tiny_model):
    tokens = _rows(tiny_model)
    with torch.no_grad():
        _, cache = _twin(tiny_model, seed=1).run_with_cache(tokens)
    with pytest.raises(ValueError, match="cache= does not hold this model's forward pass"):
        dla(tiny_model, tokens, PAIR, cache=cache)
    with pytest.raises(ValueError, match="cache= does not hold this model's forward pass"):
        head_path_dla(tiny_model, tokens, PAIR, heads=["L2H0"], cache=cache)
    with torch.no_grad():
        _, own = tiny_model.run_with_cache(tokens)
    torch.testing.assert_close(dla(tiny_model, tokens, PAIR, cache=own).values,
                               dla(tiny_model, tokens, PAIR).values)


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa"])
def test_the_identities_hold_in_bfloat16(arch):
    model = tiny_default(arch, dtype=torch.bfloat16)
    tokens = _rows(model)
    result = dla(model, tokens, PAIR, positions=None, neurons=True)
    torch.testing.assert_close(result.total(), result.logits, atol=0.05, rtol=0.02)
    head_path_dla(model, tokens, PAIR)  # every head: its paths add up (else ValueError)


# --- with_attention: the result's own model -------------------------------------------------

def test_with_attention_refuses_another_model(tiny_model):
    tokens = _rows(tiny_model)
    result = dla(tiny_model, tokens, PAIR)
    paths = head_path_dla(tiny_model, tokens, PAIR, heads=["L2H0"])
    same_shape = _twin(tiny_model, seed=1)
    for view in (result, paths, paths.flat()):
        with pytest.raises(ValueError, match="not the model this result came from"):
            view.with_attention(same_shape)
    smaller = tiny_default("gpt2", n_layers=2)
    with pytest.raises(ValueError, match="n_layers=2 here, 3 there"):
        result.with_attention(smaller)
    shown = result.with_attention(tiny_model, k=2)
    assert len(shown.attention) == 2
    assert set(paths.with_attention(tiny_model).attention) == {"L2H0"}


def test_with_attention_takes_a_reloaded_model_once_the_original_is_gone():
    model = tiny_default("gpt2")
    result = dla(model, _rows(model), PAIR)
    del model
    gc.collect()
    reloaded = tiny_default("gpt2")
    shown = result.with_attention(reloaded, k=1)
    assert len(shown.attention) == 1


# --- lenses: one check at every use ---------------------------------------------------------

def _uses(model, lens):
    """Every entry point that applies a lens, each a thunk."""
    rows = _rows(model, n_pos=6)
    with torch.no_grad():
        _, cache = model.run_with_cache(rows)
    quick = dict(progress=False)
    return {
        "apply_lens": lambda: apply_lens(model, PROMPT, lens),
        "apply_lens_to_cache": lambda: apply_lens_to_cache(model, cache, rows, lens),
        "LensCollector": lambda: LensCollector(model, lens),
        "tl_lens_hook": lambda: tl_lens_hook(model, lens),
        "evaluate_lenses": lambda: evaluate_lenses(model, rows, {"x": lens}),
        "token_identity": lambda: token_identity(model, "ab", lenses=[lens]),
        "current_vs_next": lambda: analysis.current_vs_next(model, rows, {"x": lens}, **quick),
        "causal_fidelity": lambda: analysis.causal_fidelity(model, rows, {"x": lens}, **quick),
        "residual_drift": lambda: analysis.residual_drift(model, rows, tuned=lens, **quick),
        "retrained_decoders": lambda: analysis.retrained_decoders(
            model, rows, rows, tuned=lens, steps=1, **quick),
        "latent_lens": lambda: latent_lens(model, None, lens),
    }


USES = [
    "apply_lens", "apply_lens_to_cache", "LensCollector", "tl_lens_hook", "evaluate_lenses",
    "token_identity", "current_vs_next", "causal_fidelity", "residual_drift",
    "retrained_decoders", "latent_lens"]


@pytest.mark.parametrize("use", USES)
def test_a_lens_for_another_model_is_refused_at_every_use(use):
    model = tiny_default("llama-gqa")
    other_weights = TunedLens.for_model(tiny_default("llama-gqa", seed=1))
    other_norm = TunedLens.for_model(tiny_default("gpt2"))   # same d_model, LayerNorm
    for lens, match in ((other_weights, "fingerprint"), (other_norm, "norm=")):
        with pytest.raises(ValueError, match=f"made for a different model.*{match}"):
            _uses(model, lens)[use]()


@pytest.mark.parametrize("use", USES)
def test_a_string_for_a_lens_is_a_type_error(use):
    """(Under the test run's runtime type checking a ``Lens`` annotation may refuse it first.)"""
    model = tiny_default("gpt2")
    with pytest.raises(TypeError, match="'tuned'"):
        _uses(model, "tuned")[use]()


@pytest.mark.parametrize("bad", ["tuned", b"tuned", 3, torch.zeros(3)])
def test_the_shared_check_names_the_argument_and_what_is_expected(bad):
    model = tiny_default("gpt2")
    with pytest.raises(TypeError, match=r"^lenses\['x'\] must be a lens"):
        check_lens(model, bad, argument="lenses['x']")
    with pytest.raises(TypeError, match="must be a lens"):
        tl_lens_hook(model, bad)   # the TypeError its docstring promises


def test_a_string_for_the_lens_collection_is_a_type_error():
    model = tiny_default("gpt2")
    with pytest.raises(TypeError, match="lenses must be a mapping"):
        check_each_lens(model, "tuned")
    with pytest.raises(TypeError, match=r"lenses\[1\] must be a lens"):
        check_each_lens(model, [tll.LogitLens(), "tuned"])


def test_legitimate_uses_of_a_lens_pass():
    """The same weights rebuilt, in bfloat16, and (TL 3.x) on the other backend."""
    model = tiny_default("llama-gqa")
    lens = TunedLens.for_model(model)
    reference = apply_lens(model, PROMPT, lens).top_ids
    assert torch.equal(apply_lens(tiny_default("llama-gqa"), PROMPT, lens).top_ids, reference)
    half = tiny_default("llama-gqa", dtype=torch.bfloat16)
    apply_lens(half, PROMPT, lens)
    apply_lens(model, PROMPT, TunedLens.for_model(half))
    if tll.tiny.DEFAULT_BACKEND == "hooked":
        bridge = tiny_bridge("llama-gqa")
        assert torch.equal(apply_lens(bridge, PROMPT, lens).top_ids, reference)
        apply_lens(model, PROMPT, TunedLens.for_model(bridge))


def test_the_check_follows_an_in_place_change_of_the_decoder():
    model = tiny_default("llama-gqa")
    lens = TunedLens.for_model(model)
    check_lens(model, lens)
    with torch.no_grad():
        model.W_U.mul_(-1)   # cached probes must not hide this
    with pytest.raises(ValueError, match="fingerprint"):
        check_lens(model, lens)


# --- LREs ------------------------------------------------------------------------------------

def test_an_lre_knows_its_model(tmp_path):
    llama = tiny_default("llama-gqa")
    lre = estimate_lre(llama, Relation("toy", ("{} =",), FACTS), layer=1, n=3)
    assert lre.model_info["n_layers"] == llama.cfg.n_layers
    attribute_lens(llama, "a = u", lre)
    gpt2, sibling = tiny_default("gpt2"), tiny_default("llama-gqa", seed=1)
    for model in (gpt2, sibling):
        with pytest.raises(ValueError, match="lre was made for a different model"):
            attribute_lens(model, "a = u", lre)
        with pytest.raises(ValueError, match="lre was made for a different model"):
            save_lre(lre, tmp_path / "lre", model)
    assert not (tmp_path / "lre").exists()
    loaded = load_lre(save_lre(lre.with_beta(2.0), tmp_path / "lre", llama), llama)
    assert loaded.model_info["d_model"] == llama.cfg.d_model
    with pytest.raises(ValueError, match="lre was made for a different model"):
        attribute_lens(sibling, "a = u", loaded)
    attribute_lens(gpt2, "a = u", LRE.identity(gpt2.cfg.d_model))  # no model_info: any model


def test_a_tensor_for_an_lre_is_a_type_error_naming_it():
    model = tiny_default("gpt2")
    weight = LRE.identity(model.cfg.d_model).weight
    with pytest.raises(TypeError, match="lre"):  # (or the test run's runtime type check)
        attribute_lens(model, "a = u", weight)
    with pytest.raises(TypeError, match="^lre must be an LRE"):
        check_lre(model, weight)


def test_results_pickle_and_keep_their_shape_check(tiny_model):
    """pickle / torch.save of DLA results: the values come back; the stamp checks the shape."""
    import io
    import pickle

    tokens = _rows(tiny_model)
    result = dla(tiny_model, tokens, PAIR)
    paths = head_path_dla(tiny_model, tokens, PAIR, heads=["L2H0"])
    for original in (result, paths):
        loaded = pickle.loads(pickle.dumps(original))
        assert torch.equal(loaded.values, original.values)
        assert loaded.source.ref() is None and loaded.source.shape == original.source.shape
        buffer = io.BytesIO()
        torch.save(original, buffer)
        buffer.seek(0)
        assert torch.equal(torch.load(buffer, weights_only=False).values, original.values)
    loaded = pickle.loads(pickle.dumps(result))
    assert loaded.str_tokens == result.str_tokens
    assert len(loaded.with_attention(tiny_model, k=1).attention) == 1      # the same shape
    with pytest.raises(ValueError, match="n_layers=2 here"):
        loaded.with_attention(tiny_default("gpt2", n_layers=2))


def test_a_cache_of_other_tokens_is_refused_and_the_right_one_kept(tiny_model):
    """A same-shaped cache of another input is self-consistent (the parts still add up), so
    the cached embeddings must be the input's tokens' at the cells DLA reads."""
    from tl_lenses.hooks import run_cache
    from tl_lenses.inputs import to_batch

    tokens, other = _rows(tiny_model, seed=0), _rows(tiny_model, seed=1)
    names = None

    def cache_of(ids):
        return run_cache(tiny_model, to_batch(tiny_model, ids), names)

    for heads in (True, False):
        from tl_lenses.attribution.core import needed_hooks
        names = needed_hooks(tiny_model, heads=heads)
        ran = dla(tiny_model, tokens, PAIR, heads=heads)
        kept = dla(tiny_model, tokens, PAIR, heads=heads, cache=cache_of(tokens))
        assert torch.equal(kept.values, ran.values)
        with pytest.raises(ValueError, match="forward pass of input: in prompts"):
            dla(tiny_model, tokens, PAIR, heads=heads, cache=cache_of(other))
    with pytest.raises(ValueError, match="forward pass of input: in prompts"):
        head_path_dla(tiny_model, tokens, PAIR, heads=["L2H0"],
                      cache=tiny_model.run_with_cache(other)[1])
    assert_no_hooks(tiny_model)


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa"])
def test_a_cache_of_another_width_is_refused_by_name(arch):
    model = tiny_default(arch, n_layers=2)
    narrow = tiny_default(arch, n_layers=2, d_model=16)
    tokens = _rows(model)
    with pytest.raises(ValueError, match="cache= is of a model with d_model=16"):
        dla(model, tokens, PAIR, cache=narrow.run_with_cache(tokens)[1])


def test_a_cache_of_fewer_layers_is_named_as_another_models(tiny_model):
    tokens = _rows(tiny_model)
    shallow = tiny_default("llama-gqa", n_layers=1)
    with pytest.raises(ValueError, match=r"holds blocks 0-0 but this model has 3: a cache of "
                                         r"another model"):
        dla(tiny_model, tokens, PAIR, cache=shallow.run_with_cache(tokens)[1])


def test_int_tensor_directions_are_token_ids_or_refused_naming_both_forms(tiny_model):
    a, b = tiny_model.to_single_token("M"), tiny_model.to_single_token("J")
    by_tensor = dla(tiny_model, PROMPT, (torch.tensor(a), torch.tensor(b)), heads=False)
    assert torch.equal(by_tensor.values, dla(tiny_model, PROMPT, (a, b), heads=False).values)
    vector = torch.ones(tiny_model.cfg.d_model, dtype=torch.long)
    with pytest.raises(TypeError, match=r"neither a token id .* nor a direction vector "
                                        r"\(a float tensor"):
        dla(tiny_model, PROMPT, vector)


# --- training mode --------------------------------------------------------------------------

def test_a_bridge_in_training_mode_is_refused_and_left_as_it_was():
    """Dropout (GPT-2's default 0.1) makes every pass random: refused, as TL 4.3's tools do."""
    from tl_lenses.tiny_families import tiny_family_bridge

    model = tiny_family_bridge("gpt2")
    evaluated = tll.logit_lens(model, "hello world", k=3)
    model.train()
    for call in (lambda: tll.logit_lens(model, "hello world", k=3),
                 lambda: dla(model, "hello world", ("a", "b")),
                 lambda: tll.patchscope(model, "hello world", "abc x", source_layer=1,
                                        target_layer=1)):
        with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
            call()
    assert model.training  # refused, not switched behind the user's back
    assert_no_hooks(model)
    model.eval()
    again = tll.logit_lens(model, "hello world", k=3)
    torch.testing.assert_close(again.top_probs, evaluated.top_probs, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_one_block_in_training_mode_is_refused_where_it_drops_out(family):
    """``model.blocks[1].train()`` leaves the roots in eval mode, but GPT-2's and OPT's
    dropout (0.1) then makes that block random: refused, naming the block's modules."""
    from tl_lenses.tiny_families import tiny_family_bridge

    model = tiny_family_bridge(family)
    tokens = torch.tensor([[3, 5, 7, 9, 11]])
    evaluated = tll.logit_lens(model, tokens, k=3)
    own_hooks = _hook_ids(model)  # TL 4.3's OPT Bridge keeps hooks of its own on the MLPs
    model.blocks[1].train()
    with torch.no_grad():  # the premise: two passes of the model now differ
        assert not torch.equal(model(tokens), model(tokens))
    for call in (lambda: tll.logit_lens(model, tokens, k=3),
                 lambda: dla(model, tokens, (3, 5)),
                 lambda: tll.patchscope(model, tokens, tokens, source_layer=1,
                                        target_layer=1)):
        with pytest.raises(ValueError, match=r"modules in training mode \(.*blocks\.1.*"
                                             r"model\.eval\(\)"):
            call()
    assert model.blocks[1].training and not model.training  # left as the user set them
    assert _hook_ids(model) == own_hooks
    model.eval()
    again = tll.logit_lens(model, tokens, k=3)
    torch.testing.assert_close(again.top_probs, evaluated.top_probs, rtol=0, atol=0)


def _hook_ids(model) -> dict[str, set[int]]:
    return {name: {*hp._forward_hooks, *hp._backward_hooks}
            for name, hp in model.hook_dict.items() if hp._forward_hooks or hp._backward_hooks}


def test_one_block_in_training_mode_is_accepted_where_nothing_reads_it():
    """A Llama-style model has dropout rates of 0: a block in training mode runs exactly as
    in evaluation, so it is not refused (the numbers are the evaluation's)."""
    from tl_lenses.tiny_families import tiny_family_bridge

    model = tiny_family_bridge("llama")
    tokens = torch.tensor([[3, 5, 7, 9, 11]])
    evaluated = dla(model, tokens, (3, 5))
    model.blocks[1].train()
    try:
        trained_block = dla(model, tokens, (3, 5))
    finally:
        model.eval()
    torch.testing.assert_close(trained_block.values, evaluated.values, rtol=0, atol=0)


@pytest.mark.hooked
def test_a_hooked_attention_in_training_mode_is_refused_with_log_n_scaling():
    """TL reads the training flag on each block's attention: one attention in training mode
    (roots in eval mode) skips log-n scaling there."""
    model = tiny_hooked("llama-gqa").eval()
    model.blocks[1].attn.train()
    tll.logit_lens(model, "hello world", k=3)  # nothing reads the mode without the flags
    model.cfg.use_logn_attn = True
    try:
        with pytest.raises(ValueError, match=r"modules in training mode \(blocks\.1\.attn\)"):
            tll.logit_lens(model, "hello world", k=3)
    finally:
        model.cfg.use_logn_attn = False


@pytest.mark.hooked
def test_a_hooked_transformer_in_training_mode_is_refused_only_where_it_matters():
    """TL 3.x's HookedTransformer has no dropout: training mode (a fresh nn.Module's) changes
    nothing unless log-n attention or dynamic NTK RoPE read it."""
    model = tiny_hooked("llama-gqa")
    evaluated = tll.logit_lens(model, "hello world", k=3)
    model.train()
    trained_mode = tll.logit_lens(model, "hello world", k=3)
    torch.testing.assert_close(trained_mode.top_probs, evaluated.top_probs, rtol=0, atol=0)
    for flag in ("use_logn_attn", "use_dynamic_ntk_rope"):
        setattr(model.cfg, flag, True)
        try:
            with pytest.raises(ValueError, match="log-n attention scaling"):
                tll.logit_lens(model, "hello world", k=3)
        finally:
            setattr(model.cfg, flag, False)


# --- messages name hook points as the user hooked them --------------------------------------


@pytest.mark.parametrize("name", ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"])
def test_dla_names_a_hooked_point_by_its_tl_name(tiny_model, name):
    """A Bridge lists one hook point under its own name and TL's alias: DLA's refusal of a
    residual edit names the alias (``blocks.1.hook_resid_pre``), never ``blocks.1.hook_in``."""
    tokens = _rows(tiny_model)
    tiny_model.add_hook(name, _zero_dims)
    try:
        with pytest.raises(ValueError, match=rf"hooks on \['{re.escape(name)}'\]"):
            dla(tiny_model, tokens, PAIR)
    finally:
        tiny_model.reset_hooks()
    assert_no_hooks(tiny_model)


@pytest.mark.parametrize("name", ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid",
                                  "blocks.1.hook_resid_post", "blocks.0.hook_attn_out",
                                  "blocks.0.hook_mlp_out", "hook_embed"])
def test_patch_hook_names_the_point_as_hooked(tiny_model, name):
    """patch_hook's out-of-range position names the TL name, as the user hooked it."""
    from tl_lenses.patchscopes import patch_hook

    hook = patch_hook(torch.zeros(tiny_model.cfg.d_model), 99)
    with pytest.raises(ValueError, match=rf"outside the 8 positions at {re.escape(name)}$"):
        tiny_model.run_with_hooks(_rows(tiny_model), fwd_hooks=[(name, hook)])
    assert_no_hooks(tiny_model)


def test_each_hook_points_tl_name_is_a_name_of_that_point(tiny_model):
    """``tl_names`` (from the model) and ``tl_name`` (from the point's own name) give a name
    under which ``hook_dict`` holds that very point, and an alias wherever the point has one."""
    from tl_lenses.hooks import tl_name, tl_names

    hook_dict = tiny_model.hook_dict
    names = tl_names(hook_dict)
    for name, point in hook_dict.items():
        assert hook_dict[names[id(point)]] is point
        assert hook_dict[tl_name(point.name)] is point
        if name != point.name:  # the point has an alias: that is what messages use
            assert names[id(point)] != point.name
    resid = [n for n in names.values() if re.fullmatch(r"blocks\.\d+\.hook_resid_(pre|post)", n)]
    assert len(resid) == 2 * tiny_model.cfg.n_layers
