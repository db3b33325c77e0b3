"""Linear relational embeddings and the attribute lens, on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_no_hooks, assert_weights_unchanged, weights_snapshot

from tl_lenses.lenses.attribute.lens import AttributeLens, attribute_lens
from tl_lenses.lenses.attribute.lre import (
    LRE,
    _jacobian_kv_cache,
    estimate_lre,
    lre_from_jacobians,
    relation_jacobian,
    subject_position,
)
from tl_lenses.lenses.attribute.metrics import (
    causal_pairs,
    causality,
    collect_states,
    faithfulness,
    least_squares_lre,
)
from tl_lenses.lenses.attribute.relations import (
    Relation,
    Sample,
    check_template,
    few_shot_prompt,
    load_relation,
    relation_from_dict,
    starter_relations,
)
from tl_lenses.lenses.logit import logit_lens
from tl_lenses.models import bridge_from_hf, hooked_from_hf, llama_config
from tl_lenses.tiny import (
    byte_tokenizer,
    gpt2_config,
    tiny_default,
    tiny_hf_model,
    tiny_hooked,
)

PROMPT = "ab cd ef gh"

# A byte-level toy relation: every subject and object is one byte token.
TOY = Relation("toy", ("{} =",), tuple(Sample(s, o) for s, o in
                                         zip("abcdefghijkl", "mnopqrstuvwx")))


def final_residual(model, prompt, subject, layer, s):
    """z = F(s) by a plain forward pass with s written in through a hook (the reference)."""
    tokens, pos = subject_position(model, prompt, subject)
    seen = {}

    def put(resid, hook):
        resid = resid.clone()
        resid[0, pos] = s.to(resid.dtype)
        return resid

    def keep(resid, hook):
        seen["z"] = resid[0, -1].detach().clone()

    names = [f"blocks.{layer}.hook_resid_pre", f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=list(zip(names, [put, keep])), return_type=None)
    return seen["z"]


# --- Jacobians -------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [0, 1, 2])
def test_kv_cache_jacobian_matches_hooks_on_both_backends(tiny_models, layer):
    hooked, bridge = tiny_models
    fast = relation_jacobian(hooked, PROMPT, "cd", layer, method="kv-cache")
    slow = relation_jacobian(hooked, PROMPT, "cd", layer, method="hooks")
    other = relation_jacobian(bridge, PROMPT, "cd", layer)          # auto -> hooks
    assert fast.subject_position == 4 and fast.hook_name == f"blocks.{layer}.hook_resid_pre"
    assert fast.jacobian.abs().max() > 1e-4                          # not trivially zero
    first = relation_jacobian(hooked, PROMPT, "a", layer, method="kv-cache")  # empty prefix
    assert first.subject_position == 0
    torch.testing.assert_close(first.jacobian, relation_jacobian(bridge, PROMPT, "a", layer)
                               .jacobian, atol=1e-6, rtol=1e-5)
    for sample in (slow, other):
        torch.testing.assert_close(fast.jacobian, sample.jacobian, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(fast.s, sample.s, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(fast.z, sample.z, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2"])
def test_kv_cache_jacobian_keeps_no_reverse_mode_graph(arch):
    """Forward mode needs no backward pass: the Jacobian must not hold an autograd graph
    (it did, through the weights, and kept every vmapped activation: 12 GB on SmolLM2)."""
    model = tiny_hooked(arch)
    tokens, pos = subject_position(model, PROMPT, "cd")
    s, z, jac = _jacobian_kv_cache(model, tokens, 1, pos)
    assert not (s.requires_grad or z.requires_grad or jac.requires_grad)
    assert jac.grad_fn is None and jac.abs().max() > 1e-4
    assert all(p.grad is None for p in model.parameters())


def test_z_is_the_final_residual_before_the_norm(tiny_model):
    sample = relation_jacobian(tiny_model, PROMPT, "cd", 1)
    _, cache = tiny_model.run_with_cache(PROMPT)
    name = f"blocks.{tiny_model.cfg.n_layers - 1}.hook_resid_post"
    torch.testing.assert_close(sample.z, cache[name][0, -1])
    torch.testing.assert_close(sample.s, cache["blocks.1.hook_resid_pre"][0, 4])


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2"])
def test_jacobian_matches_finite_differences_in_float64(arch, backend):
    # The Bridge keeps processed copies of the weights: cast the HF model before wrapping.
    model = build(arch, backend, tiny_hf_model(arch).double()).to(torch.float64)
    # HF's LlamaRMSNorm computes in float32 whatever the input dtype, so a float64 Bridge is
    # float32-accurate there: take the differences on the float64 HookedTransformer twin.
    reference = build(arch, "hooked", tiny_hf_model(arch).double()).to(torch.float64)
    exact = not (backend == "bridge" and arch.startswith("llama"))
    sample = relation_jacobian(model, PROMPT, "cd", 1)
    assert sample.jacobian.dtype == torch.float64
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(model.cfg.d_model, generator=generator, dtype=torch.float64)
        eps = 1e-5
        plus = final_residual(reference, PROMPT, "cd", 1, sample.s + eps * v)
        minus = final_residual(reference, PROMPT, "cd", 1, sample.s - eps * v)
        torch.testing.assert_close(sample.jacobian @ v, (plus - minus) / (2 * eps),
                                   atol=1e-7 if exact else 1e-5, rtol=1e-6 if exact else 1e-4)


# --- the LRE ---------------------------------------------------------------------------------

def test_one_sample_lre_reproduces_its_own_z(tiny_model):
    train = [TOY.samples[0]]
    lre = estimate_lre(tiny_model, TOY, 1, train=train)
    sample = relation_jacobian(tiny_model, lre.prompt("a"), "a", 1)
    assert lre.n == 1 and lre.beta == 1.0
    torch.testing.assert_close(lre(sample.s), sample.z, atol=1e-5, rtol=1e-5)


def test_lre_is_the_mean_jacobian_and_offset(tiny_model):
    train = list(TOY.samples[:3])
    lre = estimate_lre(tiny_model, TOY, 2, train=train)
    samples = [relation_jacobian(tiny_model, lre.prompt(x.subject), x.subject, 2) for x in train]
    weight = torch.stack([x.jacobian for x in samples]).mean(0)
    bias = torch.stack([x.z - x.jacobian @ x.s for x in samples]).mean(0)
    torch.testing.assert_close(lre.weight, weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lre.bias, bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lre(torch.zeros(tiny_model.cfg.d_model)), lre.bias)
    s = torch.randn(5, tiny_model.cfg.d_model)
    torch.testing.assert_close(lre.with_beta(2.5)(s), 2.5 * s @ weight.T + bias,
                               atol=1e-5, rtol=1e-5)


def test_lre_save_load_round_trip_is_exact(tiny_models, tmp_path):
    """Saved on one backend, loaded on the other (same weights): every field, and the map."""
    from tl_lenses.lenses.attribute.io import load_lre, save_lre

    hooked, bridge = tiny_models
    lre = estimate_lre(hooked, TOY, 2, train=list(TOY.samples[:3]), beta=1.5)
    save_lre(lre, tmp_path / "lre", hooked)
    back = load_lre(tmp_path / "lre", bridge)
    assert torch.equal(back.weight, lre.weight) and torch.equal(back.bias, lre.bias)
    assert (back.beta, back.layer, back.relation, back.template, back.train, back.method) == \
        (lre.beta, lre.layer, lre.relation, lre.template, lre.train, lre.method)
    s = torch.randn(3, hooked.cfg.d_model)
    assert torch.equal(back(s), lre(s)) and back.prompt("a") == lre.prompt("a")


def test_lre_files_are_checked(tiny_model, tmp_path):
    from tl_lenses.lenses.attribute.io import CONFIG, WEIGHTS, load_lre, save_lre

    lre = estimate_lre(tiny_model, TOY, 1, train=list(TOY.samples[:2]))
    folder = save_lre(lre, tmp_path / "lre", tiny_model)
    other = tiny_default("llama-gqa", seed=7)          # same shapes, other weights
    with pytest.raises(ValueError, match="different model"):
        load_lre(folder, other)
    with pytest.raises(ValueError, match="layer"):
        save_lre(LRE.identity(tiny_model.cfg.d_model, layer=99), tmp_path / "x", tiny_model)
    with pytest.raises(TypeError, match="lre"):      # ours, or the runtime type checker's
        save_lre("not an lre", tmp_path / "x", tiny_model)
    weights = folder / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_lre(folder, tiny_model)
    (folder / CONFIG).write_text((folder / CONFIG).read_text()[:50])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_lre(folder, tiny_model)
    with pytest.raises(FileNotFoundError):
        load_lre(tmp_path / "nothing here", tiny_model)


def test_demonstrations_exclude_the_subject_itself():
    lre = LRE.identity(4, template="{} =", train=TOY.samples[:3])
    assert lre.prompt("a") == "b = n\nc = o\na ="
    assert lre.prompt("z") == "a = m\nb = n\nc = o\nz ="


def test_pinv_and_low_rank():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 16, generator=generator, dtype=torch.float64)
    lre = LRE(weight, torch.zeros(16, dtype=torch.float64))
    torch.testing.assert_close(lre.pinv(), torch.linalg.pinv(weight))
    low = lre.low_rank(5)
    assert torch.linalg.matrix_rank(low.weight) == 5
    torch.testing.assert_close(lre.pinv(5), torch.linalg.pinv(low.weight), atol=1e-8, rtol=1e-6)
    # Eckart-Young: the truncation error is the tail of the spectrum
    sigma = torch.linalg.svdvals(weight)
    torch.testing.assert_close(torch.linalg.matrix_norm(weight - low.weight), sigma[5:].norm())


def test_least_squares_baseline_fits_the_training_pairs():
    generator = torch.Generator().manual_seed(1)
    s, z = torch.randn(4, 8, generator=generator), torch.randn(4, 8, generator=generator)
    fit = least_squares_lre(LRE.identity(8), s, z)
    assert fit.method == "least squares"
    torch.testing.assert_close(fit(s), z, atol=1e-5, rtol=1e-5)


# --- the lens --------------------------------------------------------------------------------

def test_identity_attribute_lens_is_the_logit_lens(tiny_model):
    lre = LRE.identity(tiny_model.cfg.d_model)
    ours = attribute_lens(tiny_model, PROMPT, lre)
    reference = logit_lens(tiny_model, PROMPT)
    assert torch.equal(ours.top_ids, reference.top_ids)
    for name in ("top_probs", "top_logits", "entropy", "kl_to_final", "target_rank"):
        torch.testing.assert_close(getattr(ours, name), getattr(reference, name))
    assert ours.lens.startswith("attribute lens")


def test_attribute_lens_decodes_the_lre_of_every_cell(tiny_model):
    lre = estimate_lre(tiny_model, TOY, 1, train=TOY.samples[:2]).with_beta(1.5)
    result = attribute_lens(tiny_model, PROMPT, lre, k=1, keep_logits=True)
    _, cache = tiny_model.run_with_cache(PROMPT)
    from tl_lenses.readout.unembed import Unembed

    expected = Unembed.from_model(tiny_model)(lre(cache["blocks.2.hook_resid_pre"]))
    torch.testing.assert_close(result.logits[2], expected, atol=1e-5, rtol=1e-5)


def test_estimation_leaves_model_unchanged(tiny_model):
    snapshot = weights_snapshot(tiny_model)
    lre = estimate_lre(tiny_model, TOY, 1, n=2)
    states = collect_states(tiny_model, lre, TOY.samples[2:6], [1])
    causality(tiny_model, lre, states, [(0, 1), (1, 2)])
    assert_weights_unchanged(tiny_model, snapshot)
    assert_no_hooks(tiny_model)


# --- metrics on a model built so that the relation is exactly linear -------------------------

def build(arch, backend, hf=None):
    hf = hf or tiny_hf_model(arch)
    if backend == "bridge":
        return bridge_from_hf(hf, byte_tokenizer(), "GPT2LMHeadModel" if arch == "gpt2"
                              else "LlamaForCausalLM")
    cfg = gpt2_config(hf.config) if arch == "gpt2" else llama_config(hf.config)
    return hooked_from_hf(hf, byte_tokenizer(), cfg)


def linear_after(arch, backend, layer):
    """A tiny model whose blocks from ``layer`` on write nothing: F(s) = s at the last token."""
    hf = tiny_hf_model(arch)
    outputs = ("attn.c_proj", "mlp.c_proj", "self_attn.o_proj", "mlp.down_proj")
    with torch.no_grad():
        for name, param in hf.named_parameters():
            parts = name.split(".")
            index = next(int(p) for p in parts if p.isdigit()) if any(
                p.isdigit() for p in parts) else -1
            if index >= layer and any(key in name for key in outputs):
                param.zero_()
    return build(arch, backend, hf)


RELATION_AT_END = Relation("at end", ("{}",), tuple(Sample(s, o) for s, o in
                                                 zip("abcdefghijkl", "mnopqrstuvwx")))


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2"])
def test_exactly_linear_relation_is_fully_faithful_and_causal(arch, backend):
    model = linear_after(arch, backend, 1)
    lre = estimate_lre(model, RELATION_AT_END, 1, train=RELATION_AT_END.samples[:2])
    torch.testing.assert_close(lre.weight, torch.eye(model.cfg.d_model), atol=1e-6, rtol=0)
    torch.testing.assert_close(lre.bias, torch.zeros(model.cfg.d_model), atol=1e-5, rtol=0)
    states = collect_states(model, lre, RELATION_AT_END.samples[2:], [1])
    # The model's own answers are the objects it "knows"; score against them.
    states = type(states)(**{**states.__dict__, "object_ids": states.predicted_ids})
    assert faithfulness(model, lre, states.at_layer(1), states.object_ids) == 1.0
    pairs = causal_pairs(states, states.correct)
    assert pairs and causality(model, lre, states, pairs) == 1.0


def test_faithfulness_counts_top1_matches(tiny_model):
    lre = LRE.identity(tiny_model.cfg.d_model)
    s = torch.randn(6, tiny_model.cfg.d_model)
    from tl_lenses.readout.unembed import Unembed

    top = Unembed.from_model(tiny_model)(s).argmax(-1)
    wrong = (top + 1) % tiny_model.cfg.d_vocab
    ids = torch.where(torch.arange(6) < 4, top, wrong)
    assert faithfulness(tiny_model, lre, s, ids) == pytest.approx(4 / 6)


# --- relations -------------------------------------------------------------------------------

def test_starter_relations_load_and_are_sizeable():
    relations = starter_relations()
    assert {"country_capital", "country_language", "country_currency", "company_product",
            "adjective_antonym", "noun_plural"} <= set(relations)
    for relation in relations.values():
        assert len(relation.samples) >= 40
        assert all(t.count("{}") == 1 for t in relation.prompt_templates)


def test_relation_file_round_trip(tmp_path):
    data = {"name": "r", "prompt_templates": ["{} is"], "prompt_templates_zs": ["{} is a"],
            "properties": {"relation_type": "factual"},
            "samples": [{"subject": "x", "object": "y"}, {"subject": "z", "object": "w"}]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    relation = load_relation(path)
    assert relation.subjects == ["x", "z"] and relation.objects == ["y", "w"]
    assert few_shot_prompt("{} is", "z", relation.samples[:1]) == "x is y\nz is"


@pytest.mark.parametrize("template", ["no field", "{} and {}", "{0} x", "{name}", "{"])
def test_template_needs_exactly_one_field(template):
    with pytest.raises(ValueError, match="template"):
        check_template(template)
    with pytest.raises(ValueError, match="prompt_templates"):
        relation_from_dict({"name": "r", "prompt_templates": [template],
                            "samples": [{"subject": "a", "object": "b"}] * 2})


def test_bad_relation_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_relation(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_relation(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="lacks the fields"):
        relation_from_dict({"name": "r"})
    with pytest.raises(ValueError, match="lack a subject"):
        relation_from_dict({"name": "r", "prompt_templates": ["{}"], "samples": [{"s": 1}]})
    with pytest.raises(ValueError, match="distinct"):
        relation_from_dict({"name": "r", "prompt_templates": ["{}"],
                            "samples": [{"subject": "a", "object": "b"}] * 2})


def test_bad_arguments(tiny_model):
    with pytest.raises(ValueError, match="does not occur"):
        relation_jacobian(tiny_model, PROMPT, "zz", 1)
    for layer in (-1, tiny_model.cfg.n_layers + 1):
        with pytest.raises(ValueError, match="layer"):
            relation_jacobian(tiny_model, PROMPT, "cd", layer)
    with pytest.raises(ValueError, match="n must be"):
        estimate_lre(tiny_model, TOY, 1, n=len(TOY.samples))
    with pytest.raises(ValueError, match="method"):
        relation_jacobian(tiny_model, PROMPT, "cd", 1, method="fast")
    with pytest.raises(ValueError, match="rank"):
        LRE.identity(4).pinv(5)
    with pytest.raises(ValueError, match="samples"):
        lre_from_jacobians([])
    with pytest.raises(TypeError, match="lre"):
        AttributeLens("not an lre")
    with pytest.raises(ValueError, match="d_model"):
        attribute_lens(tiny_model, PROMPT, LRE.identity(tiny_model.cfg.d_model + 1))


def test_kv_cache_method_needs_a_hooked_transformer(tiny_models):
    with pytest.raises(ValueError, match="HookedTransformer"):
        relation_jacobian(tiny_models[1], PROMPT, "cd", 1, method="kv-cache")


# --- the embedded model ----------------------------------------------------------------------

@pytest.mark.slow
def test_smollm_lre_on_country_capital(smollm):
    relation = starter_relations()["country_capital"]
    train = [s for s in relation.samples if s.subject in ("France", "Japan")]
    lre = estimate_lre(smollm, relation, 8, train=train[:1])
    sample = relation_jacobian(smollm, lre.prompt(train[0].subject), train[0].subject, 8)
    torch.testing.assert_close(lre(sample.s), sample.z, atol=1e-3, rtol=1e-4)
    tokens, pos = subject_position(smollm, lre.prompt("South Korea"), "South Korea")
    assert smollm.to_string(tokens[0, pos]) == " Korea"
    result = attribute_lens(smollm, "I visited France", lre, k=1)
    n_tokens = smollm.to_tokens("I visited France").shape[1]
    assert result.top_ids.shape[:3] == (smollm.cfg.n_layers + 1, 1, n_tokens)


def test_sweep_rows_cover_the_lre_and_both_baselines(tiny_model):
    from tl_lenses.lenses.attribute.metrics import sweep

    result = sweep(tiny_model, TOY, [1, 2], n=3, betas=[1.0, 2.0], ranks=[None, 4])
    assert [lre.layer for lre in result.lres] == [1, 2]
    for layer in (1, 2):
        rows = [r for r in result.rows if r.layer == layer]
        assert [(r.beta, r.rank) for r in rows if r.method == "jacobian"] == \
            [(1.0, None), (1.0, 4), (2.0, None), (2.0, 4)]
        assert {r.method for r in rows} == {"jacobian", "identity", "least squares"}
        assert all(r.n == 3 for r in rows)
    header, cells = result.table()
    assert len(cells) == len(result.rows) and len(header) == len(cells[0])
