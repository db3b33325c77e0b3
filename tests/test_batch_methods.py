"""Unequal lengths for the methods tests/test_batches.py leaves out, and non-finite DLA parts.

Token identity and patchscope sweeps over sources (and targets) of different lengths, LRE
subjects in a padded batch, the tuned-lens KL evaluator with a mask, and the tuned and
attribute lenses and DLA under TL's own left-padding tokenizer setting: each prompt's numbers
equal that prompt alone, on both backends, for learned (gpt2) and rotary (llama-gqa)
positions. Under the tokenizer's left padding TL masks every token equal to the pad id
unless told otherwise, so prompts here may start with the pad id.
"""

from __future__ import annotations

import logging

import pytest
import torch

import tl_lenses as tll
from tl_lenses.attribution import dla, head_path_dla
from tl_lenses.inputs import to_batch
from tl_lenses.lenses.attribute import LRE, attribute_lens
from tl_lenses.lenses.attribute.lre import estimate_lre, relation_jacobian
from tl_lenses.lenses.attribute.metrics import causality, collect_states
from tl_lenses.lenses.attribute.relations import Relation, Sample
from tl_lenses.lenses.tuned.eval import KLEvaluator
from tl_lenses.patchscopes.presets import IDENTITY_PROMPT, placeholder_position, token_identity
from tl_lenses.tiny import tiny_bridge, tiny_hooked

PROMPTS = ["Hi!", "Hello there, world", "abc de"]
SIDES = ["right", "left", "tokenizer-left"]
# Subjects of 1-3 bytes: their prompts differ in length (byte tokenizer).
TOY = Relation("toy", ("{} =",), tuple(Sample(s, o) for s, o in zip(
    ["a", "bc", "def", "g", "hi", "jkl"], "mnopqr")))


@pytest.fixture(params=[(a, b) for a in ("gpt2", "llama-gqa") for b in ("hooked", "bridge")],
                ids=lambda p: f"{p[0]}-{p[1]}", scope="module")
def model(request):
    arch, backend = request.param
    return (tiny_hooked if backend == "hooked" else tiny_bridge)(arch)


@pytest.fixture(autouse=True)
def _restore_padding_side(model):
    yield
    model.tokenizer.padding_side = "right"


def _side(model, side):
    """The padding_side argument for a case; 'tokenizer-left' sets TL's tokenizer instead."""
    model.tokenizer.padding_side = "left" if side == "tokenizer-left" else "right"
    return None if side == "tokenizer-left" else side


def _starting_with_pad(model, text):
    """``text``'s tokens after a leading pad-id token: a token TL's left padding would mask."""
    pad = torch.tensor([[model.tokenizer.pad_token_id]])
    return torch.cat([pad, model.to_tokens(text)], dim=1)


# --- token identity and sweeps ---------------------------------------------------------------

@pytest.mark.parametrize("tokenizer_side", ["right", "left"])
def test_token_identity_equals_each_patchscope_alone(model, tokenizer_side):
    """Source prompts of other lengths than the identity prompt; l* = l, i* = the '?'."""
    i_star = placeholder_position(model, IDENTITY_PROMPT, "?")
    for prompt in ["Hi", _starting_with_pad(model, "Hello there")]:
        model.tokenizer.padding_side = tokenizer_side
        result = token_identity(model, prompt)
        model.tokenizer.padding_side = "right"
        n = result.patched_top1.shape[1]
        alone = tll.logit_lens(model, prompt, target=None)
        for i, layer in enumerate(result.layers):
            for j in range(n):
                single = tll.patchscope(model, prompt, IDENTITY_PROMPT, source_layer=layer,
                                        source_position=j, target_position=i_star)
                assert int(result.patched_top1[i, j]) == int(single.logits.argmax())
        # the logit-lens column reads the same cells as the logit lens of the prompt alone
        assert torch.equal(result.lens_top1["logit lens"].cpu(),
                           alone.top_ids[:, 0, :, 0].cpu())
        assert torch.equal(result.final_top1.cpu(), alone.top_ids[-1, 0, :, 0].cpu())


def test_token_identity_takes_one_prompt(model):
    with pytest.raises(ValueError, match="prompt"):
        token_identity(model, PROMPTS)
    batch = to_batch(model, PROMPTS)
    with pytest.raises(ValueError, match="prompt"):
        token_identity(model, batch.tokens)


