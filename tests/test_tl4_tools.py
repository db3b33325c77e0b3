"""tl_lenses against TransformerLens 4.x's own ``tools.analysis`` where the two overlap.

Under TL 4.x: the all-layer logit lens equals ``tools.analysis.logit_lens`` (top-k ids,
probabilities, entropy), DLA per head and per sublayer equals ``direct_logit_attribution``
(``unit="head"`` / ``"component"``), its cumulative sum equals ``unit="layer"``, and a
tuned lens read through TL's ``lens=`` hook (:func:`tl_lens_hook`) equals tl_lenses' own
readout. On tiny Bridges, and on the embedded model (slow). Skipped under TL 3.x, which
has no ``tools.analysis.logit_lens``.
"""

from __future__ import annotations

import pytest
import torch

import tl_lenses as tll
from tl_lenses._compat import TL_MAJOR
from tl_lenses.hooks import resid_names
from tl_lenses.lenses.tl_hook import tl_lens_hook
from tl_lenses.tiny import tiny_bridge

pytestmark = pytest.mark.skipif(TL_MAJOR < 4, reason="TL 4.x's tools.analysis is compared")

ARCHS = ["llama-gqa", "gpt2"]


@pytest.fixture(params=ARCHS)
def bridge(request):
    return tiny_bridge(request.param)


def _tokens(model, batch: int = 2, pos: int = 9):
    return torch.randint(0, model.cfg.d_vocab, (batch, pos),
                         generator=torch.Generator().manual_seed(0))


def assert_same_readout(ours, theirs):
    assert torch.equal(theirs.readout.top_ids, ours.top_ids)
    torch.testing.assert_close(theirs.values, ours.top_probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(theirs.readout.entropy, ours.entropy, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("incl_mid", [False, True])
def test_logit_lens_equals_tl_logit_lens(bridge, incl_mid):
    from transformer_lens.tools.analysis import logit_lens

    tokens = _tokens(bridge)
    ours = tll.logit_lens(bridge, tokens, k=5, incl_mid=incl_mid)
    theirs = logit_lens(bridge, tokens, positions=None, top_k=5, return_type="probs",
                        incl_mid=incl_mid)
    assert len(theirs.labels) == len(ours.hook_names) == len(resid_names(bridge, incl_mid=incl_mid))
    assert_same_readout(ours, theirs)


def test_final_top1_ranks_equal_tl_target_ranks(bridge):
    """Our rank of the final top-1 (1 = top) is TL's zero-based rank + 1."""
    from transformer_lens.tools.analysis import logit_lens

    tokens = _tokens(bridge)
    ours = tll.logit_lens(bridge, tokens, k=1, target="final")
    theirs = logit_lens(bridge, tokens, positions=None, targets=ours.top_ids[-1, ..., 0])
    assert torch.equal(theirs.rank_trajectory() + 1, ours.target_rank)


def _dla(model, tokens, unit):
    from transformer_lens.tools.analysis import direct_logit_attribution

    good, bad = model.to_single_token("a"), model.to_single_token("b")
    return direct_logit_attribution(model, tokens, answer_tokens=good, incorrect_tokens=bad,
                                    unit=unit)


def test_head_dla_equals_tl(bridge):
    tokens = _tokens(bridge)
    ours = tll.dla(bridge, tokens, [("a", "b")])
    theirs = _dla(bridge, tokens, "head")
    heads = [label for label in theirs.labels if label != "remainder"]
    assert heads == list(ours.heads().labels)
    torch.testing.assert_close(theirs.attribution[:len(heads)],
                               ours[heads].values[:, :, 0, 0], atol=1e-5, rtol=1e-4)


def test_sublayer_and_layer_dla_equal_tl(bridge):
    """unit="component" is our heads=False parts; unit="layer" their running sums."""
    tokens = _tokens(bridge)
    ours = tll.dla(bridge, tokens, [("a", "b")], heads=False)
    components = _dla(bridge, tokens, "component")
    rename = {f"{l}_{k}_out": f"L{l} {'attn' if k == 'attn' else 'MLP'}"
              for l in range(bridge.cfg.n_layers) for k in ("attn", "mlp")}
    labels = [rename.get(label, label) for label in components.labels]
    assert labels == list(ours.labels[:-1])                  # ours adds the b_U constant
    parts = ours.values[:-1, :, 0, 0]
    torch.testing.assert_close(components.attribution, parts, atol=1e-5, rtol=1e-4)
    layers = _dla(bridge, tokens, "layer")                   # 0_pre, 0_mid, 1_pre, ..., final
    n_embed = len(labels) - 2 * bridge.cfg.n_layers
    running = parts.cumsum(0)[n_embed - 1:]
    torch.testing.assert_close(layers.attribution, running, atol=1e-5, rtol=1e-4)


def test_tuned_lens_through_tl_lens_hook_equals_apply_lens(bridge):
    from transformer_lens.tools.analysis import logit_lens

    lens = tll.TunedLens.for_model(bridge)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lens.weight.copy_(0.2 * torch.randn(lens.weight.shape, generator=g))
        lens.bias.copy_(torch.randn(lens.bias.shape, generator=g))
    tokens = _tokens(bridge)
    ours = tll.apply_lens(bridge, tokens, lens, k=5)
    theirs = logit_lens(bridge, tokens, lens=tl_lens_hook(bridge, lens), positions=None,
                        top_k=5, return_type="probs")
    assert_same_readout(ours, theirs)
    assert not torch.equal(ours.top_ids, tll.logit_lens(bridge, tokens, k=5).top_ids)


@pytest.mark.slow
def test_embedded_model_equals_tl_tools(smollm_bridge):
    from transformer_lens.tools.analysis import direct_logit_attribution, logit_lens

    model = smollm_bridge
    prompt = "When Mary and John went to the store, John gave a drink to"
    tokens = model.to_tokens(prompt)
    ours = tll.logit_lens(model, tokens, k=5)
    theirs = logit_lens(model, tokens, positions=None, top_k=5, return_type="probs")
    assert torch.equal(theirs.readout.top_ids[:, 0, :, 0], ours.top_ids[:, 0, :, 0])
    torch.testing.assert_close(theirs.values, ours.top_probs, atol=1e-4, rtol=1e-3)
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
    heads = direct_logit_attribution(model, tokens, answer_tokens=mary, incorrect_tokens=john,
                                     unit="head")
    mine = tll.dla(model, tokens, (" Mary", " John"))
    names = heads.labels[:-1]
    torch.testing.assert_close(heads.attribution[:-1], mine[names].values[:, :, 0, 0],
                               atol=1e-4, rtol=1e-3)
