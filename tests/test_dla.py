"""Direct logit attribution: exact sums, agreement with TL and with a patched forward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_no_hooks, assert_weights_unchanged, weights_snapshot

from tl_lenses.attribution.core import dla, logit_directions, residual_readout
from tl_lenses.attribution.paths import head_path_dla
from tl_lenses.models import is_bridge

A, B, C = ord("a"), ord("b"), ord("c")  # byte tokenizer: "a" is token 97


def _tokens(model, batch=2, n_pos=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, n_pos), generator=generator)


def _forward(model, tokens):
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("mode", [{}, {"heads": False}, {"neurons": True}])
def test_parts_sum_exactly_to_the_models_logits(tiny_model, mode):
    tokens = _tokens(tiny_model)
    vector = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    result = dla(tiny_model, tokens, [("a", "b"), "c", vector], positions=None, **mode)
    logits = _forward(tiny_model, tokens)
    assert result.values.shape == (len(result.labels), 2, 9, 3)
    torch.testing.assert_close(result.logits[..., 0], logits[..., A] - logits[..., B])
    torch.testing.assert_close(result.logits[..., 1], logits[..., C])
    torch.testing.assert_close(result.total(), result.logits, atol=1e-5, rtol=1e-5)


def test_vector_direction_is_read_off_the_norm_output(tiny_model):
    """A W_U column as a free vector gives that token's logit minus its b_U."""
    tokens = _tokens(tiny_model)
    result = dla(tiny_model, tokens, tiny_model.W_U[:, C].detach(), positions=None)
    b_U = tiny_model.b_U[C] if tiny_model.b_U is not None else 0.0
    torch.testing.assert_close(result.total()[..., 0], _forward(tiny_model, tokens)[..., C] - b_U,
                               atol=1e-5, rtol=1e-5)


def test_backends_agree(tiny_models):
    hooked, bridge = tiny_models
    tokens = _tokens(hooked)
    for mode in ({}, {"neurons": True}):
        ours = [dla(m, tokens, [("a", "b"), "c"], positions=[0, -1], **mode) for m in tiny_models]
        assert list(ours[0].labels) == list(ours[1].labels)
        torch.testing.assert_close(ours[0].values, ours[1].values, atol=1e-5, rtol=1e-4)


def test_neurons_and_heads_refine_the_layer_totals(tiny_model):
    tokens = _tokens(tiny_model)
    coarse = dla(tiny_model, tokens, ("a", "b"), positions=None, heads=False)
    fine = dla(tiny_model, tokens, ("a", "b"), positions=None, neurons=True)
    for layer in range(tiny_model.cfg.n_layers):
        prefix = f"L{layer}N"
        parts = [i for i, label in enumerate(fine.labels)
                 if label.startswith(prefix) or label == f"L{layer} b_out"]
        torch.testing.assert_close(fine.values[parts].sum(0), coarse[f"L{layer} MLP"].values[0],
                                   atol=1e-5, rtol=1e-4)
        heads = [i for i, label in enumerate(fine.labels)
                 if label.startswith(f"L{layer}H") or label == f"L{layer} b_O"]
        torch.testing.assert_close(fine.values[heads].sum(0), coarse[f"L{layer} attn"].values[0],
                                   atol=1e-5, rtol=1e-4)


