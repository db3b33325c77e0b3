"""Shared fixtures: tiny random models on both backends, and the embedded model (slow).

The suite runs under TransformerLens 3.x and 4.x. Under 4.x (no HookedTransformer) these
are skipped, with the reason, and nothing else: tests marked ``hooked``, the
HookedTransformer variants of the ``tiny_model`` / ``tiny_models`` fixtures, the ``smollm``
fixture, and any test that builds a HookedTransformer (``tiny_hooked``, ``hooked_from_hf``,
``backend="hooked"``), which tl_lenses refuses there with ``HookedTransformerUnavailable``.
One switch, ``tl_lenses._compat.HAS_HOOKED``; no version checks in the tests themselves.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tl_lenses._compat import HAS_HOOKED, TL_VERSION, HookedTransformerUnavailable  # noqa: E402
from tl_lenses.tiny import tiny_bridge, tiny_hooked, tiny_pair  # noqa: E402

ARCHS = ["llama-gqa", "gpt2"]
BACKENDS = ["hooked", "bridge"]
NO_HOOKED = f"needs HookedTransformer, which TransformerLens {TL_VERSION} does not have"


def pytest_collection_modifyitems(config, items):
    """Under TL 4.x, skip every test (or fixture variant) marked ``hooked``."""
    if HAS_HOOKED:
        return
    skip = pytest.mark.skip(reason=NO_HOOKED)
    for item in items:
        if "hooked" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that needed a HookedTransformer under TL 4.x is reported skipped, not failed."""
    outcome = yield
    report = outcome.get_result()
    if not HAS_HOOKED and call.excinfo is not None \
            and call.excinfo.errisinstance(HookedTransformerUnavailable):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1], f"Skipped: {NO_HOOKED}")


def _param(arch: str, backend: str):
    marks = [pytest.mark.hooked] if backend == "hooked" else []
    return pytest.param((arch, backend), id=f"{arch}-{backend}", marks=marks)


@pytest.fixture(params=[_param(a, b) for a in ARCHS for b in BACKENDS])
def tiny_model(request):
    """A tiny random model: LayerNorm/MHA (gpt2) and RMSNorm/GQA (llama) on both backends."""
    arch, backend = request.param
    return (tiny_hooked if backend == "hooked" else tiny_bridge)(arch)


@pytest.fixture(params=[pytest.param(a, marks=pytest.mark.hooked) for a in ARCHS])
def tiny_models(request):
    """The same tiny random weights on both backends: (HookedTransformer, TransformerBridge)."""
    return tiny_pair(request.param)


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct as a HookedTransformer (loaded once per run)."""
    from tl_lenses.models import load_default_model

    if not HAS_HOOKED:
        pytest.skip(NO_HOOKED)
    return load_default_model(backend="hooked")


@pytest.fixture(scope="session")
def smollm_bridge():
    """The embedded model as a TransformerBridge in compatibility mode (loaded once per run)."""
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
