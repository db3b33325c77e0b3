"""A fresh user's mistakes: each is refused before any work, naming the argument."""

from __future__ import annotations

import pytest

import tl_lenses as tll
from tests.conftest import assert_no_hooks
from tl_lenses.patchscopes import presets
from tl_lenses.tiny import tiny_bridge, tiny_hooked


def _small_ctx(arch: str, backend: str):
    return (tiny_hooked if backend == "hooked" else tiny_bridge)(arch, n_ctx=32)


@pytest.fixture(params=[pytest.param(("llama-gqa", "hooked"), marks=pytest.mark.hooked),
                        pytest.param(("gpt2", "hooked"), marks=pytest.mark.hooked),
                        ("llama-gqa", "bridge"), ("gpt2", "bridge")],
                ids=lambda p: "-".join(p))
def short_model(request):
    """A tiny model whose n_ctx (32) a generation can run past."""
    return _small_ctx(*request.param)


def test_generation_past_n_ctx_is_refused_on_every_path(short_model):
    model = short_model
    target = "cat -> cat; x"
    n = model.to_tokens(target).shape[1]
    fits = model.cfg.n_ctx - n + 1
    calls = [
        lambda m: tll.patchscope(model, "hello world", target, source_layer=1,
                                 max_new_tokens=m),
        lambda m: tll.patchscope_sweep(model, "hello world", target, source_layers=[1],
                                       max_new_tokens=m),
        lambda m: presets.entity_description(model, "hello world", layers=[1],
                                             target_prompt=target, max_new_tokens=m),
        lambda m: presets.chain_of_thought(model, target, "hello", source_layers=[1],
                                           target_layers=[1], max_new_tokens=m),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=rf"max_new_tokens={fits + 1}.*{n} tokens.*"
                                             rf"n_ctx={model.cfg.n_ctx}"):
            call(fits + 1)
        assert_no_hooks(model)
    # The longest generation that fits runs, and fills the context exactly.
    result = tll.patchscope(model, "hello world", target, source_layer=1, max_new_tokens=fits)
    assert result.generated_ids.shape == (fits,)
