"""The lens on a given cache checks that cache against its tokens, as DLA does.

A cache of the wrong run is a self-consistent forward pass, so the lens's numbers look fine:
a left-padded batch run without its mask, another model's cache, a cache of other tokens.
Each is refused by name (tl_lenses.cache_checks), and a right cache reads what
``apply_lens`` reads, each prompt as it reads alone.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_no_hooks

import tl_lenses as tll
from tl_lenses.cache_checks import PATTERN_HOOK, check_cache_input, check_embeddings
from tl_lenses.hooks import resid_names
from tl_lenses.inputs import to_batch
from tl_lenses.lenses.tuned import TunedLens
from tl_lenses.readout.apply import LensCollector, apply_lens, apply_lens_to_cache
from tl_lenses.tiny import tiny_bridge, tiny_hooked
from tl_lenses.tiny_families import family_members, tiny_family

PROMPTS = ["Hi!", "Hello there, world", "abc de"]
OTHER = ["Ho?", "Jello where, worms", "xyz ab"]  # the same lengths, other tokens
FIELDS = ("top_probs", "entropy", "kl_to_final", "target_prob")


def _params():
    return [pytest.param((arch, backend), id=f"{arch}-{backend}",
                         marks=[pytest.mark.hooked] if backend == "hooked" else [])
            for arch in ("gpt2", "llama-gqa") for backend in ("hooked", "bridge")]


@pytest.fixture(params=_params(), scope="module")
def model(request):
    arch, backend = request.param
    return (tiny_hooked if backend == "hooked" else tiny_bridge)(arch)


def _other_model(model):
    """The same arch and backend at another seed: the same shapes, other weights."""
    arch = "gpt2" if model.cfg.normalization_type in ("LN", "LNPre") else "llama-gqa"
    build = tiny_bridge if type(model).__name__ == "TransformerBridge" else tiny_hooked
    return build(arch, seed=1)


def _cache(model, batch, *, mask=True, names=None):
    """The cache a user takes: run_with_cache on the tokens, with or without the mask."""
    kwargs = {"attention_mask": batch.mask.long()} if mask else {}
    if names is not None:
        kwargs["names_filter"] = lambda name: name in names
    with torch.no_grad():
        return model.run_with_cache(batch.tokens, **kwargs)[1]


def _resid_only(model, *, pattern: bool):
    return [*resid_names(model), *([PATTERN_HOOK] if pattern else [])]


def _assert_same(result, reference):
    assert torch.equal(result.top_ids, reference.top_ids)
    for field in FIELDS:
        torch.testing.assert_close(getattr(result, field), getattr(reference, field),
                                   atol=0, rtol=0, equal_nan=True)


def _assert_each_prompt_alone(model, result, prompts):
    for i, text in enumerate(prompts):
        alone = tll.logit_lens(model, text)
        n = alone.shape[2]
        assert result.mask[i, :n].all() and not result.mask[i, n:].any()
        assert torch.equal(result.top_ids[:, i, :n], alone.top_ids[:, 0])
        for field in FIELDS:
            torch.testing.assert_close(getattr(result, field)[:, i, :n],
                                       getattr(alone, field)[:, 0], atol=1e-5, rtol=1e-4,
                                       equal_nan=True)


@pytest.mark.parametrize("names", ["all", "resid"])
def test_a_left_padded_cache_taken_without_the_mask_is_refused(model, names):
    batch = to_batch(model, PROMPTS, padding_side="left")
    filter_ = None if names == "all" else _resid_only(model, pattern=True)
    unmasked = _cache(model, batch, mask=False, names=filter_)
    with pytest.raises(ValueError, match="cache was taken without the tokens' attention_mask"):
        apply_lens_to_cache(model, unmasked, batch.tokens, attention_mask=batch.mask)
    with pytest.raises(ValueError, match="taken without"):  # also when reading one position
        apply_lens_to_cache(model, unmasked, batch, positions=-1)


def test_a_left_padded_cache_needs_layer_0s_pattern(model):
    batch = to_batch(model, PROMPTS, padding_side="left")
    cache = _cache(model, batch, names=_resid_only(model, pattern=False))
    with pytest.raises(ValueError, match=r"cache of a left-padded batch must hold "
                                         r"'blocks.0.attn.hook_pattern'.*names_filter"):
        apply_lens_to_cache(model, cache, batch)


@pytest.mark.parametrize("names", ["all", "resid"])
def test_a_masked_left_padded_cache_reads_each_prompt_as_alone(model, names):
    batch = to_batch(model, PROMPTS, padding_side="left")
    filter_ = None if names == "all" else _resid_only(model, pattern=True)
    cache = _cache(model, batch, names=filter_)
    result = apply_lens_to_cache(model, cache, batch.tokens, attention_mask=batch.mask)
    _assert_same(result, apply_lens(model, batch))
    _assert_each_prompt_alone(model, result, PROMPTS)
    last = apply_lens_to_cache(model, cache, batch, positions=-1)
    _assert_same(last, apply_lens(model, batch, positions=-1))


@pytest.mark.parametrize("names", ["all", "resid"])
def test_right_padding_needs_no_pattern(model, names):
    """Attention is causal: pads after a prompt cannot change its tokens, mask or not."""
    batch = to_batch(model, PROMPTS, padding_side="right")
    filter_ = None if names == "all" else _resid_only(model, pattern=False)
    for mask in (True, False):
        cache = _cache(model, batch, mask=mask, names=filter_)
        result = apply_lens_to_cache(model, cache, batch)
        _assert_same(result, apply_lens(model, batch))
    _assert_each_prompt_alone(model, result, PROMPTS)


@pytest.mark.parametrize("names", ["all", "resid"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_another_models_cache_is_refused(model, names, side):
    batch = to_batch(model, PROMPTS, padding_side=side)
    filter_ = None if names == "all" else _resid_only(model, pattern=True)
    theirs = _cache(_other_model(model), batch, names=filter_)
    for positions in (None, -1, [0, 2]):
        with pytest.raises(ValueError, match=r"cache does not hold this model's forward pass "
                                             r"of tokens: in prompts \[0"):
            apply_lens_to_cache(model, theirs, batch, positions=positions)


@pytest.mark.parametrize("names", ["all", "resid"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_a_cache_of_other_tokens_is_refused(model, names, side):
    batch, other = (to_batch(model, p, padding_side=side) for p in (PROMPTS, OTHER))
    assert torch.equal(other.mask, batch.mask) and not torch.equal(other.tokens, batch.tokens)
    filter_ = None if names == "all" else _resid_only(model, pattern=True)
    cache = _cache(model, other, names=filter_)
    with pytest.raises(ValueError, match=r"forward pass of tokens: in prompts \[0, 1, 2\]"):
        apply_lens_to_cache(model, cache, batch)
    # its own tokens pass: the refusal is about the tokens, not the cache
    _assert_same(apply_lens_to_cache(model, cache, other), apply_lens(model, other))


def test_a_cache_of_another_width_is_refused_by_name():
    model, narrow = tiny_bridge("gpt2"), tiny_bridge("gpt2", d_model=16)
    tokens = model.to_tokens("Hello")
    with pytest.raises(ValueError, match="cache is of a model with d_model=16"):
        apply_lens_to_cache(model, _cache(narrow, to_batch(model, tokens)), tokens)


@pytest.mark.parametrize("family,backend", [
    pytest.param(f, b, id=f"{f}-{b}", marks=[pytest.mark.hooked] if b == "hooked" else [])
    for f, b in family_members()])
def test_a_right_resid_only_cache_passes_in_every_family(family, backend):
    """blocks.0.hook_resid_pre is the embedding plus, for learned positions, W_pos at each
    prompt's own positions (OPT's table keeps two rows before position 0): a right cache
    passes at every cell, on every side, and one of other tokens does not."""
    model = tiny_family(family, backend)
    for side in ("right", "left"):
        batch, other = (to_batch(model, p, padding_side=side) for p in (PROMPTS, OTHER))
        names = _resid_only(model, pattern=True)
        cache, theirs = _cache(model, batch, names=names), _cache(model, other, names=names)
        # (some Bridges' attention records no pattern: there only the embeddings are read)
        check = check_cache_input if PATTERN_HOOK in cache else check_embeddings
        for positions in (None, -1, [0, 1, -1]):
            check(model, cache, batch, batch.select(positions))
        with pytest.raises(ValueError, match="forward pass of input"):
            check(model, theirs, batch, batch.select(None))
        # one token other than the input's, before the cell read: that cell's residual
        # differs, and the cache is refused though the cell read holds the right token
        changed = _first_tokens_changed(model, batch)
        one_off = _cache(model, changed, names=names)
        with pytest.raises(ValueError, match=r"forward pass of input: in prompts \[0, 1, 2\]"):
            check(model, one_off, batch, batch.select(-1))


def _first_tokens_changed(model, batch):
    """``batch`` with each prompt's first real token replaced by the next id."""
    tokens = batch.tokens.clone()
    rows = torch.arange(len(tokens))
    first = batch.offsets
    tokens[rows, first] = (tokens[rows, first] + 1) % model.cfg.d_vocab
    return to_batch(model, tokens, attention_mask=batch.mask, padding_side=batch.padding_side)


