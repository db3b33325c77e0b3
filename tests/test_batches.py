"""Batches of prompts of unequal lengths: each prompt's numbers equal that prompt run alone.

Both backends, both padding sides (the user's ``padding_side=`` and TL's tokenizer setting),
learned positions (gpt2) and rotary (llama-gqa).
"""

from __future__ import annotations

import logging

import pytest
import torch

import tl_lenses as tll
from tl_lenses.attribution import dla, head_path_dla
from tl_lenses.inputs import to_batch
from tl_lenses.lenses.attribute import LRE, attribute_lens
from tl_lenses.patchscopes import source_state
from tl_lenses.readout import _native as native
from tl_lenses.readout._row_stats import row_stats
from tl_lenses.readout.view import grid_cells
from tl_lenses.tiny import tiny_bridge, tiny_hooked

PROMPTS = ["Hi!", "Hello there, world", "abc de"]
SIDES = ["right", "left", "tokenizer-left"]


@pytest.fixture(params=[(a, b) for a in ("gpt2", "llama-gqa") for b in ("hooked", "bridge")],
                ids=lambda p: f"{p[0]}-{p[1]}", scope="module")
def model(request):
    arch, backend = request.param
    return (tiny_hooked if backend == "hooked" else tiny_bridge)(arch)


def _side(model, side):
    """The padding_side argument for a case; 'tokenizer-left' sets TL's tokenizer instead."""
    model.tokenizer.padding_side = "left" if side == "tokenizer-left" else "right"
    return None if side == "tokenizer-left" else side


@pytest.fixture(autouse=True)
def _restore_padding_side(model):
    yield
    model.tokenizer.padding_side = "right"


def _length(model, text):
    return model.to_tokens(text).shape[1]


@pytest.mark.parametrize("side", SIDES)
def test_batch_batch_helper_masks_each_side(model, side):
    padding_side = _side(model, side)
    batch = to_batch(model, PROMPTS, padding_side=padding_side)
    lengths = [_length(model, p) for p in PROMPTS]
    assert batch.lengths.tolist() == lengths
    width = max(lengths)
    for i, (text, n) in enumerate(zip(PROMPTS, lengths)):
        real = batch.tokens[i][batch.mask[i]]
        assert torch.equal(real, model.to_tokens(text)[0])
        expected = torch.arange(width) < n if side == "right" else torch.arange(width) >= width - n
        assert torch.equal(batch.mask[i].cpu(), expected)
    assert batch.last().tolist() == ([n - 1 for n in lengths] if side == "right"
                                     else [width - 1] * len(PROMPTS))


@pytest.mark.parametrize("side", SIDES)
def test_logit_lens_batch_equals_each_prompt_alone(model, side):
    padding_side = _side(model, side)
    result = tll.logit_lens(model, PROMPTS, target="next", padding_side=padding_side)
    assert result.lengths.tolist() == [_length(model, p) for p in PROMPTS]
    for i, text in enumerate(PROMPTS):
        alone = tll.logit_lens(model, text, target="next")
        n = alone.shape[2]
        assert result.mask[i, :n].all() and not result.mask[i, n:].any()
        assert torch.equal(result.top_ids[:, i, :n], alone.top_ids[:, 0])
        assert torch.equal(result.target_ids[i, :n], alone.target_ids[0])
        assert torch.equal(result.target_rank[:, i, :n], alone.target_rank[:, 0])
        for field in ("top_probs", "entropy", "kl_to_final", "target_prob"):
            torch.testing.assert_close(getattr(result, field)[:, i, :n],
                                       getattr(alone, field)[:, 0], atol=1e-5, rtol=1e-4,
                                       equal_nan=True)
        # pads: never a target, no statistics
        assert result.target_ids[i, n - 1] == -1
        assert (result.top_ids[:, i, n:] == -1).all()
        assert (result.target_rank[:, i, n:] == -1).all()
        assert result.entropy[:, i, n:].isnan().all()


@pytest.mark.parametrize("side", ["right", "left"])
def test_negative_positions_are_each_prompts_own_last_tokens(model, side):
    result = tll.logit_lens(model, PROMPTS, positions=[-2, -1], padding_side=side)
    assert result.mask.all()
    for i, text in enumerate(PROMPTS):
        alone = tll.logit_lens(model, text)
        assert torch.equal(result.top_ids[:, i], alone.top_ids[:, 0, -2:])
        torch.testing.assert_close(result.kl_to_final[:, i], alone.kl_to_final[:, 0, -2:],
                                   atol=1e-5, rtol=1e-4)
        assert result.str_tokens_at(i) == alone.str_tokens[0][-2:]