def test_matches_transformer_lens(tiny_model):
    """TL's stack_head_results / decompose_resid / stack_neuron_results + logit_attrs, and
    its direct_logit_attribution tool, on both backends.

    TL's logit_attrs leaves b_U out (so its parts do not add up to the logit); otherwise the
    numbers are the same. TL's unprojected stacks build one d_model vector per head/neuron.
    """
    from transformer_lens.tools.analysis import direct_logit_attribution

    model = tiny_model
    tokens = _tokens(model)
    _, cache = model.run_with_cache(tokens)
    diff = model.W_U[:, A] - model.W_U[:, B]
    ours = dla(model, tokens, ("a", "b"), cache=cache)
    # logit_attrs applies the final norm's scale itself: the stacks go in unscaled.
    heads, head_labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    tl_heads = cache.logit_attrs(heads, tokens="a", incorrect_tokens="b", pos_slice=-1)
    torch.testing.assert_close(ours[head_labels].values[..., 0, 0], tl_heads,
                               atol=1e-5, rtol=1e-4)
    tool = direct_logit_attribution(model, tokens, "a", "b", unit="head", cache=cache)
    torch.testing.assert_close(tool.attribution[:len(head_labels)], tl_heads)

    layers = dla(model, tokens, ("a", "b"), cache=cache, heads=False)
    resid, labels = cache.decompose_resid(pos_slice=-1, return_labels=True)
    tl_layers = cache.logit_attrs(resid, tokens="a", incorrect_tokens="b", pos_slice=-1)
    torch.testing.assert_close(layers.values[:len(labels), :, 0, 0], tl_layers,
                               atol=1e-5, rtol=1e-4)
    # TL's parts stop short of the logit by exactly b_U[a] - b_U[b].
    torch.testing.assert_close(tl_layers.sum(0) + model.b_U[A] - model.b_U[B],
                               ours.logits[:, 0, 0], atol=1e-5, rtol=1e-4)

    neurons = dla(model, tokens, ("a", "b"), cache=cache, neurons=True)
    tl_neurons = cache.stack_neuron_results(model.cfg.n_layers, pos_slice=-1, apply_ln=True,
                                            project_output_onto=diff)
    ours_n = neurons[[f"L{l}N{i}" for l in range(model.cfg.n_layers)
                      for i in range(model.cfg.d_mlp)]].values[..., 0, 0]
    torch.testing.assert_close(ours_n, tl_neurons, atol=1e-5, rtol=1e-4)


def test_head_dla_equals_removing_the_head_from_the_direct_path(tiny_model):
    """Second way: subtract one head's output from the final residual only, norm scale frozen."""
    tokens = _tokens(tiny_model)
    result = dla(tiny_model, tokens, ("a", "b"), positions=None)
    layer, head = tiny_model.cfg.n_layers - 2, 1
    W_O = tiny_model.blocks[layer].attn.W_O[head].detach()
    _, clean = tiny_model.run_with_cache(tokens, names_filter="ln_final.hook_scale")
    seen = {}

    def keep_z(z, hook):
        seen["z"] = z[:, :, head].clone()

    def drop_head(resid, hook):
        return resid - seen["z"] @ W_O

    def freeze_scale(scale, hook):
        return clean["ln_final.hook_scale"]

    hooks = [(f"blocks.{layer}.attn.hook_z", keep_z),
             (f"blocks.{tiny_model.cfg.n_layers - 1}.hook_resid_post", drop_head),
             ("ln_final.hook_scale", freeze_scale)]
    with torch.no_grad():
        patched = tiny_model.run_with_hooks(tokens, fwd_hooks=hooks)
    patched_diff = patched[..., A] - patched[..., B]
    expected = result.logits[..., 0] - patched_diff
    torch.testing.assert_close(result[f"L{layer}H{head}"].values[0, ..., 0], expected,
                               atol=1e-5, rtol=1e-4)
    assert_no_hooks(tiny_model)


def test_head_paths_sum_to_each_heads_dla(tiny_model):
    tokens = _tokens(tiny_model)
    dirs = [("a", "b"), "c"]
    paths = head_path_dla(tiny_model, tokens, dirs, position=4)
    heads = dla(tiny_model, tokens, dirs, positions=4)[paths.heads].values[:, :, 0]
    torch.testing.assert_close(paths.head_totals(), heads, atol=1e-6, rtol=1e-4)
    # Sources not earlier than the head add exactly nothing.
    later = paths.sources.index("L1H0")
    assert not paths.values[paths.heads.index("L1H2"), later].any()


def _naive_path(model, cache, u, layer, head, source_output, src, dest):
    """One path the long way: ln1 with frozen scale, W_V of the head's group, pattern, W_O."""
    cfg = model.cfg
    x = source_output[:, src]
    if cfg.normalization_type in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    x = x / cache[f"blocks.{layer}.ln1.hook_scale"][:, src]
    W_V = model.blocks[layer].attn.W_V
    group = head // (cfg.n_heads // W_V.shape[0])
    v = x @ W_V[group if W_V.shape[0] != cfg.n_heads else head]
    out = cache[f"blocks.{layer}.attn.hook_pattern"][:, head, dest, src, None] * v
    return (out @ model.blocks[layer].attn.W_O[head]) @ u / cache["ln_final.hook_scale"][:, dest]