@pytest.mark.parametrize("build", [pytest.param(tiny_hooked, marks=pytest.mark.hooked),
                                   tiny_bridge])
def test_a_cache_of_a_near_token_before_the_cell_read_is_refused(build):
    """A token whose embedding points almost the same way (cosine > 0.9; a real model's
    " to" and " for" have 0.6) at a cell not read: each real token is compared exactly."""
    model = build("llama-gqa")
    batch = to_batch(model, PROMPTS, padding_side="right")
    changed = _first_tokens_changed(model, batch)
    a, b = int(batch.tokens[0, 0]), int(changed.tokens[0, 0])
    with torch.no_grad():
        W_E = model.embed.W_E
        W_E[b] = 0.95 * W_E[a] + 0.05 * W_E[b]
    assert torch.cosine_similarity(W_E[a], W_E[b], dim=0) > 0.9
    cache = _cache(model, changed)
    for positions in (-1, None):
        with pytest.raises(ValueError, match=r"forward pass of tokens: in prompts \[0, 1, 2\]"):
            apply_lens_to_cache(model, cache, batch, positions=positions)
        with pytest.raises(ValueError, match=r"cache= does not hold .* in prompts \[0, 1, 2\]"):
            tll.dla(model, batch, ("a", "b"), cache=cache, positions=positions)
    assert_no_hooks(model)
    torch.testing.assert_close(tll.dla(model, changed, ("a", "b"), cache=cache).values,
                               tll.dla(model, changed, ("a", "b")).values)