def test_a_position_a_short_prompt_lacks_is_masked(model):
    short = _length(model, PROMPTS[0])
    result = tll.logit_lens(model, PROMPTS, positions=[short], padding_side="left")
    assert not result.mask[0, 0] and result.mask[1, 0]
    assert result.entropy[:, 0, 0].isnan().all() and (result.top_ids[:, 0, 0] == -1).all()
    with pytest.raises(ValueError, match="positions"):
        tll.logit_lens(model, PROMPTS, positions=[99])


@pytest.mark.parametrize("side", ["right", "left"])
def test_tuned_and_attribute_lenses_batch_equals_alone(model, side):
    lens = tll.TunedLens.for_model(model)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        lens.weight.copy_(0.1 * torch.randn(lens.weight.shape, generator=generator))
        lens.bias.copy_(0.1 * torch.randn(lens.bias.shape, generator=generator))
    d = model.cfg.d_model
    lre = LRE(weight=torch.eye(d) + 0.1 * torch.randn(d, d, generator=generator),
                  bias=0.1 * torch.randn(d, generator=generator), layer=1)
    for run in (lambda x, **kw: tll.apply_lens(model, x, lens, **kw),
                lambda x, **kw: attribute_lens(model, x, lre, **kw)):
        result = run(PROMPTS, padding_side=side)
        for i, text in enumerate(PROMPTS):
            alone = run(text)
            n = alone.shape[2]
            assert torch.equal(result.top_ids[:, i, :n], alone.top_ids[:, 0])
            torch.testing.assert_close(result.kl_to_final[:, i, :n], alone.kl_to_final[:, 0],
                                       atol=1e-5, rtol=1e-4)


def test_tokens_with_an_attention_mask(model):
    batch = to_batch(model, PROMPTS, padding_side="left")
    from_mask = tll.logit_lens(model, batch.tokens, attention_mask=batch.mask, target="next")
    from_text = tll.logit_lens(model, PROMPTS, padding_side="left", target="next")
    assert torch.equal(from_mask.top_ids, from_text.top_ids)
    assert torch.equal(from_mask.target_rank, from_text.target_rank)
    assert torch.equal(tll.logit_lens(model, batch).top_ids, from_text.top_ids)


def test_bad_padding_arguments(model):
    batch = to_batch(model, PROMPTS)
    with pytest.raises(ValueError, match="padding_side"):
        tll.logit_lens(model, PROMPTS, padding_side="middle")
    with pytest.raises(ValueError, match="attention_mask"):
        tll.logit_lens(model, PROMPTS, attention_mask=batch.mask)  # text has its own mask
    holes = batch.mask.clone()
    holes[1, 1] = False  # a gap inside a prompt
    with pytest.raises(ValueError, match="attention_mask"):
        tll.logit_lens(model, batch.tokens, attention_mask=holes)
    with pytest.raises(ValueError, match="attention_mask"):
        tll.logit_lens(model, batch.tokens, attention_mask=batch.mask[:, :-1])
    empty = batch.mask.clone()
    empty[0] = False
    with pytest.raises(ValueError, match="attention_mask"):
        tll.logit_lens(model, batch.tokens, attention_mask=empty)
    with pytest.raises(ValueError, match="padding_side"):  # a right-padded mask, said left
        tll.logit_lens(model, batch.tokens, attention_mask=batch.mask, padding_side="left")
    before = batch.mask.clone()
    with pytest.raises(ValueError, match="target"):
        tll.logit_lens(model, batch.tokens, attention_mask=batch.mask,
                       target=torch.full_like(batch.tokens, model.cfg.d_vocab))
    assert torch.equal(batch.mask, before)


@pytest.mark.parametrize("side", ["right", "left"])
def test_dla_batch_equals_each_prompt_alone(model, side):
    result = dla(model, PROMPTS, [("a", "b"), "c"], positions=-1, padding_side=side)
    for i, text in enumerate(PROMPTS):
        alone = dla(model, text, [("a", "b"), "c"], positions=-1)
        torch.testing.assert_close(result.values[:, i], alone.values[:, 0], atol=1e-5,
                                   rtol=1e-4)
        torch.testing.assert_close(result.logits[i], alone.logits[0], atol=1e-5, rtol=1e-4)
    all_positions = dla(model, PROMPTS, "c", positions=None, padding_side=side)
    n = _length(model, PROMPTS[0])
    assert all_positions.mask[0, :n].all() and not all_positions.mask[0, n:].any()
    assert all_positions.values[:, 0, n:].isnan().all()