def test_head_path_matches_a_naive_computation(tiny_model):
    tokens = _tokens(tiny_model, n_pos=6)
    _, cache = tiny_model.run_with_cache(tokens)
    u, _ = residual_readout(tiny_model, logit_directions(tiny_model, ("a", "b")))
    paths = head_path_dla(tiny_model, tokens, ("a", "b"), position=5, cache=cache)
    W_O0 = tiny_model.blocks[0].attn.W_O
    sources = {"embed": cache["hook_embed"], "L0 MLP": cache["blocks.0.hook_mlp_out"],
               "L0H3": cache["blocks.0.attn.hook_z"][:, :, 3] @ W_O0[3]}
    for name, output in sources.items():
        for src in (0, 3, 5):
            naive = _naive_path(tiny_model, cache, u, 2, 1, output, src, 5)
            ours = paths.values[paths.heads.index("L2H1"), paths.sources.index(name), :, src]
            torch.testing.assert_close(ours, naive, atol=1e-6, rtol=1e-4)


@pytest.mark.hooked
def test_value_bias_path_when_not_folded():
    """With b_V kept in the heads (fold_value_biases=False) the b_V source closes the sum."""
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    from tl_lenses.models import PROCESSING
    from tl_lenses.tiny import byte_tokenizer, gpt2_config, tiny_hf_model

    hf = tiny_hf_model("gpt2")
    cfg = gpt2_config(hf.config)
    model = HookedTransformer(cfg, tokenizer=byte_tokenizer(), move_to_device=False)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg),
                                      **{**PROCESSING, "fold_value_biases": False})
    assert model.b_V.abs().max() > 0
    tokens = _tokens(model)
    paths = head_path_dla(model, tokens, ("a", "b"), position=-1)
    heads = dla(model, tokens, ("a", "b"))[paths.heads].values[:, :, 0]
    assert paths.values[:, -1].abs().max() > 1e-4  # b_V carries a real share here
    torch.testing.assert_close(paths.head_totals(), heads, atol=1e-6, rtol=1e-4)


def test_result_indexing_sorting_and_top(tiny_model):
    result = dla(tiny_model, _tokens(tiny_model), [("a", "b"), "c"], positions=[2, 5])
    top = result.top(4, batch=1, pos=1, direction=1)
    column = result.cell(1, 1, 1)
    assert torch.equal(top.cell(1, 1, 1).abs(), column.abs().sort(descending=True).values[:4])
    ordered = result.sort(absolute=False)
    assert (ordered.cell().diff() <= 0).all()
    assert ordered.total().allclose(result.total(), atol=1e-5)
    assert list(result[["L1H2", "embed"]].labels) == ["L1H2", "embed"]
    assert len(result[:3]) == 3 and result["b_U"].values.shape == (1, 2, 2, 2)
    matrix = result.head_matrix(direction=1)
    assert matrix.shape == (tiny_model.cfg.n_layers, tiny_model.cfg.n_heads)
    assert matrix[1, 2] == result["L1H2"].values[0, 0, -1, 1]
    paths = head_path_dla(tiny_model, _tokens(tiny_model), "c", heads=["L2H0", (1, 3)])
    flat = paths.flat()
    best = paths.top(3)
    label = best.labels[0]
    assert torch.equal(flat[label].values, best.values[:1])
    assert label.startswith(("L2H0 <- ", "L1H3 <- "))