@pytest.mark.parametrize("tokenizer_side", ["right", "left"])
def test_sweep_sources_and_targets_of_different_lengths_equal_each_alone(model,
                                                                       tokenizer_side):
    sources = ["Hi!", _starting_with_pad(model, "Hello there, world")]
    targets = ["x y z", "a much longer target ?"]
    model.tokenizer.padding_side = tokenizer_side
    sweep = tll.patchscope_sweep(model, sources, targets, source_layers=[0, 2],
                                 source_positions=[-1, 0], target_layers=[1, 2], k=3)
    model.tokenizer.padding_side = "right"
    assert len(sweep) == 2 * 2 * 2 * 2
    for case in range(len(sweep)):
        index = int(sweep.source_index[case])
        alone = tll.patchscope(model, sources[index], targets[index],
                               source_layer=int(sweep.source_layer[case]),
                               source_position=int(sweep.source_position[case]),
                               target_layer=int(sweep.target_layer[case]))
        probs, ids = alone.logits.float().softmax(-1).topk(3)
        assert torch.equal(sweep.top_ids[case], ids.cpu())
        torch.testing.assert_close(sweep.top_probs[case], probs.cpu(), atol=1e-5, rtol=1e-4)


# --- LRE subjects ----------------------------------------------------------------------------