def test_a_cache_without_embeddings_is_not_checked_for_them(model):
    """Neither hook_embed nor blocks.0.hook_resid_pre cached: nothing to read them at."""
    batch, other = (to_batch(model, p) for p in (PROMPTS[:1], OTHER[:1]))
    names = [f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    cache = _cache(model, other, names=names)
    result = apply_lens_to_cache(model, cache, batch, hook_names=names)
    assert result.str_tokens == tll.logit_lens(model, batch).str_tokens  # the given tokens'


def test_a_collectors_hook_without_a_translator_fails_at_construction(model):
    lens = TunedLens.for_model(model)
    calls = []
    model.add_hook("hook_embed", lambda x, hook: calls.append(1))
    try:
        with pytest.raises(ValueError, match="'blocks.0.hook_attn_out' has no translator"):
            LensCollector(model, lens, hook_names=["blocks.0.hook_attn_out"])
        with pytest.raises(ValueError, match="'blocks.0.hook_attn_out' has no translator"):
            apply_lens(model, "Hello", lens, hook_names=["blocks.0.hook_attn_out"])
    finally:
        model.reset_hooks()
    assert not calls  # refused before any forward pass
    assert_no_hooks(model)
    LensCollector(model, lens, layers=[0, 1])  # covered hook points are accepted


@pytest.mark.parametrize("hook_names", [None, ["blocks.1.hook_resid_post"]])
def test_the_collector_checks_what_its_hooks_saw(model, hook_names):
    batch, other = (to_batch(model, p, padding_side="left") for p in (PROMPTS, OTHER))

    def collect(tokens, **kwargs):
        collector = LensCollector(model, hook_names=hook_names)
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=collector.fwd_hooks(), **kwargs)
        return collector

    masked = collect(batch.tokens, attention_mask=batch.mask.long())
    _assert_same(masked.result(batch.tokens, attention_mask=batch.mask),
                 apply_lens(model, batch, hook_names=hook_names))
    unmasked = collect(batch.tokens)
    with pytest.raises(ValueError, match="the forward pass the collector's hooks saw was taken "
                                         "without the tokens' attention_mask"):
        unmasked.result(batch.tokens, attention_mask=batch.mask)
    of_other = collect(other.tokens, attention_mask=other.mask.long())
    with pytest.raises(ValueError, match="the forward pass the collector's hooks saw does not "
                                         "hold this model's forward pass of tokens"):
        of_other.result(batch.tokens, attention_mask=batch.mask)
    assert_no_hooks(model)