def test_per_prompt_directions(tiny_model):
    tokens = _tokens(tiny_model, batch=3)
    both = dla(tiny_model, tokens, [("a", "b"), ("c", "d"), "e"], positions=None)
    mine = both.per_prompt()
    assert mine.values.shape == (len(both), 3, 9, 1)
    for i in range(3):
        assert torch.equal(mine.values[:, i, :, 0], both.values[:, i, :, i])
        assert torch.equal(mine.logits[i, :, 0], both.logits[i, :, i])
    torch.testing.assert_close(mine.total(), mine.logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one direction per prompt"):
        dla(tiny_model, tokens, "a").per_prompt()


def test_from_cache_equals_running(tiny_model):
    tokens = _tokens(tiny_model)
    _, cache = tiny_model.run_with_cache(tokens)
    ran = dla(tiny_model, tokens, ("a", "b"), neurons=True)
    cached = dla(tiny_model, tokens, ("a", "b"), neurons=True, cache=cache)
    assert torch.equal(ran.values, cached.values)
    _, partial = tiny_model.run_with_cache(tokens, names_filter="hook_embed")
    with pytest.raises(ValueError, match="cache lacks"):
        dla(tiny_model, tokens, ("a", "b"), cache=partial)
    with pytest.raises(ValueError, match="tokens are"):
        dla(tiny_model, tokens[:, :4], ("a", "b"), cache=cache)


def test_bad_input_is_named(tiny_model):
    tokens = _tokens(tiny_model)
    with pytest.raises(ValueError, match="answer 'ab' is 2 tokens"):
        dla(tiny_model, tokens, ("ab", "c"))
    with pytest.raises(ValueError, match="same token"):
        dla(tiny_model, tokens, ("a", "a"))
    with pytest.raises(ValueError, match="positions must be"):
        dla(tiny_model, tokens, "a", positions=9)
    with pytest.raises(ValueError, match="position must be in|positions must be"):
        head_path_dla(tiny_model, tokens, "a", position=-10)
    with pytest.raises(ValueError, match="unknown component label 'L9H0'"):
        dla(tiny_model, tokens, "a")["L9H0"]
    with pytest.raises(ValueError, match="heads"):
        head_path_dla(tiny_model, tokens, "a", heads=["L9H0"])
    with pytest.raises(ValueError, match="d_model"):
        dla(tiny_model, tokens, torch.zeros(5))
    with pytest.raises(ValueError, match="at least one"):
        dla(tiny_model, tokens, [])
    with pytest.raises(ValueError, match=r"\(answer, wrong\)"):
        dla(tiny_model, tokens, ("a", "b", "c"))
    with pytest.raises(ValueError, match="direction must be"):
        dla(tiny_model, tokens, "a").top(3, direction=4)


def test_bridge_without_compatibility_mode_is_refused():
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    from tl_lenses.tiny import byte_tokenizer, tiny_hf_model

    hf = tiny_hf_model("gpt2")
    bridge = build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=hf.config,
                                      tokenizer=byte_tokenizer(), model_name="raw")
    with pytest.raises(ValueError, match="compatibility mode"):
        dla(bridge, "abc", ("a", "b"))
    with pytest.raises(ValueError, match="compatibility mode"):
        head_path_dla(bridge, "abc", ("a", "b"))


def test_weights_unchanged_and_no_hooks_left(tiny_model):
    snapshot = weights_snapshot(tiny_model)
    tokens = _tokens(tiny_model)
    dla(tiny_model, tokens, ("a", "b"), neurons=True)
    head_path_dla(tiny_model, tokens, ("a", "b"))
    with pytest.raises(ValueError):
        dla(tiny_model, tokens, ("a", "a"))
    assert_weights_unchanged(tiny_model, snapshot)
    assert_no_hooks(tiny_model)


@pytest.mark.slow
def test_ioi_on_the_embedded_model(smollm):
    prompt = "When Mary and John went to the store, John gave a drink to"
    result = dla(smollm, prompt, (" Mary", " John"))
    logits = _forward(smollm, smollm.to_tokens(prompt))[0, -1]
    mary, john = smollm.to_single_token(" Mary"), smollm.to_single_token(" John")
    torch.testing.assert_close(result.logits[0, 0, 0], logits[mary] - logits[john])
    torch.testing.assert_close(result.total(), result.logits, atol=1e-3, rtol=1e-4)
    top_heads = list(result.heads().top(2).labels)
    paths = head_path_dla(smollm, prompt, (" Mary", " John"), heads=top_heads)
    torch.testing.assert_close(paths.head_totals()[:, 0, 0],
                               result[top_heads].values[:, 0, 0, 0], atol=1e-4, rtol=1e-3)
    assert not is_bridge(smollm)


