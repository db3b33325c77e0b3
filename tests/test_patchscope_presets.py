"""Patchscope presets and cross-model maps: invariants on tiny models, one run on SmolLM2."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_no_hooks

from tl_lenses.patchscopes.core import patchscope, source_states
from tl_lenses.patchscopes.cross import fit_affine_map, random_rotation, rotated_copy
from tl_lenses.patchscopes.presets import (
    attribute_extraction,
    chain_of_thought,
    entity_description,
    placeholder_position,
    token_identity,
)
from tl_lenses.tiny import tiny_default, tiny_pair

PROMPT = "hello world, cats"


def test_token_identity_scores(tiny_model):
    result = token_identity(tiny_model, PROMPT, positions=[0, 3, -1])
    n = tiny_model.cfg.n_layers
    assert result.layers == list(range(n + 1)) and result.positions == [0, 3, 16]
    with torch.no_grad():
        logprobs = tiny_model(tiny_model.to_tokens(PROMPT))[0, result.positions].log_softmax(-1)
    assert result.final_top1.tolist() == logprobs.argmax(-1).tolist()
    expected = (result.patched_top1 == result.final_top1).float().mean(-1)
    assert torch.equal(result.precision_at_1, expected)
    for i in range(n + 1):
        for j in range(3):
            top = result.patched_top1[i, j]
            assert result.surprisal[i, j] == pytest.approx(-logprobs[j, top].item(), abs=1e-5)
    # The logit lens at the final resid_post is the model's own prediction.
    assert result.lens_precision_at_1["logit lens"][-1] == 1.0
    assert torch.equal(result.lens_top1["logit lens"][-1], result.final_top1)
    assert_no_hooks(tiny_model)


def test_placeholder_missing_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="placeholder"):
        token_identity(tiny_model, PROMPT, target_prompt="no mark here")
    with pytest.raises(ValueError, match="placeholder"):
        entity_description(tiny_model, PROMPT, target_prompt="nothing", placeholder="@@")
    with pytest.raises(ValueError, match="max_new_tokens"):
        entity_description(tiny_model, PROMPT, max_new_tokens=0)
    assert placeholder_position(tiny_model, "ab x", "x") == 3


def test_entity_description_matches_single_calls(tiny_model):
    table = entity_description(tiny_model, PROMPT, layers=[1, 3], max_new_tokens=4,
                               target_prompt="a: b, x")
    for layer, text in table.rows():
        alone = patchscope(tiny_model, PROMPT, "a: b, x", source_layer=layer,
                           max_new_tokens=4)
        assert text == alone.generated_text


def test_attribute_extraction_counts_hits(tiny_model):
    samples = [("France", "capital of x", "zz"), ("Peru", "the x", "")]  # "" is always found
    result = attribute_extraction(tiny_model, samples, source_layers=[0, 2],
                                  target_layers=[1, 3], max_new_tokens=3)
    assert result.success.shape == (2, 2)
    texts = result.sweep.generations()
    first = [("zz" in t.lower()) for t, j in zip(texts, result.sweep.source_index) if j == 0]
    assert torch.allclose(result.success.flatten(), 0.5 + torch.tensor(first).float() / 2)


def test_chain_of_thought_composed_mask_isolates_inner():
    """With rotary positions and no BOS, the masked composed run sees `inner` exactly as alone."""
    outer, inner = "CEO of", "the company"
    for model in tiny_pair("llama-gqa"):
        composed = chain_of_thought(model, outer, inner, source_layers=[1, 3],
                                    target_layers=[2], max_new_tokens=2)
        # The composed prompt joins with a space, so `inner` alone is " " + inner.
        split = chain_of_thought(model, outer, " " + inner, composed=False,
                                 source_layers=[1, 3], target_layers=[2], max_new_tokens=2)
        torch.testing.assert_close(composed.top_probs, split.top_probs, atol=1e-4, rtol=1e-4)
        assert composed.generated_ids.tolist() == split.generated_ids.tolist()
        # Without the mask the inner tokens do see the outer ones.
        tokens = model.to_tokens(outer + " " + inner)
        alone = model.to_tokens(inner)
        masked_free = source_states(model, tokens, [3], [-1])[0, 0]
        assert not torch.allclose(masked_free, source_states(model, alone, [3], [-1])[0, 0])
        assert_no_hooks(model)


def test_cross_model_rotation_recovered():
    """M* = M rotated by Q: the fitted map is Q (b = 0) and patching through it reproduces M."""
    from tl_lenses.tiny import tiny_hooked

    model = tiny_hooked("llama")
    Q = random_rotation(model.cfg.d_model, seed=3)
    rotated = rotated_copy(model, Q)
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        torch.testing.assert_close(rotated(tokens), model(tokens), atol=1e-4, rtol=1e-4)
    prompts = ["the quick brown fox jumps", "over the lazy dog again", "hello world, cats!",
               "patchscopes map residuals"]
    fit = fit_affine_map(model, rotated, prompts, source_layer=2, target_layer=2)
    assert fit.r2 > 0.9999
    torch.testing.assert_close(fit.map.A, Q, atol=1e-3, rtol=0)
    torch.testing.assert_close(fit.map.b, torch.zeros_like(fit.map.b), atol=1e-3, rtol=0)
    for position in (-1, 4):
        mine = patchscope(model, PROMPT, "a: b, x", source_layer=2, source_position=position)
        cross = patchscope(model, PROMPT, "a: b, x", source_layer=2, source_position=position,
                           target_model=rotated, transform=fit.map)
        torch.testing.assert_close(cross.logits, mine.logits, atol=1e-3, rtol=1e-3)


def test_cross_model_bad_input():
    from tl_lenses.tiny import tiny_hooked

    model = tiny_hooked("llama")
    with pytest.raises(ValueError, match="shared"):
        fit_affine_map(model, model, ["ab"], source_layer=1, target_layer=1)
    with pytest.raises(ValueError, match="orthogonal"):
        rotated_copy(model, torch.ones(32, 32))
    with pytest.raises(ValueError, match="RMSPre"):
        rotated_copy(tiny_hooked("gpt2"), torch.eye(32))


@pytest.mark.slow
def test_smollm_token_identity_and_description(smollm):
    result = token_identity(smollm, "The Eiffel Tower is in the city of", positions=[-1])
    assert result.precision_at_1[-1] == 1.0  # l = l* = final: the model's own prediction
    table = entity_description(smollm, "Diana, Princess of Wales", layers=[0, 10, 20],
                               max_new_tokens=8)
    assert len(table.generations) == 3 and all(table.generations)


def test_views_write_html_and_png(tmp_path):
    from tl_lenses.patchscopes.sweep import patchscope_sweep
    from tl_lenses.patchscopes.view import (
        attribute_html,
        attribute_png,
        generation_table_html,
        sweep_html,
        sweep_png,
        token_identity_html,
        token_identity_png,
    )
    from tl_lenses.viz.html import page

    model = tiny_default("llama")
    sweep = patchscope_sweep(model, PROMPT, "a: b, x", source_layers=[0, 2],
                             target_layers=[1, 2, 3])
    html = sweep_html(sweep)
    assert html.count("<td") == 6 and "l*=3" in html
    identity = token_identity(model, PROMPT, positions=[1, 2])
    attribute = attribute_extraction(model, [("France", "capital x", "P")],
                                     source_layers=[1], target_layers=[1, 2])
    table = entity_description(model, PROMPT, layers=[1, 2], max_new_tokens=3,
                               target_prompt="a: b, x")
    doc = page("t", html, token_identity_html(identity), attribute_html(attribute),
               generation_table_html(table))
    assert "logit lens P@1" in doc and "<script" not in doc
    for name, draw in [("s.png", lambda p: sweep_png(sweep, p)),
                       ("i.png", lambda p: token_identity_png(identity, p)),
                       ("a.png", lambda p: attribute_png(attribute, p))]:
        assert draw(tmp_path / name).stat().st_size > 1000


def test_cli_layers_parsing():
    from tl_lenses.patchscopes.cli import parse_layers

    assert parse_layers("3:6") == [3, 4, 5] and parse_layers("1,5") == [1, 5]
    assert parse_layers(None) is None
    with pytest.raises(ValueError, match="--layers"):
        parse_layers("a-b")


@pytest.mark.parametrize("argv", [
    ["identity", "hello", "--layers", "0,2", "--png", "{tmp}/i.png"],
    ["describe", "hello", "--target", "a: b, x", "--max-new-tokens", "3"],
    ["sweep", "hello", "--layers", "1:3", "--target-layers", "0,3", "--png", "{tmp}/s.png"],
    ["cot", "CEO of", "--inner", "the firm", "--layers", "2", "--target-layers", "1"],
])
def test_cli_runs_each_preset(tmp_path, monkeypatch, argv, capsys):
    """The subcommand end to end, on a tiny model standing in for the embedded one."""
    import argparse

    import tl_lenses.models
    from tl_lenses.patchscopes import cli as command

    monkeypatch.setattr(tl_lenses.models, "load_default_model", lambda **kw: tiny_default())
    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers())
    out = tmp_path / "r.html"
    args = parser.parse_args(["patchscope", *[a.format(tmp=tmp_path) for a in argv],
                              "--out", str(out)])
    assert args.func(args) == 0
    assert out.stat().st_size > 500 and "wrote" in capsys.readouterr().out


def test_token_identity_accepts_any_lens(tiny_model):
    """A fresh tuned lens is the logit lens; a perturbed one is scored from its own decoding."""
    from tl_lenses.lenses.tuned.lens import TunedLens
    from tl_lenses.readout.unembed import Unembed

    fresh = TunedLens.for_model(tiny_model)
    result = token_identity(tiny_model, PROMPT, positions=[2, -1], lenses=[fresh])
    assert torch.equal(result.lens_top1["tuned lens"], result.lens_top1["logit lens"])
    with torch.no_grad():
        fresh.bias.normal_(generator=torch.Generator().manual_seed(0))
    result = token_identity(tiny_model, PROMPT, positions=[2, -1], lenses=[fresh])
    states = source_states(tiny_model, tiny_model.to_tokens(PROMPT), [1], [2, -1])[0]
    expected = Unembed.from_model(tiny_model)(
        fresh.translate(states, "blocks.1.hook_resid_pre")).argmax(-1)
    assert torch.equal(result.lens_top1["tuned lens"][1], expected)
