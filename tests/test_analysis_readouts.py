"""Current-vs-next and drift analyses against independent computations, on tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_no_hooks

from tl_lenses.analysis.current_next import common_ids, current_vs_next, seen_before
from tl_lenses.analysis.drift import linear_cka, minibatch_hsic, residual_drift
from tl_lenses.hooks import resid_names
from tl_lenses.lenses.logit import LogitLens
from tl_lenses.lenses.tuned.eval import KLEvaluator
from tl_lenses.lenses.tuned.lens import TunedLens
from tl_lenses.readout.apply import apply_lens_to_cache


def byte_rows(n, pos, seed=0, high=256):
    return torch.randint(0, high, (n, pos), generator=torch.Generator().manual_seed(seed))


def random_tuned(model, seed=0, scale=0.1):
    lens = TunedLens.for_model(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lens.weight.copy_(scale * torch.randn(lens.weight.shape, generator=g))
        lens.bias.copy_(scale * torch.randn(lens.bias.shape, generator=g))
    return lens


# --- current vs next --------------------------------------------------------------------

def test_seen_before_matches_a_loop():
    tokens = byte_rows(3, 12, high=5)
    got = seen_before(tokens)
    for b in range(3):
        for p in range(12):
            expected = p + 1 < 12 and bool((tokens[b, :p + 1] == tokens[b, p + 1]).any())
            assert bool(got[b, p]) == expected


def test_common_ids_are_the_most_frequent():
    tokens = torch.tensor([[1, 1, 1, 2, 2, 3, 4, 4, 4, 4]])
    assert common_ids(tokens, 2, 6).nonzero().flatten().tolist() == [1, 4]
    assert common_ids(tokens, 10, 6).sum() == 4          # ids never seen are not common


def test_current_next_matches_the_shared_readout(tiny_model):
    tokens = byte_rows(5, 10, high=12)        # a small alphabet: copies happen
    lens = random_tuned(tiny_model)
    result = current_vs_next(tiny_model, tokens, {"logit": LogitLens(), "tuned": lens},
                             common=3, batch_size=2, chunk=7, progress=False)
    assert result.hook_names == resid_names(tiny_model)
    assert result.counts["current"] == 5 * 9
    assert result.counts["copy"] + result.counts["novel"] > 0
    _, cache = tiny_model.run_with_cache(tokens)
    positions = list(range(9))
    rare = ~common_ids(tokens, 3, tiny_model.cfg.d_vocab)
    copy = (seen_before(tokens) & rare[torch.roll(tokens, -1, 1)])[:, :-1]
    for key, lens_ in (("logit", LogitLens()), ("tuned", lens)):
        for group, target in (("current", tokens), ("next", "next")):
            ref = apply_lens_to_cache(tiny_model, cache, tokens, lens_, k=1, target=target,
                                      positions=positions)
            prob, rank = ref.target_prob.double(), ref.target_rank.double()
            s = result.stats[key]
            torch.testing.assert_close(s[f"{group}_prob"], prob.mean((1, 2)).float(),
                                       atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(s[f"{group}_rank"], rank.log().mean((1, 2)).exp().float(),
                                       atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(s[f"{group}_top1"], (rank == 1).double().mean((1, 2))
                                       .float())
            if group == "next" and copy.any():
                torch.testing.assert_close(s["copy_prob"], prob[:, copy].mean(-1).float(),
                                           atol=1e-5, rtol=1e-4)
    assert_no_hooks(tiny_model)


# --- drift --------------------------------------------------------------------------------

def test_linear_cka_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = torch.randn(40, 9, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.5 * x @ q) == pytest.approx(1.0)
    assert linear_cka(x, y) == pytest.approx(linear_cka(-2 * x @ q, y), rel=1e-9)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), rel=1e-12)
    assert 0 < linear_cka(x, y) < 1
    # the Gram (token-space) form equals the feature-space form
    hsic = minibatch_hsic(torch.stack([x[:, :6], y[:, :6]]).double())
    assert (hsic[0, 1] / (hsic[0, 0] * hsic[1, 1]).sqrt()).item() == pytest.approx(
        linear_cka(x[:, :6], y[:, :6]), rel=1e-9)


def test_drift_matches_cka_and_covariance_of_cached_residuals(tiny_model):
    tokens = byte_rows(4, 9)
    lens = random_tuned(tiny_model)
    result = residual_drift(tiny_model, tokens, tuned=lens, max_offset=1, cka_rows=64,
                            batch_size=4, progress=False)
    names = resid_names(tiny_model)
    _, cache = tiny_model.run_with_cache(tokens)
    acts = [cache[n][:, 1:].reshape(-1, cache[n].shape[-1]).double() for n in names]
    n = len(names)
    cka = torch.tensor([[linear_cka(acts[i], acts[j]) for j in range(n)] for i in range(n)])
    torch.testing.assert_close(result.cka, cka.float(), atol=1e-5, rtol=1e-5)
    covs = torch.stack([torch.cov(a.T, correction=0).flatten() for a in acts])
    covs = covs / covs.norm(dim=1, keepdim=True)
    torch.testing.assert_close(result.covariance, (covs @ covs.T).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.cka.diagonal(), torch.ones(n))
    assert result.transfer_kl.shape == (n - 1, n - 1)
    assert torch.isnan(result.transfer_kl[0, 2]) and not torch.isnan(result.transfer_kl[0, 1])
    assert_no_hooks(tiny_model)


def test_translator_transfer_diagonal_is_the_tuned_lens_kl(tiny_model):
    tokens = byte_rows(3, 8)
    lens = random_tuned(tiny_model, seed=1)
    result = residual_drift(tiny_model, tokens, tuned=lens, max_offset=None, drop_first=False,
                            progress=False)
    reference = KLEvaluator(tiny_model, tokens)
    torch.testing.assert_close(result.transfer_kl.diagonal(), reference.kl(lens),
                               atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(result.logit_kl, reference.kl(LogitLens()), atol=2e-5, rtol=1e-4)
    assert not torch.isnan(result.transfer_kl).any()
    cosine = result.translator_cosine
    torch.testing.assert_close(cosine.diagonal(), torch.ones(len(cosine)))


def test_drift_rejects_a_lens_that_misses_layers(tiny_model):
    lens = TunedLens.for_model(tiny_model, layers=[0])
    with pytest.raises(ValueError, match="tuned must cover"):
        residual_drift(tiny_model, byte_rows(2, 6), tuned=lens, progress=False)
    with pytest.raises(ValueError, match="cka_rows"):
        residual_drift(tiny_model, byte_rows(2, 6), cka_rows=0, progress=False)
