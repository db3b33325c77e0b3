"""DLA's cells on padded batches: pads are NaN in every field, labels say what was read,
and ranking picks a prompt's own cell.

A padded batch reads each prompt at its own columns; a prompt shorter than the longest has
no token at some positions (``result.mask`` False). There, values, logits and the frozen
scale are NaN (not a neighbour's numbers); ``positions`` keeps a negative position's sign
(``-1`` is each prompt's own last token, a different column per prompt); ``top``/``sort``
rank by the cell asked for, refuse a pad, and later ``items()``/``cell()`` read that cell.
"""

from __future__ import annotations

import pytest
import torch

from tl_lenses.attribution.core import dla, needed_hooks
from tl_lenses.hooks import run_cache
from tl_lenses.inputs import to_batch

PROMPTS = ["ab cd ef gh", "a", "abc ab"]
PAIR = ("a", "b")


@pytest.mark.parametrize("heads", [True, False])
@pytest.mark.parametrize("side", ["right", "left"])
def test_pads_are_nan_and_each_prompts_cells_are_its_own(tiny_model, side, heads):
    result = dla(tiny_model, PROMPTS, PAIR, positions=None, padding_side=side, heads=heads)
    pads, real = ~result.mask, result.mask
    assert pads.any()
    assert result.values[:, pads].isnan().all()
    assert result.logits[pads].isnan().all() and result.scale[pads].isnan().all()
    assert result.logits[real].isfinite().all() and result.scale[real].isfinite().all()
    torch.testing.assert_close(result.values.sum(0)[real], result.logits[real],
                               atol=1e-5, rtol=1e-5)
    for b, prompt in enumerate(PROMPTS):
        alone = dla(tiny_model, prompt, PAIR, positions=None, heads=heads)
        cells = real[b].nonzero().flatten()
        assert len(cells) == alone.values.shape[2]
        torch.testing.assert_close(result.logits[b, cells], alone.logits[0],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result.values[:, b, cells], alone.values[:, 0],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_negative_position_keeps_its_sign_on_a_padded_batch(tiny_model, side):
    batch = to_batch(tiny_model, PROMPTS, padding_side=side)
    result = dla(tiny_model, batch, PAIR, positions=[-1, 0], heads=False)
    assert result.positions == [-1, 0]
    last = batch.offsets + batch.lengths - 1                     # each prompt's own last token
    assert torch.equal(result.columns[:, 0], last) and torch.equal(result.columns[:, 1],
                                                                    batch.offsets)
    unpadded = dla(tiny_model, torch.randint(0, 256, (2, 7)), PAIR, positions=[-1, 0],
                   heads=False)
    assert unpadded.positions == [6, 0]                           # one column for all: named


def test_top_ranks_a_prompts_own_cell_and_items_read_it(tiny_model):
    result = dla(tiny_model, PROMPTS, PAIR, positions=None, padding_side="right")
    b = 1                                   # the shortest prompt: the last position is a pad
    assert not result.mask[b, -1]
    last = int(result.mask[b].nonzero().max())
    own = result.values[:, b, last, 0]
    assert torch.equal(result.cell(batch=b), own)                 # pos=-1: its last token
    top = result.top(3, batch=b)
    expected = own.abs().argsort(descending=True)[:3].tolist()
    assert list(top.labels) == [result.labels[i] for i in expected]
    assert [v for _, v in top.items()] == own[expected].tolist()  # the ranked cell, not 0's
    assert top.focus == (b, -1, 0) and result.sort(batch=b).focus == (b, -1, 0)
    assert torch.equal(top.cell(batch=0), top.values[:, 0, int(result.mask[0].nonzero().max()), 0])
    with pytest.raises(ValueError, match="prompt 1 has no token at positions"):
        result.top(3, batch=b, pos=result.values.shape[2] - 1)
    with pytest.raises(ValueError, match="prompt 1 has only 1 of these positions"):
        result.cell(batch=b, pos=-2)
    with pytest.raises(ValueError, match="batch must be an int"):
        result.items(batch=len(PROMPTS))


def test_half_precision_parts_of_the_cache_are_checked_at_their_precision(tiny_model):
    """A cache holding the sublayer outputs in float16 is the same forward pass, stored
    coarser: the parts-sum identity holds to float16's rounding there (at float32's
    tolerance it failed by ~4e-5 on these prompts), and nothing else changes."""
    batch = to_batch(tiny_model, ["ab cd ef gh", "hello world, this is long"],
                     padding_side="right")
    cache = run_cache(tiny_model, batch, needed_hooks(tiny_model, heads=False))
    exact = dla(tiny_model, batch, PAIR, heads=False, cache=cache, positions=None)
    for name in list(cache.cache_dict):
        if name.endswith(("hook_mlp_out", "hook_attn_out")):
            cache.cache_dict[name] = cache.cache_dict[name].half()
    coarse = dla(tiny_model, batch, PAIR, heads=False, cache=cache, positions=None)
    torch.testing.assert_close(coarse.values, exact.values, atol=1e-2, rtol=1e-2,
                               equal_nan=True)
    torch.testing.assert_close(coarse.logits, exact.logits, atol=0, rtol=0, equal_nan=True)


def test_views_show_a_prompts_own_last_token_and_follow_the_ranked_cell(tiny_model):
    """The notebook view and the report read prompt 0's own last token by default (not a
    pad of a shorter prompt 0), take ``pos=``, and show the cell ``top`` ranked by."""
    result = dla(tiny_model, ["a", "ab cd ef"], PAIR, positions=None, padding_side="right")
    assert not result.mask[0, -1]
    html = result._repr_html_()
    value = float(result.logits[0, 0, 0])
    assert "prompt 0, direction" in html and f"model value {value:+.4f}" in html
    second = float(result.logits[1, 3, 0])
    assert f"model value {second:+.4f}" in result.to_html(batch=1, pos=3)
    ranked = result.top(3, batch=1)
    assert f"model value {float(result.logits[1, -1, 0]):+.4f}" in ranked._repr_html_()
    with pytest.raises(ValueError, match="prompt 0 has no token at positions"):
        result.to_html(pos=5)


def test_results_compare_by_identity_and_show_their_cell(tiny_model):
    result = dla(tiny_model, PROMPTS, PAIR, padding_side="right")
    assert result != result.top(3) and result == result
    assert "at batch 1, positions[0], direction 0" in repr(result.top(3, batch=1))
    grid = result.heads().top(2, batch=1).head_matrix()          # the whole layer x head grid
    assert grid.shape == (tiny_model.cfg.n_layers, tiny_model.cfg.n_heads)


@pytest.mark.parametrize("heads", [True, False])
def test_a_left_padded_cache_taken_without_the_mask_is_refused(tiny_model, heads):
    """Without the mask the prompts attend to their pads: a self-consistent forward pass of
    the same tokens, which only layer 0's attention pattern tells apart."""
    batch = to_batch(tiny_model, PROMPTS, padding_side="left")
    names = needed_hooks(tiny_model, heads=heads, left_padded=True)
    good = run_cache(tiny_model, batch, names)
    ran = dla(tiny_model, batch, PAIR, heads=heads)
    assert torch.equal(dla(tiny_model, batch, PAIR, heads=heads, cache=good).values,
                       ran.values)
    _, unmasked = tiny_model.run_with_cache(batch.tokens, names_filter=lambda n: n in names)
    with pytest.raises(ValueError, match="taken without this input's attention mask"):
        dla(tiny_model, batch, PAIR, heads=heads, cache=unmasked)
    without = run_cache(tiny_model, batch, needed_hooks(tiny_model, heads=heads))
    with pytest.raises(ValueError, match="must hold 'blocks.0.attn.hook_pattern'"):
        dla(tiny_model, batch, PAIR, heads=heads, cache=without)
    right = to_batch(tiny_model, PROMPTS, padding_side="right")  # causal: pads come after
    _, plain = tiny_model.run_with_cache(right.tokens)
    torch.testing.assert_close(dla(tiny_model, right, PAIR, heads=heads, cache=plain).values,
                               dla(tiny_model, right, PAIR, heads=heads).values,
                               atol=1e-5, rtol=1e-5, equal_nan=True)


def test_numpy_token_ids_and_the_shape_a_user_gave_in_messages(tiny_model):
    import numpy as np

    a, b = tiny_model.to_single_token("a"), tiny_model.to_single_token("b")
    by_numpy = dla(tiny_model, "ab", (np.int64(a), np.int64(b)), heads=False)
    assert torch.equal(by_numpy.values, dla(tiny_model, "ab", (a, b), heads=False).values)
    with pytest.raises(ValueError, match=r"got torch.float32 \(33,\)"):
        dla(tiny_model, "ab", torch.ones(33))


def test_a_report_refuses_companions_of_another_input_or_direction(tiny_model):
    """by_position / paths are drawn as explaining the result: they must share its input."""
    from tl_lenses.attribution.paths import head_path_dla

    prompt = "ab cd ef"
    result = dla(tiny_model, prompt, PAIR)
    same = dla(tiny_model, prompt, PAIR, positions=None)
    paths = head_path_dla(tiny_model, prompt, PAIR, heads=["L1H0"])
    assert "Top paths" in result.to_html(by_position=same, paths=paths)
    for kw, what in [({"by_position": dla(tiny_model, "xy zw uv", PAIR, positions=None)},
                      "by_position is a result for other tokens"),
                     ({"by_position": dla(tiny_model, prompt, ("c", "d"), positions=None)},
                      "by_position attributes directions"),
                     ({"paths": head_path_dla(tiny_model, "a", PAIR, heads=["L1H0"])},
                      "paths is a result for other tokens")]:
        with pytest.raises(ValueError, match=what):
            result.to_html(**kw)


def test_a_report_reads_a_companions_own_index_of_the_direction_shown(tiny_model):
    from tl_lenses.attribution.paths import head_path_dla

    prompt = "ab cd ef"
    result = dla(tiny_model, prompt, ["c", PAIR])
    paths = head_path_dla(tiny_model, prompt, PAIR, heads=["L1H0"])   # PAIR only: index 0
    by_position = dla(tiny_model, prompt, [PAIR], positions=None)
    page = result.to_html(by_position=by_position, paths=paths, direction=1)
    top_path, value = paths.top(1, direction=0).items(0, 0, 0)[0]
    assert f"{value:+.4f}" in page
    with pytest.raises(ValueError, match="not .*the direction shown"):
        result.to_html(paths=paths, direction=0)