def test_views_render(tiny_model, tmp_path):
    from tl_lenses.attribution.view import report_html, tokens_html

    tokens = _tokens(tiny_model, batch=1)
    result = dla(tiny_model, tokens, [("a", "b"), "c"])
    by_position = dla(tiny_model, tokens, [("a", "b"), "c"], positions=None)
    paths = head_path_dla(tiny_model, tokens, ("a", "b"), heads=["L2H1"])
    html = report_html(result, by_position=by_position, paths=paths, k=5, direction=0)
    assert html.startswith("<!DOCTYPE html>") and "L2H1 &lt;- " in html
    assert "ColoredTokensMulti" in html  # the circuitsvis per-position views are inlined
    with pytest.raises(ValueError, match="positions=None"):
        tokens_html(result)
    for view in ("heads", "top"):
        png = result.save_png(tmp_path / f"{view}.png", view)
        assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="view must be"):
        result.save_png(tmp_path / "x.png", "pie")


def test_command_line(monkeypatch, tmp_path, capsys):
    import tl_lenses.models
    from tl_lenses.attribution import cli as command
    from tl_lenses.tiny import tiny_default

    monkeypatch.setattr(tl_lenses.models, "load_default_model", lambda backend: tiny_default())
    import argparse

    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers())
    out = tmp_path / "report.html"
    args = parser.parse_args(["dla", "hello world", "--answer", "a", "--wrong", "b",
                              "--out", str(out), "--png", str(tmp_path / "h.png"),
                              "--neurons", "--paths", "2"])
    assert args.func(args) == 0
    assert out.read_text().count("<h2>") >= 4
    printed = capsys.readouterr().out
    import re

    found = re.search(r"model (\S+) = sum of parts (\S+)", printed)
    model_value, parts = map(float, found.groups())
    assert abs(model_value - parts) < 1e-4


def _fresh_parse(model, spec):
    """``logit_directions`` with nothing remembered for ``model``."""
    from tl_lenses.attribution import directions

    directions._TOKENS.pop(model, None)
    return logit_directions(model, spec)


@pytest.mark.parametrize("spec", [("a", "b"), "c", A, [("a", "b"), "c", (A, C)], ["a", "b"]])
def test_token_directions_parsed_once_equal_a_fresh_parse(tiny_model, spec, monkeypatch):
    """The second call reuses the parse (no tokenizing) and gives the same bits."""
    from tl_lenses import inputs

    first = _fresh_parse(tiny_model, spec)
    calls = []
    real = inputs.single_token
    monkeypatch.setattr("tl_lenses.attribution.directions.single_token",
                        lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    again = logit_directions(tiny_model, spec)
    assert calls == []
    assert torch.equal(again.vectors, first.vectors) and torch.equal(again.offset, first.offset)
    assert again.labels == first.labels and again.token_pairs == first.token_pairs
    assert again.vectors.data_ptr() != first.vectors.data_ptr()   # fresh tensors each call
    assert len(logit_directions(tiny_model, ["a", "b"])) == 2 != len(
        logit_directions(tiny_model, ("a", "b")))                  # a list is not a pair


def test_remembered_directions_see_every_weight_edit_and_a_new_tokenizer(tiny_model,
                                                                         monkeypatch):
    """Vectors are read off W_U every call: an edit through .data (no version bump) shows;
    a changed tokenizer parses again; a bool is still refused after its int was parsed."""
    from tl_lenses import inputs

    before = _fresh_parse(tiny_model, ("a", "b"))
    with torch.no_grad():
        tiny_model.W_U.data[:, A] += 1.0         # .data: the version counter stays
    after = logit_directions(tiny_model, ("a", "b"))
    torch.testing.assert_close(after.vectors, before.vectors + 1.0)
    logit_directions(tiny_model, 1)
    with pytest.raises(TypeError, match="bool"):
        logit_directions(tiny_model, True)
    calls = []
    real = inputs.single_token
    monkeypatch.setattr("tl_lenses.attribution.directions.single_token",
                        lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    logit_directions(tiny_model, ("a", "b"))
    assert calls == []
    tiny_model.tokenizer.add_tokens(["zz"])      # the tokenizer changed: parsed again
    assert logit_directions(tiny_model, ("a", "b")).token_pairs == ((A, B),)
    assert calls == ["a", "b"]
