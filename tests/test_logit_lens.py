"""The logit lens against independent references, on tiny random models, both backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_no_hooks, assert_weights_unchanged, weights_snapshot

import tl_lenses as tll
from tl_lenses.hooks import resid_names
from tl_lenses.readout.unembed import Unembed
from tl_lenses.tiny import tiny_default, tiny_hf_model

PROMPTS = ["hello world", "the cat sat"]


def tokens_of(model):
    return model.to_tokens(PROMPTS, padding_side="right")


def full_logits(model, input, **kwargs):
    return tll.logit_lens(model, input, keep_logits=True, **kwargs)


def test_final_layer_equals_model_logits(tiny_model):
    tokens = tokens_of(tiny_model)
    result = full_logits(tiny_model, tokens, k=4)
    with torch.no_grad():
        logits = tiny_model(tokens)
    torch.testing.assert_close(result.logits[-1], logits, atol=1e-5, rtol=1e-5)
    top = logits.topk(4, dim=-1)
    torch.testing.assert_close(result.top_logits[-1], top.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(result.top_ids[-1], top.indices)
    assert torch.all(result.kl_to_final[-1] < 1e-5)
    assert torch.all(result.target_rank[-1] == 1)


def test_each_layer_is_normalised_with_its_own_statistics(tiny_model):
    """Reference: the model's own ln_final module applied to each cached residual."""
    tokens = tokens_of(tiny_model)
    result = full_logits(tiny_model, tokens)
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(tokens)
        for row, name in enumerate(result.hook_names):
            expected = tiny_model.ln_final(cache[name]) @ tiny_model.W_U + tiny_model.b_U
            torch.testing.assert_close(result.logits[row], expected, atol=1e-5, rtol=1e-5)