def _nan_cache(model, name, where):
    tokens = to_batch(model, PROMPTS[1]).tokens
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    cache = {key: value.clone() for key, value in cache.items()}
    cache[name][where] = float("nan")
    return tokens, cache


@pytest.mark.parametrize("fused", [False, True])
def test_non_finite_cells_get_no_rank_and_a_warning(model, fused, caplog):
    if fused and native.row_stats_kernel() is None:
        pytest.skip("no C kernel here")
    name = "blocks.1.hook_resid_pre"
    tokens, cache = _nan_cache(model, name, (0, 3, 0))
    with caplog.at_level(logging.WARNING, logger="tl_lenses"):
        result = tll.apply_lens_to_cache(model, cache, tokens, target="final", fused=fused)
    layer = result.hook_names.index(name)
    assert result.target_rank[layer, 0, 3] == -1
    assert (result.top_ids[layer, 0, 3] == -1).all()
    assert result.entropy[layer, 0, 3].isnan() and result.kl_to_final[layer, 0, 3].isnan()
    finite = torch.ones_like(result.entropy, dtype=torch.bool)
    finite[layer, 0, 3] = False
    assert (result.target_rank[finite] >= 1).all() and result.entropy[finite].isfinite().all()
    warnings = [r for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 1 and name in warnings[0].getMessage()
    values, text, tips, _, _ = grid_cells(result, "rank", 0, "value")
    row = len(result.hook_names) - 1 - layer  # the grid's rows run from the last layer
    assert values[row][3] != values[row][3] and text[row][3] == ""  # NaN: shown as missing
    assert "no finite logits" in tips[row][3]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_row_stats_flag_non_finite_rows_in_both_paths(value):
    logits = torch.randn(1, 4, 300, generator=torch.Generator().manual_seed(0))
    logits[0, 2, 17] = value
    chosen = logits[..., :1].clone()
    for fused in ([False, True] if native.row_stats_kernel() is not None else [False]):
        scratch = None if fused else torch.empty_like(logits)
        stats = row_stats(logits.clone(), chosen, 3, scratch, fused)
        assert stats.finite.tolist() == [[True, True, False, True]]
        assert (stats.top_ids[0, 2] == -1).all() and stats.top_values[0, 2].isnan().all()
        assert (stats.top_ids[0, [0, 1, 3]] >= 0).all()


def test_non_finite_final_residual_and_dla(model, caplog):
    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    tokens, cache = _nan_cache(model, final, (0, 2))
    with caplog.at_level(logging.WARNING, logger="tl_lenses"):
        result = tll.apply_lens_to_cache(model, cache, tokens, target="final")
    assert (result.target_rank[:, 0, 2] == -1).all()
    assert result.kl_to_final[:, 0, 2].isnan().all()
    assert any(final in r.getMessage() for r in caplog.records)


def test_padded_views_leave_pad_cells_blank(model):
    result = tll.logit_lens(model, PROMPTS, target="next")

    n = _length(model, PROMPTS[0])
    values, text, tips, _, cols = grid_cells(result, "rank", 0, "top1")
    assert all(row[p] == "" for row in text for p in range(n, len(row)))
    assert all(row[p] == "" for row in tips for p in range(n, len(row)))
    assert cols[n:] == [""] * (len(cols) - n)
    assert all(row[p] != row[p] for row in values for p in range(n, len(row)))  # NaN


@pytest.mark.parametrize("side", ["right", "left"])
def test_head_paths_batch_equal_each_prompt_alone(model, side):
    heads = ["L2H1", "L1H0"]
    result = head_path_dla(model, PROMPTS, ("a", "b"), heads=heads, padding_side=side)
    for i, text in enumerate(PROMPTS):
        alone = head_path_dla(model, text, ("a", "b"), heads=heads)
        n = alone.values.shape[3]
        real = result.mask[i].nonzero()[:, 0]
        assert len(real) == n and result.destinations[i] == real[-1]
        torch.testing.assert_close(result.values[:, :, i, real], alone.values[:, :, 0],
                                   atol=1e-5, rtol=1e-4)
        assert (result.values[:, :, i, ~result.mask[i]] == 0).all()
        torch.testing.assert_close(result.logits[i], alone.logits[0], atol=1e-5, rtol=1e-4)


def test_patchscope_sweep_sources_of_different_lengths_equal_each_alone(model):
    sources = ["Hi!", "Hello there, world"]
    sweep = tll.patchscope_sweep(model, sources, "x y z", source_layers=[1, 2],
                                 source_positions=[-1, 0], target_layers=[1], k=3)
    for case in range(len(sweep)):
        alone = tll.patchscope(model, sources[int(sweep.source_index[case])], "x y z",
                               source_layer=int(sweep.source_layer[case]),
                               source_position=int(sweep.source_position[case]),
                               target_layer=1)
        assert int(sweep.top_ids[case, 0]) == int(alone.logits.argmax())


def test_patchscopes_take_one_prompt_and_flag_non_finite_logits(model, caplog):
    with pytest.raises(ValueError, match="source_prompt"):
        tll.patchscope(model, ["Hi!", "Hello"], "x y z", source_layer=1)
    with pytest.raises(ValueError, match="target_prompt"):
        tll.patchscope(model, "Hi!", ["x y z", "x"], source_layer=1)
    with pytest.raises(ValueError, match="source_prompt"):
        source_state(model, ["Hi!", "Hello"], layer=1)
    with caplog.at_level(logging.WARNING, logger="tl_lenses"):
        result = tll.patchscope(model, "Hi!", "x y z", source_layer=1,
                                transform=lambda h: h * float("nan"))
        sweep = tll.patchscope_sweep(model, "Hi!", "x y z", source_layers=[1],
                                     target_layers=[1], transform=lambda h: h * float("nan"))
    assert result.top_tokens() == []
    assert (sweep.top_ids == -1).all() and sweep.top_probs.isnan().all()
    assert sweep.top_tokens() == [""]
    assert any("blocks.1.hook_resid_pre" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kwargs, argument", [
    ({"hook_names": ["blocks.0.hook_resid_pre"], "incl_mid": True}, "incl_mid"),
    ({"incl_mid": 1}, "incl_mid"),
    ({"k": True}, "k"),
    ({"chunk_size": True}, "chunk_size"),
    ({"keep_logits": "yes"}, "keep_logits"),
    ({"positions": True}, "positions"),
    ({"positions": [0.5]}, "positions"),
    ({"positions": []}, "positions"),
    ({"target": -3}, "target"),
    ({"target": torch.full((1, 4), -2)}, "target"),
    ({"fused": "yes"}, "fused"),
])
def test_lens_arguments_are_never_silently_ignored(model, kwargs, argument):
    tokens = torch.tensor([[1, 2, 3, 4]])
    before = tokens.clone()
    with pytest.raises((ValueError, TypeError), match=argument):
        tll.logit_lens(model, tokens, **kwargs)
    assert torch.equal(tokens, before)


