"""Shared fixtures: tiny random models on both backends, and the embedded model (slow)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tl_lenses.tiny import tiny_bridge, tiny_hooked, tiny_pair  # noqa: E402

ARCHS = ["llama-gqa", "gpt2"]
BACKENDS = ["hooked", "bridge"]


@pytest.fixture(params=[(a, b) for a in ARCHS for b in BACKENDS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def tiny_model(request):
    """A tiny random model: LayerNorm/MHA (gpt2) and RMSNorm/GQA (llama) on both backends."""
    arch, backend = request.param
    return (tiny_hooked if backend == "hooked" else tiny_bridge)(arch)


@pytest.fixture(params=ARCHS)
def tiny_models(request):
    """The same tiny random weights on both backends: (HookedTransformer, TransformerBridge)."""
    return tiny_pair(request.param)


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct as a HookedTransformer (loaded once per run)."""
    from tl_lenses.models import load_default_model

    return load_default_model()


@pytest.fixture(scope="session")
def smollm_bridge():
    from tl_lenses.models import load_default_model

    return load_default_model(backend="bridge")


def weights_snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of every parameter, to check later that nothing changed them."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_weights_unchanged(model, snapshot) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), snapshot[name]), f"{name} changed"


def assert_no_hooks(model) -> None:
    """No forward or backward hook is left on any hook point."""
    for name, hp in model.hook_dict.items():
        assert not hp._forward_hooks and not hp._backward_hooks, f"hook left on {name}"


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every device this machine has: the CPU always, CUDA when present."""
    return request.param