def test_matches_tl_accumulated_resid_not_the_cached_final_scale():
    """TL 3.x's accumulated_resid(apply_ln=True) recomputes each layer's norm (a second
    reference); apply_ln_to_stack's default divides every layer by the final cached scale,
    which is right for attribution and wrong for a lens."""
    model = tiny_default("gpt2")
    tokens = tokens_of(model)
    result = full_logits(model, tokens)
    _, cache = model.run_with_cache(tokens)
    stack = cache.accumulated_resid(apply_ln=True) @ model.W_U + model.b_U
    torch.testing.assert_close(result.logits, stack, atol=1e-5, rtol=1e-5)
    frozen = cache.apply_ln_to_stack(cache.accumulated_resid()) @ model.W_U + model.b_U
    torch.testing.assert_close(result.logits[-1], frozen[-1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(result.logits[0], frozen[0], atol=1e-3)


def test_statistics_match_full_softmax_reference(tiny_model):
    tokens = tokens_of(tiny_model)
    result = full_logits(tiny_model, tokens, k=3, target="next")
    logits = result.logits
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    kl = F.kl_div(logp, logp[-1:].expand_as(logp), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(result.entropy, entropy, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.kl_to_final, kl.clamp_min(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.top_probs, logp.exp().topk(3, -1).values, atol=1e-6,
                               rtol=1e-5)
    # Ranks by a full descending sort: 1 + number of strictly larger logits.
    targets = result.target_ids
    valid = targets >= 0
    order = logits.argsort(dim=-1, descending=True, stable=True)
    idx = targets.clamp_min(0)[None, ..., None].expand(logits.shape[0], -1, -1, 1)
    sort_rank = (order == idx).float().argmax(-1) + 1
    chosen = logits.gather(-1, idx)
    ties = (logits == chosen).sum(-1) - 1
    assert torch.all((result.target_rank - (sort_rank - ties))[:, valid] == 0)
    assert torch.all(result.target_rank[:, ~valid] == -1)
    assert torch.isnan(result.target_prob[:, ~valid]).all()
    torch.testing.assert_close(result.target_prob[:, valid],
                               logp.exp().gather(-1, idx)[..., 0][:, valid])


@pytest.mark.parametrize("chunk_size", [1, 5, 10_000])
def test_chunked_equals_unchunked(chunk_size):
    model = tiny_default("llama-gqa")
    tokens = tokens_of(model)
    reference = tll.logit_lens(model, tokens, target="final", chunk_size=10_000)
    result = tll.logit_lens(model, tokens, target="final", chunk_size=chunk_size)
    for name in ("top_ids", "target_rank"):
        assert torch.equal(getattr(result, name), getattr(reference, name))
    for name in ("top_logits", "top_probs", "entropy", "kl_to_final", "target_prob"):
        torch.testing.assert_close(getattr(result, name), getattr(reference, name))


def test_backends_agree(tiny_models):
    hooked, bridge = tiny_models
    a = tll.logit_lens(hooked, PROMPTS, incl_mid=True, target="next")
    b = tll.logit_lens(bridge, PROMPTS, incl_mid=True, target="next")
    assert a.hook_names == b.hook_names and len(a.hook_names) == 2 * hooked.cfg.n_layers + 1
    assert torch.equal(a.top_ids, b.top_ids)
    torch.testing.assert_close(a.entropy, b.entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.kl_to_final, b.kl_to_final, atol=1e-5, rtol=1e-5)


def test_hook_collector_equals_cache_readout(tiny_model):
    tokens = tokens_of(tiny_model)
    names = ["blocks.0.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_mid"]
    collector = tll.LensCollector(tiny_model, hook_names=names, positions=[0, -1])
    with torch.no_grad():
        hooked_logits = tiny_model.run_with_hooks(tokens, fwd_hooks=collector.fwd_hooks())
        plain_logits, cache = tiny_model.run_with_cache(tokens)
    assert torch.equal(hooked_logits, plain_logits)  # the hooks only observe
    from_hooks = collector.result(tokens, target="final")
    from_cache = tll.apply_lens_to_cache(tiny_model, cache, tokens, hook_names=names,
                                         positions=[0, -1], target="final")
    assert from_hooks.positions == [0, tokens.shape[1] - 1]
    assert torch.equal(from_hooks.top_ids, from_cache.top_ids)
    torch.testing.assert_close(from_hooks.kl_to_final, from_cache.kl_to_final)
    assert_no_hooks(tiny_model)


def test_component_outputs_are_decoded_with_their_own_norm(tiny_model):
    tokens = tokens_of(tiny_model)
    name = "blocks.1.hook_attn_out"
    result = tll.logit_lens(tiny_model, tokens, hook_names=[name], keep_logits=True)
    _, cache = tiny_model.run_with_cache(tokens)
    expected = Unembed.from_model(tiny_model)(cache[name])
    torch.testing.assert_close(result.logits[0], expected)
    x = cache[name] - (cache[name].mean(-1, keepdim=True)
                       if tiny_model.cfg.normalization_type in ("LN", "LNPre") else 0)
    scale = (x.pow(2).mean(-1, keepdim=True) + tiny_model.cfg.eps).sqrt()
    torch.testing.assert_close(result.logits[0], (x / scale) @ tiny_model.W_U + tiny_model.b_U,
                               atol=1e-5, rtol=1e-5)


def test_weights_unchanged_and_no_hooks_left_even_after_errors(tiny_model):
    snapshot = weights_snapshot(tiny_model)
    tll.logit_lens(tiny_model, "abc", incl_mid=True)
    collector = tll.LensCollector(tiny_model)

    def boom(resid, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tiny_model.run_with_hooks(tiny_model.to_tokens("abc"),
                                  fwd_hooks=[*collector.fwd_hooks(),
                                             ("blocks.1.hook_resid_pre", boom)])
    with pytest.raises(ValueError):
        tll.logit_lens(tiny_model, "abc", target="two tokens")
    assert_no_hooks(tiny_model)
    assert_weights_unchanged(tiny_model, snapshot)


def test_layers_and_positions_select_rows_and_columns(tiny_model):
    full = tll.logit_lens(tiny_model, "hello")
    part = tll.logit_lens(tiny_model, "hello", layers=[0, -1], positions=[-1, 1])
    names = resid_names(tiny_model)
    assert part.hook_names == [names[0], names[-1]]
    assert part.positions == [4, 1]
    assert torch.equal(part.top_ids, full.top_ids[[0, -1]][:, :, [4, 1]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layers=[99]), "layers"),
        (dict(positions=[7]), "positions"),
        (dict(hook_names=["blocks.0.hook_nope"]), "hook_names"),
        (dict(hook_names=["blocks.0.attn.hook_pattern"]), "hook_names"),
        (dict(target="two tokens"), "target"),
        (dict(target=10**6), "target"),
        (dict(k=0), "k"),
    ],
)
def test_bad_arguments_name_themselves(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tll.logit_lens(tiny_model, "hello", **kwargs)


def test_bad_inputs_name_themselves(tiny_model):
    with pytest.raises(ValueError, match="input"):
        tll.logit_lens(tiny_model, "")
    with pytest.raises(ValueError, match="n_ctx"):
        tll.logit_lens(tiny_model, "x" * (tiny_model.cfg.n_ctx + 1))
    with pytest.raises(TypeError, match="input"):
        tll.logit_lens(tiny_model, 3.5)
    result = tll.logit_lens(tiny_model, "hello")
    with pytest.raises(ValueError, match="statistic"):
        result.to_html(statistic="loss")
    with pytest.raises(ValueError, match="cache"):
        _, cache = tiny_model.run_with_cache(tiny_model.to_tokens("hi"),
                                             names_filter=lambda n: "resid_pre" in n)
        tll.apply_lens_to_cache(tiny_model, cache, tiny_model.to_tokens("hi"))


def test_model_without_tokenizer_needs_token_ids():
    model = tiny_default("gpt2")
    model.tokenizer = None
    with pytest.raises(ValueError, match="model has no tokenizer"):
        tll.logit_lens(model, "hello")
    result = tll.logit_lens(model, torch.tensor([[1, 2, 3]]))
    assert result.str_tokens == [["1", "2", "3"]]


def test_bridge_without_compatibility_mode_is_refused():
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    hf_model = tiny_hf_model("llama")
    bridge = build_bridge_from_module(hf_model, "LlamaForCausalLM", hf_config=hf_model.config)
    with pytest.raises(ValueError, match="enable_compatibility_mode"):
        tll.logit_lens(bridge, torch.tensor([[1, 2, 3]]))


def test_shapes_are_checked_at_runtime():
    """jaxtyping + beartype check the package's annotations during the test run."""
    from jaxtyping import TypeCheckError

    from tl_lenses.readout.engine import read_lens

    model = tiny_default("gpt2")
    resid = torch.zeros(1, 4, model.cfg.d_model)
    wrong = torch.zeros(2, 4, model.cfg.d_model)  # batch disagrees with the tokens
    with pytest.raises(TypeCheckError):
        read_lens(model, tll.LogitLens(), [wrong], resid, ["x"], torch.zeros(1, 4).long())


def test_bfloat16_model_is_read_in_float32():
    model = tiny_default("llama-gqa")
    tokens = tokens_of(model)
    reference = tll.logit_lens(model, tokens, keep_logits=True)
    half = tiny_default("llama-gqa").to(torch.bfloat16)
    result = tll.logit_lens(half, tokens, keep_logits=True)
    assert result.logits.dtype == torch.float32
    with torch.no_grad():
        logits = half(tokens).float()
    torch.testing.assert_close(result.logits[-1], logits, atol=0.05, rtol=0.02)
    torch.testing.assert_close(result.logits, reference.logits, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa"])
def test_float64_model_reads_as_its_float32_twin(arch):
    """A float64 model: the readout's buffers take the decoder's dtype (they were float32,
    and the unembedding's out= refused float64 rows); results as the float32 twin's."""
    model = tiny_default(arch)
    tokens = tokens_of(model)
    reference = tll.logit_lens(model, tokens, keep_logits=True)
    double = tiny_default(arch).to(torch.float64)
    result = tll.logit_lens(double, tokens, keep_logits=True)
    assert torch.equal(result.top_ids, reference.top_ids)
    torch.testing.assert_close(result.top_probs, reference.top_probs, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        logits, cache = double.run_with_cache(tokens)
    torch.testing.assert_close(result.logits[-1].double(), logits, atol=1e-4, rtol=1e-5)
    from_cache = tll.apply_lens_to_cache(double, cache, tokens)
    assert torch.equal(from_cache.top_ids, result.top_ids)


@pytest.mark.parametrize("vocab, k", [(49152, 5), (49152, 1), (1024, 7), (257, 3),
                                     (50257, 10), (1000, 2)])
@pytest.mark.parametrize("given_block_max", [False, True])
def test_blocked_topk_equals_torch_topk(vocab, k, given_block_max):
    """Blocked top-k == torch.topk, with and without a tail block, from its own block maxima
    or from those the fused kernel returns."""
    from tl_lenses.readout._row_stats import BLOCK, topk

    logits = torch.randn(33, vocab, generator=torch.Generator().manual_seed(vocab))
    split = vocab - vocab % BLOCK
    block_max = logits[:, :split].view(33, -1, BLOCK).amax(-1) if given_block_max else None
    values, ids = topk(logits, k, block_max)
    expected = torch.topk(logits, k, dim=-1)
    assert torch.equal(values, expected.values) and torch.equal(ids, expected.indices)


@pytest.mark.parametrize("vocab", [49152, 1000, 257, 100])
def test_kernel_and_eager_sums_equal_a_float64_softmax(vocab):
    """The C kernel's and the eager path's sums against a float64 reference, on logits
    spread like a real model's (one row with a far outlier)."""
    from tl_lenses.readout._row_stats import eager_sums, native_sums

    gen = torch.Generator().manual_seed(vocab)
    logits = 8 * torch.randn(2, 5, vocab, generator=gen)
    logits[0, 0, 3] = 90.0                     # exp of the rest underflows next to it
    chosen = logits[..., 7:8].clone()
    chosen[1, 1] = torch.inf                   # "no target": nothing is above it
    z = logits.double()
    row_max = z.amax(-1)
    e = torch.exp(z - row_max[..., None])
    expected = (row_max, e.sum(-1), (e * z).sum(-1), (z > chosen).sum(-1))
    eager = eager_sums(logits, logits.amax(-1, keepdim=True), chosen, torch.empty_like(logits))
    fused = native_sums(logits.view(-1, vocab), chosen.reshape(-1))
    torch.testing.assert_close(fused[1].view(2, 5), logits.amax(-1), rtol=0, atol=0)
    for got in (eager, fused[2:]):
        for value, want in zip(got, expected[1:]):
            torch.testing.assert_close(value.double().view(want.shape), want.double(),
                                       rtol=2e-6, atol=1e-6)
    if vocab >= 128:                           # block maxima of the full 128-logit blocks
        split = vocab - vocab % 128
        want = logits.view(-1, vocab)[:, :split].unflatten(-1, (-1, 128)).amax(-1)
        assert torch.equal(fused[0], want)


def test_statistics_helpers_reject_bad_arguments():
    from tl_lenses.readout._row_stats import native_sums, topk

    logits = torch.randn(4, 300)
    # ValueError from the check; TypeError from the runtime type checker the tests turn on
    with pytest.raises((ValueError, TypeError), match="chosen"):
        native_sums(logits, torch.zeros(3))        # the kernel would read past the end
    with pytest.raises(ValueError, match="logits"):
        native_sums(logits.double(), torch.zeros(4))
    with pytest.raises(ValueError, match="logits"):
        native_sums(logits.t().contiguous().t(), torch.zeros(4))
    for k in (0, 301):
        with pytest.raises(ValueError, match="k must"):
            topk(logits, k)


def test_kernel_exp_is_accurate_to_float_rounding():
    """exp(x) over [-100, 0] through the kernel's sum of a one-element row: ~1 ulp."""
    from tl_lenses.readout._row_stats import native_sums

    x = torch.linspace(-100.0, 0.0, 20001)
    rows = torch.stack([torch.zeros_like(x), x], dim=-1)     # max 0, so sum = 1 + exp(x)
    _, _, sum_exp, e_z, _ = native_sums(rows.contiguous(), torch.zeros(len(x)))
    exact = torch.exp(x.double())
    tiny = x < -87.0                                          # clamped: ~1e-38, vs 1
    torch.testing.assert_close((sum_exp.double() - 1)[~tiny], exact[~tiny].float().double(),
                               rtol=0, atol=1.2e-7)
    rel = ((e_z.double() / x.double()) - exact).abs() / exact
    assert rel[(x < -1e-3) & ~tiny].max() < 4e-7


def test_fused_statistics_equal_the_eager_ones(tiny_model):
    """The torch.compile'd pass gives the eager path's top-k and ranks, and its sums."""
    tokens = tokens_of(tiny_model)
    eager = tll.logit_lens(tiny_model, tokens, target="next", incl_mid=True, fused=False)
    fused = tll.logit_lens(tiny_model, tokens, target="next", incl_mid=True, fused=True)
    assert torch.equal(eager.top_ids, fused.top_ids)
    assert torch.equal(eager.target_rank, fused.target_rank)
    for name in ("entropy", "kl_to_final", "top_probs"):
        torch.testing.assert_close(getattr(fused, name), getattr(eager, name),
                                   atol=1e-5, rtol=1e-5)


def test_fused_auto_takes_the_kernel_where_it_applies(monkeypatch):
    from tl_lenses.readout import _native as native
    from tl_lenses.readout import _row_stats as row_stats

    cpu = torch.device("cpu")
    assert native.row_stats_kernel() is not None, native.build_error()  # gcc is a test need
    assert row_stats.use_fused(None, cpu, torch.float32)
    assert not row_stats.use_fused(None, cpu, torch.float64)
    assert not row_stats.use_fused(None, torch.device("meta"), torch.float32)
    assert not row_stats.use_fused(False, cpu, torch.float32)
    with pytest.raises(ValueError, match="fused=True needs float32"):
        row_stats.use_fused(True, cpu, torch.float64)
    # ValueError from the check; TypeError from the runtime type checker the tests turn on
    with pytest.raises((ValueError, TypeError), match="fused"):
        row_stats.use_fused("yes", cpu, torch.float32)


def test_without_the_kernel_auto_is_eager_and_fused_true_raises(monkeypatch):
    from tl_lenses.readout import _native as native

    model = tiny_default("llama-gqa")
    tokens = tokens_of(model)
    reference = tll.logit_lens(model, tokens, fused=False)
    monkeypatch.setattr(native, "row_stats_kernel", lambda: None)
    monkeypatch.setattr(native, "_errors", ["no C compiler found"])
    with pytest.raises(RuntimeError, match="fused=True.*no C compiler"):
        tll.logit_lens(model, tokens, fused=True)
    assert_no_hooks(model)
    result = tll.logit_lens(model, tokens)
    assert torch.equal(result.top_ids, reference.top_ids)
    torch.testing.assert_close(result.kl_to_final, reference.kl_to_final, rtol=0, atol=0)


@pytest.mark.parametrize("cause", ["no compiler", "unwritable cache"])
def test_a_failed_build_warns_and_names_the_reason(monkeypatch, tmp_path, cause):
    from tl_lenses.readout import _native as native

    if cause == "no compiler":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        monkeypatch.setenv("TL_LENSES_CACHE", str(tmp_path))
        reason = "no-such-compiler"
    else:
        (tmp_path / "a-file").write_text("")
        monkeypatch.setenv("TL_LENSES_CACHE", str(tmp_path / "a-file"))
        reason = "a-file"
    monkeypatch.setattr(native, "_errors", [])
    native._load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=reason):
            assert native.row_stats_kernel() is None
        assert reason in native.build_error()
    finally:
        native._load.cache_clear()