@pytest.mark.parametrize("kwargs, argument", [
    ({"positions": [9]}, "positions"),
    ({"positions": True}, "positions"),
    ({"directions": 10**6}, "directions"),
    ({"directions": (1, 10**6)}, "wrong"),
    ({"padding_side": "up"}, "padding_side"),
])
def test_dla_arguments_are_checked(model, kwargs, argument):
    kwargs = {"directions": "a", **kwargs}
    with pytest.raises((ValueError, TypeError), match=argument):
        dla(model, torch.tensor([[1, 2, 3, 4]]), kwargs.pop("directions"), **kwargs)


@pytest.mark.parametrize("side", ["right", "left"])
def test_lens_evaluation_of_unequal_rows_weighs_each_row_alone(model, side):
    batch = to_batch(model, PROMPTS, padding_side=side)
    together = tll.evaluate_lenses(model, batch.tokens, attention_mask=batch.mask,
                                   batch_size=2).metrics["logit"]
    alone = [tll.evaluate_lenses(model, to_batch(model, p).tokens).metrics["logit"]
             for p in PROMPTS]
    assert together.n_tokens == sum(m.n_tokens for m in alone)
    for field in ("kl", "cross_entropy", "entropy", "top1_agreement"):
        expected = sum(getattr(m, field) * m.n_tokens for m in alone) / together.n_tokens
        torch.testing.assert_close(getattr(together, field), expected, atol=1e-5, rtol=1e-4)
