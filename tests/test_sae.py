"""tl_lenses next to sae-lens: SAEs spliced into a HookedSAETransformer, and not spliced.

SAEs are built from configs with random weights (no downloads) on tiny LayerNorm (gpt2) and
RMSNorm (llama) models. The invariants: lens rows read what flows on at an SAE's hook
point, the final row equals ``model(tokens)``; DLA parts (latents, b_dec, error, the
writers after the SAE) sum to the model's own logit; user hooks and SAEs stay as they were.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import assert_weights_unchanged, weights_snapshot

sae_lens = pytest.importorskip("sae_lens")

from sae_lens import HookedSAETransformer, StandardSAE, StandardSAEConfig  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

from tl_lenses.attribution.core import dla, logit_directions, residual_readout  # noqa: E402
from tl_lenses.lenses.logit import logit_lens  # noqa: E402
from tl_lenses.lenses.tuned import TunedLens  # noqa: E402
from tl_lenses.readout.apply import LensCollector, apply_lens, apply_lens_to_cache  # noqa: E402
from tl_lenses.sae import latent_lens, readout_matrix, top_latents_page  # noqa: E402
from tl_lenses.tiny import byte_tokenizer, tiny_bridge, tiny_hooked  # noqa: E402

D_SAE = 64
PAIR = ("a", "b")


def hooked_sae_model(arch: str) -> HookedSAETransformer:
    """The tiny random model of ``arch`` as a HookedSAETransformer (same weights)."""
    base = tiny_hooked(arch, n_layers=2)
    model = HookedSAETransformer(base.cfg, tokenizer=byte_tokenizer(), move_to_device=False)
    model.load_state_dict(base.state_dict())
    return model.eval()


def random_sae(site: str, d_in: int = 32, seed: int = 0, **cfg) -> StandardSAE:
    """A StandardSAE with random weights and biases (so latents are active and b_dec matters)."""
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=D_SAE,
                                        metadata=SAEMetadata(hook_name=site), **cfg))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.5)
        sae.b_enc.normal_(0, 0.2)
    return sae.eval()


@pytest.fixture(params=["gpt2", "llama"])
def model(request):
    return hooked_sae_model(request.param)


def _tokens(seed=0, batch=2, n_pos=7):
    return torch.randint(0, 256, (batch, n_pos), generator=torch.Generator().manual_seed(seed))


def _logit_diff(logits):
    return logits[..., ord("a")] - logits[..., ord("b")]


def _no_latent_labels(labels):
    return not any("SAE" in label for label in labels)


def test_tl_lenses_imports_without_sae_lens():
    code = ("import sys; sys.modules['sae_lens'] = None\n"
            "import tl_lenses, tl_lenses.sae, tl_lenses.attribution\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.parametrize("use_error_term", [False, True])
@pytest.mark.parametrize("row, site", [(1, "blocks.1.hook_resid_pre"),
                                       (2, "blocks.1.hook_resid_post")])
def test_logit_lens_reads_the_sae_output_and_ends_at_the_model(model, use_error_term, row, site):
    from tl_lenses.readout.unembed import Unembed

    model.add_sae(random_sae(site), use_error_term=use_error_term)
    tokens = _tokens()
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    result = logit_lens(model, tokens, keep_logits=True)
    assert result.hook_names[row] == site
    torch.testing.assert_close(result.logits[-1], logits, atol=1e-4, rtol=1e-4)
    expected = Unembed.from_model(model)(cache[f"{site}.hook_sae_output"])
    torch.testing.assert_close(result.logits[row], expected, atol=1e-4, rtol=1e-4)
    if not use_error_term:  # the reconstruction, not the residual, flows on
        plain = Unembed.from_model(model)(cache[f"{site}.hook_sae_input"])
        assert not torch.allclose(result.logits[row], plain, atol=1e-3)


def test_lens_through_run_with_cache_with_saes_and_as_hooks(model):
    sae = random_sae("blocks.1.hook_resid_pre")
    tokens = _tokens()
    with torch.no_grad():
        logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
    from_cache = apply_lens_to_cache(model, cache, tokens, keep_logits=True)
    torch.testing.assert_close(from_cache.logits[-1], logits, atol=1e-4, rtol=1e-4)
    model.add_sae(sae)
    collector = LensCollector(model)
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=collector.fwd_hooks())
    torch.testing.assert_close(collector.result(tokens, keep_logits=True).logits,
                               from_cache.logits, atol=1e-5, rtol=1e-5)


def test_tuned_lens_on_a_spliced_model(model):
    model.add_sae(random_sae("blocks.1.hook_resid_pre"))
    tokens = _tokens()
    lens = TunedLens.for_model(model)  # fresh: the identity, so equal to the logit lens
    tuned = apply_lens(model, tokens, lens, keep_logits=True)
    torch.testing.assert_close(tuned.logits, logit_lens(model, tokens, keep_logits=True).logits)


@pytest.mark.parametrize("use_error_term", [False, True])
@pytest.mark.parametrize("mode", [{}, {"heads": False}, {"neurons": True}])
def test_dla_with_a_spliced_resid_sae_sums_to_the_models_logit(model, use_error_term, mode):
    model.add_sae(random_sae("blocks.1.hook_resid_pre"), use_error_term=use_error_term)
    tokens = _tokens()
    result = dla(model, tokens, PAIR, positions=None, **mode)
    with torch.no_grad():
        want = _logit_diff(model(tokens))
    torch.testing.assert_close(result.logits[..., 0], want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.total(), result.logits, atol=1e-4, rtol=1e-4)
    labels = list(result.labels)
    assert labels[:D_SAE] == [f"L1 SAE#{i}" for i in range(D_SAE)]
    assert labels[D_SAE] == "L1 SAE b_dec"
    assert ("L1 SAE error" in labels) == use_error_term
    # What was written before the SAE only reaches the logit through it.
    assert "embed" not in labels and not any(label.startswith("L0") for label in labels)


def test_each_latent_is_activation_times_decoder_row(model):
    sae = random_sae("blocks.1.hook_resid_pre")
    model.add_sae(sae)
    tokens = _tokens()
    result = dla(model, tokens, PAIR, positions=None)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    acts = cache["blocks.1.hook_resid_pre.hook_sae_acts_post"]
    assert (acts > 0).any()
    u, _ = residual_readout(model, logit_directions(model, PAIR))
    scale = cache["ln_final.hook_scale"][..., 0]
    want = torch.einsum("bpi,i->ibp", acts, (sae.W_dec.detach() @ u)[:, 0]) / scale
    torch.testing.assert_close(result.values[:D_SAE, ..., 0], want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("site", ["blocks.0.hook_attn_out", "blocks.1.hook_mlp_out",
                                  "blocks.0.hook_resid_mid", "blocks.1.hook_resid_post"])
def test_dla_with_saes_at_other_sites_stays_exact(model, site):
    prefix = {"attn_out": "L0 attn", "mlp_out": "L1 mlp", "resid_mid": "L0 mid",
              "resid_post": "L1 post"}[site.split("hook_")[-1]]
    model.add_sae(random_sae(site), use_error_term=True)
    tokens = _tokens()
    with torch.no_grad():
        want = _logit_diff(model(tokens))
    for mode in ({}, {"heads": False}, {"neurons": True}):
        result = dla(model, tokens, PAIR, positions=None, **mode)
        torch.testing.assert_close(result.total()[..., 0], want, atol=1e-4, rtol=1e-4)
        assert f"{prefix} SAE#0" in result.labels and f"{prefix} SAE error" in result.labels


def test_layer_norm_normalised_sae_splits_exactly(model):
    model.add_sae(random_sae("blocks.1.hook_resid_pre", normalize_activations="layer_norm"))
    tokens = _tokens()
    with torch.no_grad():
        want = _logit_diff(model(tokens))
    result = dla(model, tokens, PAIR, positions=None)
    torch.testing.assert_close(result.total()[..., 0], want, atol=1e-4, rtol=1e-4)


def test_dla_from_a_run_with_cache_with_saes_cache(model):
    sae = random_sae("blocks.1.hook_resid_pre")
    tokens = _tokens()
    with torch.no_grad():
        logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
    assert not model.acts_to_saes  # the SAE was only there for that run
    with_latents = dla(model, tokens, PAIR, positions=None, cache=cache, saes=[sae])
    whole = dla(model, tokens, PAIR, positions=None, cache=cache)  # no SAE object: one part
    for result in (with_latents, whole):
        torch.testing.assert_close(result.total()[..., 0], _logit_diff(logits),
                                   atol=1e-4, rtol=1e-4)
    assert "L1 SAE" in whole.labels and "L1 SAE#0" in with_latents.labels


@pytest.mark.parametrize("site", ["blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out"])
def test_dla_to_latents_of_an_sae_that_is_not_spliced(site):
    for model in (tiny_hooked("gpt2", n_layers=2), tiny_bridge("llama", n_layers=2)):
        sae = random_sae(site)
        tokens = _tokens()
        plain = dla(model, tokens, PAIR, positions=None)
        split = dla(model, tokens, PAIR, positions=None, saes=[sae])
        torch.testing.assert_close(split.total(), plain.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(split.logits, plain.logits)
        # The writers after the SAE are unchanged; the error carries what the SAE misses.
        after = [label for label in split.labels if label.startswith("L1H")]
        torch.testing.assert_close(split[after].values, plain[after].values)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
            acts = sae.encode(cache[site])
        prefix = "L1" if site.endswith("resid_pre") else "L1 mlp"
        active = split[[f"{prefix} SAE#{i}" for i in range(D_SAE)]].values[..., 0]
        assert torch.equal(active != 0, acts.permute(2, 0, 1) > 0)


def test_user_hooks_and_saes_are_left_as_they_were(model):
    sae = random_sae("blocks.1.hook_resid_pre")
    other = random_sae("blocks.0.hook_mlp_out", seed=1)
    model.add_sae(sae, use_error_term=True)
    seen = []
    model.add_hook("blocks.0.hook_attn_out", lambda t, hook: seen.append(1))
    before = weights_snapshot(model)
    sae_before = {k: v.clone() for k, v in sae.state_dict().items()}
    tokens = _tokens()
    logit_lens(model, tokens)
    dla(model, tokens, PAIR, saes=[other])
    latent_lens(model, sae, k=3)
    with pytest.raises(ValueError):
        dla(model, tokens, PAIR, positions=[99])
    assert model.acts_to_saes == {"blocks.1.hook_resid_pre": sae}
    assert model._acts_to_saes["blocks.1.hook_resid_pre"].use_error_term
    assert len(model.hook_dict["blocks.0.hook_attn_out"]._forward_hooks) == 1
    hooks = {name: len(hp._forward_hooks) for name, hp in model.hook_dict.items()}
    assert sum(hooks.values()) == 1
    assert_weights_unchanged(model, before)
    for k, v in sae.state_dict().items():
        assert torch.equal(v, sae_before[k])
    assert seen  # the user hook still fires


def test_latent_lens_is_the_decoder_row_through_the_unembedding(model):
    sae = random_sae("blocks.1.hook_resid_pre")
    result = latent_lens(model, sae, k=5, latents=[3, 7])
    U = readout_matrix(model)
    want = (sae.W_dec.detach()[[3, 7]] @ U).topk(5)
    assert torch.equal(result.top_tokens, want.indices)
    torch.testing.assert_close(result.top_values, want.values)
    # DLA of latent 3 onto its top token, per unit activation and norm scale, is the same.
    u, _ = residual_readout(model, logit_directions(model, int(result.top_tokens[0, 0])))
    torch.testing.assert_close(sae.W_dec.detach()[3] @ u[:, 0], result.top_values[0, 0])
    assert "SAE#3" in result.to_html() and result.rows()[1]["label"] == "L1 SAE#7"


def test_latent_lens_through_a_tuned_lens_uses_its_linear_part(model):
    sae = random_sae("blocks.1.hook_resid_pre")
    lens = TunedLens.for_model(model)
    fresh = latent_lens(model, sae, lens, k=4)
    torch.testing.assert_close(fresh.top_values, latent_lens(model, sae, k=4).top_values)
    with torch.no_grad():
        i = lens.index("blocks.1.hook_resid_pre")
        lens.weight[i].normal_(0, 0.1)
        lens.bias[i].normal_(0, 1.0)  # moves points, not directions: no effect
    trained = latent_lens(model, sae, lens, k=4, latents=[0])
    d = sae.W_dec.detach()[0]
    want = ((d + d @ lens.weight[i].detach().T) @ readout_matrix(model)).topk(4)
    torch.testing.assert_close(trained.top_values[0], want.values, atol=1e-5, rtol=1e-5)


def test_top_latents_view_lists_latents_heads_and_others(model):
    model.add_sae(random_sae("blocks.1.hook_resid_pre"), use_error_term=True)
    html = top_latents_page(dla(model, _tokens(), PAIR), k=5)
    assert "top latents" in html and "L1 SAE#" in html and "L1H" in html and "L1 MLP" in html


def test_bad_saes_are_refused_clearly(model):
    tokens = _tokens()
    with pytest.raises(TypeError, match="saes"):
        dla(model, tokens, PAIR, saes=[object()])
    with pytest.raises(ValueError, match="d_model-wide"):
        dla(model, tokens, PAIR, saes=[random_sae("blocks.0.attn.hook_z")])
    with pytest.raises(ValueError, match="d_model-wide"):
        latent_lens(model, random_sae("blocks.0.ln1.hook_normalized"))
    with pytest.raises(ValueError, match="latents"):
        latent_lens(model, random_sae("blocks.1.hook_resid_pre"), latents=[D_SAE])


def test_an_sae_bypassed_at_some_tokens_is_refused_not_misattributed(model):
    model.add_sae(random_sae("blocks.1.hook_resid_pre"), exclude_special_tokens=[ord("a")])
    tokens = _tokens()
    tokens[:, 2] = ord("a")
    with pytest.raises(NotImplementedError, match="SAE"):
        dla(model, tokens, PAIR, positions=None)


def test_dla_through_a_spliced_hook_z_sae_reads_what_flowed(model):
    model.add_sae(random_sae("blocks.1.attn.hook_z", reshape_activations="hook_z"))
    tokens = _tokens()
    with torch.no_grad():
        want = _logit_diff(model(tokens))
    result = dla(model, tokens, PAIR, positions=None)
    torch.testing.assert_close(result.total()[..., 0], want, atol=1e-4, rtol=1e-4)
    assert "L1H0" in result.labels  # heads stay heads: their z is the SAE's output


def test_head_path_dla_refuses_spliced_saes(model):
    from tl_lenses.attribution.paths import head_path_dla

    model.add_sae(random_sae("blocks.1.hook_resid_pre"))
    with pytest.raises(NotImplementedError, match="SAE"):
        head_path_dla(model, _tokens(), PAIR, heads=["L1H0"])


def test_patchscope_on_a_spliced_model_patches_what_flows_on(model):
    from tl_lenses.patchscopes.core import patchscope

    model.add_sae(random_sae("blocks.1.hook_resid_pre"))
    prompt = "abcdefg"
    # Source = target, same layer and position: an identity patch changes nothing.
    result = patchscope(model, prompt, prompt, source_layer=1, source_position=-1)
    with torch.no_grad():
        _, cache = model.run_with_cache(model.to_tokens(prompt))
    torch.testing.assert_close(result.hidden,
                               cache["blocks.1.hook_resid_pre.hook_sae_output"][0, -1])
    with torch.no_grad():
        torch.testing.assert_close(result.logits, model(prompt)[0, -1], atol=1e-5, rtol=1e-5)
    # A different value patched in at the SAE's output does change the logits.
    other = patchscope(model, "zzzzzzz", prompt, source_layer=1, target_layer=1)
    assert not torch.allclose(other.logits, result.logits)


def test_tuned_lens_trains_on_a_spliced_model(model):
    from tl_lenses.lenses.tuned import train_tuned_lens

    model.add_sae(random_sae("blocks.1.hook_resid_pre"))
    tokens = torch.randint(0, 256, (16, 12), generator=torch.Generator().manual_seed(3))
    lens = train_tuned_lens(model, tokens, steps=2, ls_tokens=128, progress=False).lens
    assert "blocks.1.hook_resid_pre" in lens.hook_names
    assert lens.weight is None or lens.weight.abs().sum() > 0
    assert model.acts_to_saes  # still attached


def test_attribute_lens_on_a_spliced_model(model):
    from tl_lenses.lenses.attribute.lens import attribute_lens
    from tl_lenses.lenses.attribute.lre import estimate_lre, subject_position
    from tl_lenses.lenses.attribute.metrics import collect_states, score
    from tl_lenses.lenses.attribute.relations import Relation, Sample

    toy = Relation("toy", ("{} =",), tuple(Sample(s, o) for s, o in zip("abcdef", "mnopqr")))
    model.add_sae(random_sae("blocks.1.hook_resid_pre"))
    lre = estimate_lre(model, toy, 1, train=list(toy.samples[:3]))
    states = collect_states(model, lre, list(toy.samples), [1])
    with torch.no_grad():
        _, cache = model.run_with_cache(states.tokens)
    # The subject states are what flows on at layer 1: the SAE's output.
    pos = subject_position(model, lre.prompt(toy.samples[0].subject), "a")[1]
    torch.testing.assert_close(states.at_layer(1)[0],
                               cache["blocks.1.hook_resid_pre.hook_sae_output"][0, pos])
    result = attribute_lens(model, "a =", lre)
    assert result.hook_names[1] == "blocks.1.hook_resid_pre"
    assert score(model, lre, states, states, baselines=False)