def test_lre_subjects_of_different_lengths_equal_each_alone(model):
    template = LRE.identity(model.cfg.d_model, template="{} =", train=TOY.samples[:2])
    samples = list(TOY.samples[2:])
    together = collect_states(model, template, samples, [1, 2])
    assert len(set(together.last_positions)) > 1          # the prompts really differ
    for i, sample in enumerate(samples):
        alone = collect_states(model, template, [sample], [1, 2])
        torch.testing.assert_close(together.s[:, i], alone.s[:, 0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(together.z[i], alone.z[0], atol=1e-5, rtol=1e-4)
        assert int(together.predicted_ids[i]) == int(alone.predicted_ids[0])
    # each causal edit in the padded batch lands as it does alone
    d = model.cfg.d_model
    generator = torch.Generator().manual_seed(0)
    lre = LRE(torch.eye(d) + 0.3 * torch.randn(d, d, generator=generator),
              torch.randn(d, generator=generator), layer=1)
    pairs = [(0, 1), (1, 2), (3, 0)]
    batched = causality(model, lre, together, pairs)
    singles = [causality(model, lre, collect_states(model, template, [samples[a], samples[b]],
                                                    [1, 2]), [(0, 1)]) for a, b in pairs]
    assert batched == pytest.approx(sum(singles) / len(pairs))


@pytest.mark.parametrize("tokenizer_side", ["right", "left"])
def test_lre_is_the_mean_of_each_subjects_jacobian_alone(model, tokenizer_side):
    model.tokenizer.padding_side = tokenizer_side
    train = list(TOY.samples[:3])
    lre = estimate_lre(model, TOY, 1, train=train)
    model.tokenizer.padding_side = "right"
    jacobians = [relation_jacobian(model, lre.prompt(x.subject), x.subject, 1) for x in train]
    assert [len(x.subject) for x in train] == [1, 2, 3]        # subjects of 1-3 tokens
    expected = torch.stack([j.jacobian for j in jacobians]).mean(0)
    torch.testing.assert_close(lre.weight, expected, atol=1e-5, rtol=1e-4)


# --- the tuned-lens KL evaluator ---------------------------------------------------------------

@pytest.mark.parametrize("side", ["right", "left"])
def test_kl_evaluator_with_a_mask_equals_each_prompt_alone(model, side):
    batch = to_batch(model, PROMPTS, padding_side=side)
    lens = tll.TunedLens.for_model(model)
    with torch.no_grad():
        lens.bias.copy_(0.3 * torch.randn(lens.bias.shape, generator=torch.manual_seed(0)))
    padded = KLEvaluator(model, batch.tokens, attention_mask=batch.mask, batch_size=2)
    per_prompt = padded.kl_per_prompt(lens)
    assert per_prompt.shape == (len(lens.hook_names), len(PROMPTS))
    alone = []
    for i, text in enumerate(PROMPTS):
        single = KLEvaluator(model, model.to_tokens(text))
        alone.append(single.kl(lens))
        torch.testing.assert_close(per_prompt[:, i], alone[-1], atol=1e-5, rtol=1e-4)
    weights = batch.lengths.float() / batch.lengths.sum()
    expected = sum(w * kl for w, kl in zip(weights.tolist(), alone))
    torch.testing.assert_close(padded.kl(lens), expected, atol=1e-5, rtol=1e-4)
    # without the mask the pads would count: the mean differs
    unmasked = KLEvaluator(model, batch.tokens, batch_size=2).kl(lens)
    assert not torch.allclose(unmasked, expected, atol=1e-4)


def test_kl_evaluator_arguments(model):
    tokens = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="attention_mask"):
        KLEvaluator(model, tokens, attention_mask=torch.tensor([[1, 0, 1, 1]]))
    with pytest.raises(ValueError, match="batch_size"):
        KLEvaluator(model, tokens, batch_size=0)
    with pytest.raises(ValueError, match="tokens"):
        KLEvaluator(model, torch.full((1, 4), model.cfg.d_vocab))
    with pytest.raises(ValueError, match="hook_names"):
        KLEvaluator(model, tokens, hook_names=["blocks.0.attn.hook_pattern"])


# --- TL's own left-padding setting, for the methods tests/test_batches.py runs on two sides ----

def test_lenses_dla_and_head_paths_under_the_tokenizers_left_padding(model):
    lens = tll.TunedLens.for_model(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        lens.bias.copy_(0.1 * torch.randn(lens.bias.shape, generator=generator))
    d = model.cfg.d_model
    lre = LRE(torch.eye(d) + 0.1 * torch.randn(d, d, generator=generator),
              0.1 * torch.randn(d, generator=generator), layer=1)
    runs = {
        "tuned": lambda x: tll.apply_lens(model, x, lens).kl_to_final,
        "attribute": lambda x: attribute_lens(model, x, lre).kl_to_final,
        "dla": lambda x: dla(model, x, ("a", "b"), positions=-1).values[:, :, -1],
        "paths": lambda x: head_path_dla(model, x, ("a", "b"), heads=["L1H0"]).logits,
    }
    alone = {name: [run(text) for text in PROMPTS] for name, run in runs.items()}
    _side(model, "tokenizer-left")
    for name, run in runs.items():
        together = run(PROMPTS)
        for i, expected in enumerate(alone[name]):
            if name in ("tuned", "attribute"):   # positions count within each prompt
                got = together[:, i, :expected.shape[2]]
                torch.testing.assert_close(got, expected[:, 0], atol=1e-5, rtol=1e-4)
            elif name == "dla":
                torch.testing.assert_close(together[:, i], expected[:, 0], atol=1e-5,
                                           rtol=1e-4)
            else:
                torch.testing.assert_close(together[i], expected[0], atol=1e-5, rtol=1e-4)


# --- non-finite DLA parts ----------------------------------------------------------------------

def test_non_finite_dla_parts_are_missing_and_named_once(model, caplog):
    tokens = to_batch(model, PROMPTS[1]).tokens
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    cache = {key: value.clone() for key, value in cache.items()}
    cache["blocks.1.hook_mlp_out"][0, 2] = float("inf")
    clean = dla(model, tokens, ("a", "b"), positions=None)
    with caplog.at_level(logging.WARNING, logger="tl_lenses"):
        result = dla(model, tokens, ("a", "b"), positions=None, cache=cache)
    mlp = result.labels.index("L1 MLP")
    assert result.values[mlp, 0, 2].isnan().all()                  # inf: missing, not inf
    assert not result.values.isinf().any()
    others = torch.ones(result.values.shape[:3], dtype=torch.bool)
    others[mlp, 0, 2] = False
    torch.testing.assert_close(result.values[others], clean.values[others])
    warnings = [r.getMessage() for r in caplog.records if "non-finite DLA" in r.getMessage()]
    assert len(warnings) == 1 and result.labels[mlp] in warnings[0]
    # a NaN part sorts last in the rankings, never first
    assert "L1 MLP" not in result.top(3, pos=2).labels
    assert result.top(len(result), pos=2).labels[-1] == "L1 MLP"


def test_non_finite_head_paths_are_missing_and_named_once(model, caplog):
    tokens = to_batch(model, PROMPTS[1]).tokens
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    clean = head_path_dla(model, tokens, ("a", "b"), heads=["L1H0", "L2H1"], cache=cache)
    store = getattr(cache, "cache_dict", cache)
    store["blocks.0.hook_mlp_out"] = store["blocks.0.hook_mlp_out"].clone()
    store["blocks.0.hook_mlp_out"][0, 2] = float("inf")
    with caplog.at_level(logging.WARNING, logger="tl_lenses"):
        result = head_path_dla(model, tokens, ("a", "b"), heads=["L1H0", "L2H1"], cache=cache)
    source = list(result.sources).index("L0 MLP")
    assert result.values[:, source, 0, 2].isnan().all() and not result.values.isinf().any()
    finite = torch.ones(result.values.shape[:4], dtype=torch.bool)
    finite[:, source, 0, 2] = False
    torch.testing.assert_close(result.values[finite], clean.values[finite])
    warnings = [r.getMessage() for r in caplog.records if "non-finite head paths" in
                r.getMessage()]
    assert len(warnings) == 1 and "L0 MLP -> L1H0" in warnings[0]
