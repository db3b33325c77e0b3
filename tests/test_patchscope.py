"""Patchscopes: the operation's invariants, the batched sweep, generation, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_no_hooks, assert_weights_unchanged, weights_snapshot

from tl_lenses.hooks import resolve_layer
from tl_lenses.patchscopes.core import (
    AffineMap,
    patch_hook,
    patchscope,
    run_patched,
    source_state,
)
from tl_lenses.patchscopes.sweep import patchscope_sweep
from tl_lenses.readout.unembed import Unembed

PROMPT = "hello world, cats"
TARGET = "cat -> cat\n?"


def test_layer_convention(tiny_model):
    n = tiny_model.cfg.n_layers
    assert resolve_layer(tiny_model, 0) == (0, "blocks.0.hook_resid_pre")
    assert resolve_layer(tiny_model, n) == (n, f"blocks.{n - 1}.hook_resid_post")
    assert resolve_layer(tiny_model, -1) == (n, f"blocks.{n - 1}.hook_resid_post")
    for bad in (n + 1, -(n + 2), 1.0, True):
        with pytest.raises(ValueError, match="layer"):
            resolve_layer(tiny_model, bad)


@pytest.mark.parametrize("layer, position", [(0, 0), (2, 5), (3, -1), (1, -4)])
def test_identity_patch_reproduces_logits_exactly(tiny_model, layer, position):
    """S = T, l* = l, i* = i, f = identity: the patched run is the unpatched run."""
    snapshot = weights_snapshot(tiny_model)
    result = patchscope(tiny_model, PROMPT, PROMPT, source_layer=layer,
                        source_position=position, target_position=position)
    with torch.no_grad():
        clean = tiny_model(tiny_model.to_tokens(PROMPT))[0, -1]
    assert torch.equal(result.logits, clean)
    assert_no_hooks(tiny_model)
    assert_weights_unchanged(tiny_model, snapshot)


def test_patched_value_and_earlier_positions(tiny_model):
    """After the patch the hook holds f(h) at i*; positions before i* are untouched."""
    f = lambda h: 2.0 * h + 0.5  # noqa: E731
    h = source_state(tiny_model, PROMPT, layer=2, position=3)
    tokens = tiny_model.to_tokens(TARGET)
    i_star, name = 6, "blocks.1.hook_resid_pre"
    seen = {}

    def record(key):  # keyed by our name: a Bridge's hook.name may be an alias's
        def hook(resid, hook):
            seen[key] = resid.detach().clone()
        return hook

    later = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_post"]
    with torch.no_grad():
        _, clean = tiny_model.run_with_cache(tokens, names_filter=lambda n: n in later)
        tiny_model.run_with_hooks(tokens, fwd_hooks=[(name, patch_hook(f(h), i_star))]
                                  + [(n, record(n)) for n in later])
    assert torch.equal(seen[name][0, i_star], f(h))
    for n in later:
        assert torch.equal(seen[n][0, :i_star], clean[n][0, :i_star])
    assert not torch.allclose(seen[later[1]][0, i_star:], clean[later[1]][0, i_star:])
    assert_no_hooks(tiny_model)


@pytest.mark.parametrize("transform", [None, "affine", "callable"])
def test_last_layer_patch_is_logit_lens(tiny_model, transform):
    """Patching f(h) into the final resid_post at the last token: logits = unembed(f(h))."""
    n, d = tiny_model.cfg.n_layers, tiny_model.cfg.d_model
    g = torch.Generator().manual_seed(0)
    f = {None: None, "callable": lambda x: x.flip(-1),
         "affine": AffineMap(torch.randn(d, d, generator=g) / d**0.5, torch.randn(d, generator=g))
         }[transform]
    result = patchscope(tiny_model, PROMPT, TARGET, source_layer=1, target_layer=n,
                        source_position=2, transform=f)
    expected_patched = result.hidden if f is None else f(result.hidden[None])[0]
    assert torch.equal(result.patched, expected_patched)
    lens = Unembed.from_model(tiny_model)(expected_patched)
    torch.testing.assert_close(result.logits, lens, atol=1e-5, rtol=1e-5)


def test_generation_with_kv_cache_equals_rerun(tiny_model):
    """Greedy generation after the patch: each step equals re-running the whole sequence."""
    steps = 6
    result = patchscope(tiny_model, PROMPT, TARGET, source_layer=2, target_layer=1,
                        target_position=-3, max_new_tokens=steps)
    hook = patch_hook(result.patched, result.target_position)
    seq = result.target_tokens[None]
    with torch.no_grad():
        for step in range(steps):
            logits = tiny_model.run_with_hooks(seq, fwd_hooks=[(result.target_hook, hook)])
            if step == 0:
                torch.testing.assert_close(logits[0, -1], result.logits, atol=1e-5, rtol=1e-5)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert result.generated_ids.tolist() == seq[0, -steps:].tolist()
    assert_no_hooks(tiny_model)


def test_sweep_equals_one_by_one(tiny_model):
    """Batched (prefix shared, rows patched per layer) = each case alone, incl. padding cases."""
    sources = ["hello world, cats", "dog"]          # different lengths
    targets = ["cat -> cat\n?", "x: y, a: b, ?"]    # one target per source, different lengths
    result = patchscope_sweep(tiny_model, sources, targets, source_layers=[0, 2, 3],
                              source_positions=[0, -1], target_layers=[1, 3],
                              target_position=-2, k=3, max_new_tokens=2, batch_size=5)
    assert len(result) == 2 * 3 * 2 * 2
    for case in range(len(result)):
        j = int(result.source_index[case])
        alone = patchscope(
            tiny_model, sources[j], targets[j], source_layer=int(result.source_layer[case]),
            source_position=int(result.source_position[case]),
            target_layer=int(result.target_layer[case]), target_position=-2, max_new_tokens=2)
        probs, ids = alone.logits.softmax(-1).topk(3)
        assert result.top_ids[case].tolist() == ids.tolist()
        torch.testing.assert_close(result.top_probs[case], probs, atol=1e-5, rtol=1e-4)
        assert result.generated_ids[case].tolist() == alone.generated_ids.tolist()
    assert_no_hooks(tiny_model)


def test_sweep_same_pairs_and_grid(tiny_model):
    result = patchscope_sweep(tiny_model, PROMPT, TARGET, pairs="same")
    n = tiny_model.cfg.n_layers
    assert result.source_layer.tolist() == result.target_layer.tolist() == list(range(n + 1))
    grid, rows, cols = result.layer_grid(result.top_tokens())
    assert rows == cols == list(range(n + 1))
    assert all(grid[i][j] is None for i in rows for j in cols if i != j)


def test_backends_agree(tiny_models):
    hooked, bridge = tiny_models
    kwargs = dict(source_layer=2, target_layer=1, source_position=0, max_new_tokens=3)
    a, b = (patchscope(m, PROMPT, TARGET, **kwargs) for m in (hooked, bridge))
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    assert a.generated_ids.tolist() == b.generated_ids.tolist()


def test_run_patched_prefix_reuse_matches_full(tiny_model):
    tokens = tiny_model.to_tokens(TARGET).expand(3, -1)
    names = ["blocks.0.hook_resid_pre", "blocks.2.hook_resid_pre", "blocks.2.hook_resid_post"]
    values = torch.randn(3, tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    shared = run_patched(tiny_model, tokens, names, [9, 11, 10], values, max_new_tokens=3)
    full = run_patched(tiny_model, tokens, names, [9, 11, 10], values, max_new_tokens=3,
                       reuse_prefix=False)
    torch.testing.assert_close(shared[0], full[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(shared[1], full[1])


# --- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(source_layer=9), "source_layer"),
    (dict(source_layer=1, target_layer=-9), "target_layer"),
    (dict(source_layer=1, source_position=40), "source_position"),
    (dict(source_layer=1, target_position=-40), "target_position"),
    (dict(source_layer=1, max_new_tokens=-1), "max_new_tokens"),
    (dict(source_layer=1, transform=(torch.zeros(5, 5), torch.zeros(5))), "transform A"),
    (dict(source_layer=1, transform=lambda h: h[..., :3]), "transform"),
])
def test_bad_input(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        patchscope(tiny_model, PROMPT, TARGET, **kwargs)
    assert_no_hooks(tiny_model)


def test_d_model_mismatch_needs_map():
    from tl_lenses.tiny import tiny_default

    small, wide = tiny_default("llama"), tiny_default("llama", d_model=48)
    with pytest.raises(ValueError, match="d_model"):
        patchscope(small, PROMPT, TARGET, source_layer=1, target_model=wide)
    A = torch.randn(32, 48)
    result = patchscope(small, PROMPT, TARGET, source_layer=1, target_model=wide,
                        transform=(A, torch.zeros(48)))
    torch.testing.assert_close(result.patched, result.hidden @ A)


def test_hooks_removed_after_error_in_transform(tiny_model):
    def broken(h):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        patchscope(tiny_model, PROMPT, TARGET, source_layer=1, transform=broken)
    assert_no_hooks(tiny_model)
    hook = patch_hook(torch.zeros(tiny_model.cfg.d_model), position=50)
    with pytest.raises(Exception, match="position"):
        tiny_model.run_with_hooks(tiny_model.to_tokens(TARGET),
                                  fwd_hooks=[("blocks.0.hook_resid_pre", hook)])
    assert_no_hooks(tiny_model)
