"""Methods that take gradients give the same result inside no_grad and inference_mode.

Notebooks often wrap analysis cells in ``torch.no_grad()`` or ``torch.inference_mode()``.
Under inference mode a Jacobian read off the model was silently all zeros (an LRE with
W = 0) and training failed with a bare autograd error; now each such method leaves both
modes for its own call, and the caller's modes are back afterwards.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import tl_lenses as tll
from tl_lenses.analysis.alignment import gradient_alignment
from tl_lenses.analysis.objectives import compare_objectives
from tl_lenses.analysis.retrained import retrained_decoders
from tl_lenses.lenses.attribute.lre import relation_jacobian
from tl_lenses.tiny import tiny_bridge, tiny_hooked

MODES = {
    "plain": contextlib.nullcontext,
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
}


def byte_rows(n, pos, seed=0):
    return torch.randint(0, 256, (n, pos), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=[pytest.param("hooked", marks=pytest.mark.hooked), "bridge"])
def model(request):
    return (tiny_hooked if request.param == "hooked" else tiny_bridge)("llama-gqa", n_ctx=256)


def in_mode(mode: str, fn):
    """``fn()`` inside ``mode``; also checks the mode is still on when it returns."""
    with MODES[mode]():
        out = fn()
        assert torch.is_grad_enabled() == (mode == "plain")
        assert torch.is_inference_mode_enabled() == (mode == "inference_mode")
    return out


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_lre_and_its_jacobian_do_not_depend_on_grad_mode(model, mode):
    ref = relation_jacobian(model, "The capital of France is", "France", 1)
    assert ref.jacobian.abs().max() > 0  # a real Jacobian, so equality below means something
    got = in_mode(mode, lambda: relation_jacobian(model, "The capital of France is", "France", 1))
    torch.testing.assert_close(got.jacobian, ref.jacobian, rtol=0, atol=0)
    plain = tll.estimate_lre(model, "country_capital", layer=1, n=2)
    lre = in_mode(mode, lambda: tll.estimate_lre(model, "country_capital", layer=1, n=2))
    torch.testing.assert_close(lre.weight, plain.weight, rtol=0, atol=0)
    torch.testing.assert_close(lre.bias, plain.bias, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_tuned_lens_training_does_not_depend_on_grad_mode(model, mode):
    tokens = byte_rows(8, 16)
    kw = dict(steps=3, batch_size=2, progress=False, seed=0)
    plain = tll.train_tuned_lens(model, tokens, **kw).lens
    trained = in_mode(mode, lambda: tll.train_tuned_lens(model, tokens, **kw).lens)
    for a, b in zip(plain.state_dict().values(), trained.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not any(p.is_inference() for p in trained.parameters())  # usable for training on


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_gradient_analyses_do_not_depend_on_grad_mode(model, mode):
    tokens = byte_rows(3, 6)
    plain = gradient_alignment(model, tokens, bins=20, batch_size=2, progress=False)
    got = in_mode(mode, lambda: gradient_alignment(model, tokens, bins=20, batch_size=2,
                                                   progress=False))
    torch.testing.assert_close(got.mean, plain.mean, rtol=0, atol=0)
    train, held = byte_rows(6, 10), byte_rows(3, 10, seed=2)
    plain = retrained_decoders(model, train, held, steps=2, progress=False)
    got = in_mode(mode, lambda: retrained_decoders(model, train, held, steps=2, progress=False))
    for name in plain.metrics:
        torch.testing.assert_close(got.metrics[name]["ce"], plain.metrics[name]["ce"], rtol=0,
                                   atol=0)
    kw = dict(objectives=("kl",), kinds=("bias",), steps=2, progress=False)
    plain = compare_objectives(model, train, held, **kw)
    got = in_mode(mode, lambda: compare_objectives(model, train, held, **kw))
    torch.testing.assert_close(got.metrics["kl / bias"]["kl"], plain.metrics["kl / bias"]["kl"],
                               rtol=0, atol=0)


def test_token_ids_made_in_inference_mode_can_be_differentiated_through(model):
    """An inference tensor may not be saved for backward: the method copies it first."""
    with torch.inference_mode():
        tokens = byte_rows(3, 6)
        assert tokens.is_inference()
        got = gradient_alignment(model, tokens, bins=20, batch_size=2, progress=False)
    plain = gradient_alignment(model, byte_rows(3, 6), bins=20, batch_size=2, progress=False)
    torch.testing.assert_close(got.mean, plain.mean, rtol=0, atol=0)
