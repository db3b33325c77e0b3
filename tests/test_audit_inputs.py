"""Inputs an independent audit found handled badly: each now works, or is refused clearly.

- ``incl_mid=True`` on a model without ``resid_mid`` (parallel attention+MLP, attention-only
  blocks) said the *cache* lacked hook points and to drop a ``names_filter`` the user never
  passed; ``gradient_alignment`` on attention-only blocks raised a bare KeyError.
- Generation (patchscopes, sweeps) on a model that predicts more ids than it embeds
  (``d_vocab_out > d_vocab``) raised a bare IndexError from TL's embedding.
- Token ids as a numpy array or as lists of ints were refused (TypeError); an attention mask
  of the right shape but a float dtype was reported as having the wrong shape.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from conftest import assert_no_hooks, assert_weights_unchanged, weights_snapshot

import tl_lenses as tll
from tl_lenses.data import generated_tokens
from tl_lenses.hooks import resid_names
from tl_lenses.inputs import _check_mask
from tl_lenses.lenses.attribute.relations import Relation, Sample
from tl_lenses.tiny_families import tiny_family

# (family, backend) members without resid_mid hook points, and why
NO_MID = [
    pytest.param("pythia", "hooked", "parallel", marks=pytest.mark.hooked, id="pythia-hooked"),
    pytest.param("attn-only", "hooked", "attention-only", marks=pytest.mark.hooked,
                 id="attn-only-hooked"),
    pytest.param("pythia", "bridge", "parallel", id="pythia-bridge"),
    pytest.param("phi", "bridge", "parallel", id="phi-bridge"),
]


@functools.lru_cache(maxsize=None)
def _member(family: str, backend: str):
    return tiny_family(family, backend)


@pytest.mark.parametrize("family, backend, why", NO_MID)
def test_incl_mid_on_a_model_without_resid_mid_says_so(family, backend, why):
    model = _member(family, backend)
    tokens = model.to_tokens("ab cd", prepend_bos=False)
    snapshot = weights_snapshot(model)
    calls = [lambda: tll.logit_lens(model, tokens, incl_mid=True),
             lambda: tll.apply_lens_to_cache(model, model.run_with_cache(tokens)[1], tokens,
                                             incl_mid=True),
             lambda: tll.LensCollector(model, incl_mid=True),
             lambda: resid_names(model, incl_mid=True)]
    for call in calls:
        with pytest.raises(ValueError, match=f"incl_mid.*resid_mid.*has none.*{why}") as error:
            call()
        assert "names_filter" not in str(error.value)
    assert_weights_unchanged(model, snapshot)
    assert_no_hooks(model)
    # without incl_mid the residual stream reads as before: n_layers + 1 rows
    rows = tll.logit_lens(model, tokens).hook_names
    assert rows == resid_names(model) and len(rows) == model.cfg.n_layers + 1


@pytest.mark.hooked
def test_gradient_alignment_refuses_attention_only_blocks_clearly():
    model = _member("attn-only", "hooked")
    rows = torch.randint(0, 256, (2, 6), generator=torch.manual_seed(0))
    with pytest.raises(NotImplementedError, match="resid_mid.*attention-only"):
        tll.analysis.gradient_alignment(model, rows, progress=False)


@pytest.mark.hooked
def test_generation_on_a_wider_output_vocabulary_is_refused_before_running():
    model = _member("untied-vocab-out", "hooked")
    assert model.cfg.d_vocab_out > model.cfg.d_vocab
    # The next-token logits need no generation and span the whole output vocabulary.
    r = tll.patchscope(model, "hello there", "ab cd x", source_layer=1)
    assert r.logits.shape == (model.cfg.d_vocab_out,)
    tokens = model.to_tokens("ab cd x", prepend_bos=False)
    with torch.no_grad():
        assert torch.allclose(
            tll.patchscope(model, "ab cd x", "ab cd x", source_layer=1).logits,
            model(tokens)[0, -1], atol=1e-5)   # identity patch: the model's own logits
    calls = [lambda: tll.patchscope(model, "hello there", "ab cd x", source_layer=1,
                                    target_layer=0, source_position=-2, target_position=0,
                                    max_new_tokens=3),
             lambda: tll.patchscope_sweep(model, "hello there", "ab cd x", max_new_tokens=2)]
    for call in calls:
        with pytest.raises(ValueError, match="max_new_tokens.*d_vocab_out=300.*d_vocab=257"):
            call()
    assert_no_hooks(model)


def _ids(model):
    return model.to_tokens(["ab cd", "xy zw"], prepend_bos=False)


@pytest.mark.parametrize("as_given", [
    lambda t: t.numpy(), lambda t: t.tolist(), lambda t: tuple(map(tuple, t.tolist())),
    lambda t: [np.asarray(row) for row in t.numpy()], lambda t: t.int().numpy(),
], ids=["numpy", "lists", "tuples", "numpy rows", "numpy int32"])
def test_token_ids_as_numpy_or_lists_equal_the_tensor(tiny_model, as_given):
    tokens = _ids(tiny_model)
    reference = tll.logit_lens(tiny_model, tokens, k=3)
    given = tll.logit_lens(tiny_model, as_given(tokens), k=3)
    assert torch.equal(given.tokens, reference.tokens)
    assert torch.equal(given.top_ids, reference.top_ids)
    assert torch.equal(given.entropy, reference.entropy)
    one = tll.logit_lens(tiny_model, as_given(tokens)[0], k=3)   # one row: [pos]
    assert torch.equal(one.top_ids[:, 0], reference.top_ids[:, 0])
    dla = tll.dla(tiny_model, as_given(tokens), ("a", "b"))
    assert torch.equal(dla.values, tll.dla(tiny_model, tokens, ("a", "b")).values)
    patch = tll.patchscope(tiny_model, as_given(tokens)[0], as_given(tokens)[1], source_layer=1)
    assert torch.equal(patch.logits, tll.patchscope(tiny_model, tokens[:1], tokens[1:],
                                                    source_layer=1).logits)


def test_ragged_id_lists_need_a_mask(tiny_model):
    tokens = _ids(tiny_model)
    rows = tokens.tolist()
    with pytest.raises(ValueError, match=r"input holds token rows of different lengths \[5, 3\]"
                       r".*attention_mask"):
        tll.logit_lens(tiny_model, [rows[0], rows[1][:3]])
    mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
    by_lists = tll.logit_lens(tiny_model, rows, attention_mask=mask)
    alone = tll.logit_lens(tiny_model, rows[1][:3])
    assert by_lists.mask.tolist() == mask.bool().tolist()
    assert torch.equal(by_lists.top_ids[:, 1, :3], alone.top_ids[:, 0])


@pytest.mark.parametrize("bad, match", [
    (np.array([[1.0, 2.0]]), "input as a tensor must hold int token ids.*float"),
    (np.array([["a", "b"]]), "input must be a string, a list of strings, token ids"),
    ([[1, 2], "ab"], "input must be a string"),
    ([[1, True]], "input must be a string"),
    ([[1, 2.5]], "input must be a string"),
    ([[]], "input must be a string"),
], ids=["float array", "str array", "mixed", "bool id", "float id", "empty row"])
def test_other_id_like_inputs_are_refused_naming_input(tiny_model, bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        tll.logit_lens(tiny_model, bad)


def test_a_float_mask_of_the_right_shape_names_its_dtype(tiny_model):
    # Called below the public signatures, whose jaxtyping annotations the test run checks
    # first; a user's run has no such check and reached this message.
    tokens = _ids(tiny_model)
    with pytest.raises(ValueError, match=r"attention_mask must be an int or bool tensor .*"
                       r"got torch.float32 \(2, 5\)"):
        _check_mask(tokens, torch.ones(2, 5), None)



def test_sweep_refuses_a_bool_k(tiny_model):
    with pytest.raises(ValueError, match="k must be an int"):
        tll.patchscope_sweep(tiny_model, "abc", "de", k=True)   # was taken as k=1


TOY = Relation("toy", ("{} =", "{} is"), tuple(Sample(s, o) for s, o in zip("abcdef", "uvwxyz")))


@pytest.mark.parametrize("call, argument", [
    (lambda m: tll.train_tuned_lens(m, torch.zeros(4, 6, dtype=torch.long), steps=1,
                                    batch_size=True, progress=False), "batch_size"),
    (lambda m: tll.train_tuned_lens(m, torch.zeros(4, 6, dtype=torch.long), steps=1,
                                    micro_batch_size=True, progress=False), "micro_batch_size"),
    (lambda m: tll.logit_lens(m, ["ab", "cd"]).to_html(batch=True), "batch"),
    (lambda m: tll.estimate_lre(m, TOY, layer=1, n=2, template=True), "template"),
    (lambda m: TOY.split(True), "n_train"),
    (lambda m: generated_tokens(m, True, 4), "n_rows"),
    (lambda m: generated_tokens(m, 2, 4, batch_size=True), "batch_size"),
    (lambda m: tll.tuned.TokenStream(m, texts=["ab cd"], seq_len=4, chunk_bytes=True),
     "chunk_bytes"),
], ids=["train batch_size", "train micro_batch_size", "view batch", "lre template",
        "relation split", "samples n_rows", "samples batch_size", "stream chunk_bytes"])
def test_a_bool_is_never_a_count_or_an_index(tiny_model, call, argument):
    """True was taken as 1 (a one-row batch, the second prompt, the second template)."""
    snapshot = weights_snapshot(tiny_model)
    with pytest.raises(ValueError, match=f"{argument} must .*True"):
        call(tiny_model)
    assert_weights_unchanged(tiny_model, snapshot)
    assert_no_hooks(tiny_model)


@pytest.fixture
def narrow_out(monkeypatch):
    """A model predicting fewer ids than it embeds (TL's algorithmic models: d_vocab_out=200)."""
    from tl_lenses import tiny_families

    monkeypatch.setitem(tiny_families.HOOKED_FAMILIES, "narrow-out",
                        dict(normalization_type="LN", positional_embedding_type="standard",
                             d_vocab_out=200))
    return tiny_families.tiny_family_hooked("narrow-out")


def _own_ranks(model, tokens, targets):
    """Each cell's rank of ``targets`` in the final logits (-1 where the target is -1)."""
    with torch.no_grad():
        logits = model(tokens)[0].float()
    picked = logits.gather(-1, targets.clamp(min=0)[:, None])
    ranks = (logits > picked).sum(-1) + 1
    return torch.where(targets >= 0, ranks, -1)


@pytest.mark.hooked
def test_targets_are_ids_of_the_output_vocabulary(narrow_out, caplog):
    model = narrow_out
    assert (model.cfg.d_vocab, model.W_U.shape[-1]) == (257, 200)
    tokens = torch.tensor([[3, 230, 5, 210, 7, 8]])   # 230, 210: embedded, never predicted
    for target in (230, torch.full_like(tokens, 230)):
        with pytest.raises(ValueError, match=r"target.* outside \[0, 200\)"):
            tll.logit_lens(model, tokens, target=target)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, d_vocab=200\]"):
        tll.patchscope_sweep(model, tokens[:, :3], tokens[:, 3:], k=201)
    with caplog.at_level("WARNING", logger="tl_lenses"):
        result = tll.logit_lens(model, tokens, target="next")
    assert "2 next tokens are outside the model's output vocabulary" in caplog.text
    expected = torch.tensor([-1, 5, -1, 7, 8, -1])
    assert result.target_ids[0].tolist() == expected.tolist()
    assert torch.equal(result.target_rank[-1, 0], _own_ranks(model, tokens, expected))
    with pytest.raises(ValueError, match="tokens has next tokens outside the model's output "
                       r"vocabulary \[0, d_vocab_out=200\)"):
        tll.analysis.current_vs_next(model, tokens, progress=False)
    # Held-out metrics count the cells whose next token the model can predict.
    evaluation = tll.evaluate_lenses(model, tokens).metrics["logit"]
    assert evaluation.n_tokens == 3
    with torch.no_grad():
        logp = model(tokens)[0].float().log_softmax(-1)
    own_ce = -logp[[1, 3, 4], [5, 7, 8]].mean()
    assert torch.allclose(evaluation.cross_entropy[-1], own_ce, atol=1e-5)


@pytest.mark.hooked
def test_output_ids_past_the_input_vocabulary_are_targets_too():
    model = _member("untied-vocab-out", "hooked")   # d_vocab_out=300 > d_vocab=257
    tokens = model.to_tokens("ab cd", prepend_bos=False)
    targets = torch.full_like(tokens, 280)
    for target in (280, targets):
        result = tll.logit_lens(model, tokens, target=target)
        assert torch.equal(result.target_rank[-1, 0], _own_ranks(model, tokens, targets[0]))
    assert tll.logit_lens(model, tokens, k=300).top_ids.shape[-1] == 300


@pytest.mark.hooked
def test_latent_lens_refuses_a_bool_k():
    pytest.importorskip("sae_lens")
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from tl_lenses.sae import latent_lens
    from tl_lenses.tiny import tiny_hooked

    model = tiny_hooked("gpt2", n_layers=2)
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=8, metadata=SAEMetadata(
        hook_name="blocks.1.hook_resid_pre"))).eval()
    assert latent_lens(model, sae, k=2) is not None
    with pytest.raises(ValueError, match="k must be a positive int, got True"):
        latent_lens(model, sae, k=True)   # was taken as k=1
