"""The objectives and retrained-decoder analyses, on tiny random models (both backends)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_no_hooks, assert_weights_unchanged, weights_snapshot

from tl_lenses.analysis._fit import OBJECTIVES, FitConfig, Translators, fit, objective_loss
from tl_lenses.analysis._stream import frozen_unembed, spearman
from tl_lenses.analysis.objectives import compare_objectives, rank_correlations
from tl_lenses.analysis.retrained import retrained_decoders
from tl_lenses.data import generated_tokens
from tl_lenses.hooks import resid_names
from tl_lenses.lenses.logit import LogitLens
from tl_lenses.lenses.tuned.eval import evaluate_lenses
from tl_lenses.lenses.tuned.lens import TunedLens
from tl_lenses.tiny import tiny_default, tiny_hooked


def byte_rows(n, pos, seed=0):
    return torch.randint(0, 256, (n, pos), generator=torch.Generator().manual_seed(seed))


def test_spearman_matches_ranks_computed_by_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=20), rng.normal(size=20)
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    expected = np.corrcoef(rx, ry)[0, 1]
    assert spearman(torch.tensor(x), torch.tensor(y)) == pytest.approx(expected, abs=1e-12)
    # ties take their average rank: ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4]
    got = spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 2.5, 2.5, 4]))
    assert got == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1)


def test_objective_losses_match_torch_references(tiny_model):
    unembed = frozen_unembed(tiny_model)
    g = torch.Generator().manual_seed(1)
    h, final = torch.randn(7, 32, generator=g), torch.randn(7, 32, generator=g)
    ids = torch.randint(0, 257, (7,), generator=g)
    logits, final_logits = unembed(h), unembed(final)
    reference = {
        "kl": F.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(final_logits, -1),
                       log_target=True, reduction="batchmean"),
        "mse_logits": F.mse_loss(logits, final_logits),
        "mse_resid": F.mse_loss(h, final),
        "cosine": 1 - ((h * final).sum(-1) / (h.norm(dim=-1) * final.norm(dim=-1))).mean(),
        "ce": -torch.log_softmax(logits, -1)[torch.arange(7), ids].mean(),
    }
    for objective in OBJECTIVES:
        got = objective_loss(objective, h, final, ids, unembed)
        torch.testing.assert_close(got, reference[objective], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="objective"):
        objective_loss("l1", h, final, ids, unembed)


@pytest.mark.parametrize("objective", ["kl", "mse_resid", "cosine", "ce"])
def test_fit_lowers_its_own_objective_and_leaves_the_model_alone(objective):
    model = tiny_default("gpt2")
    snapshot = weights_snapshot(model)
    lens = TunedLens.for_model(model)
    tokens = byte_rows(8, 16)
    losses = fit(model, tokens, lens, lens.hook_names, objective,
                 FitConfig(steps=40, lr=1e-2, batch_size=8, progress=False))
    assert losses[-1] < losses[0]
    assert_weights_unchanged(model, snapshot)
    assert_no_hooks(model)
    assert all(p.grad is None for p in model.parameters())


def test_compare_objectives_metrics_match_evaluate_lenses(tiny_model):
    train, held = byte_rows(8, 12), byte_rows(3, 12, seed=1)
    result = compare_objectives(tiny_model, train, held, objectives=("kl", "cosine"),
                                kinds=("bias", "affine"), steps=3, progress=False)
    assert set(result.metrics) == {"logit lens", "kl / bias", "cosine / bias", "kl / affine",
                                   "cosine / affine"}
    assert result.hook_names == resid_names(tiny_model)[:-1]
    # An independent computation: the shared readout (C kernel or eager torch) over a cache.
    lenses = {key: result.lenses.get(key, LogitLens()) for key in ("logit lens", "kl / affine")}
    reference = evaluate_lenses(tiny_model, held, lenses)
    for key, ref in zip(lenses, reference.metrics.values()):
        mine = result.metrics[key]
        torch.testing.assert_close(mine["kl"], ref.kl[:-1], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(mine["ce"], ref.cross_entropy[:-1], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(mine["top1_agreement"], ref.top1_agreement[:-1])
    rho = result.rank_correlation["kl / affine"]
    torch.testing.assert_close(rho, rho.T, equal_nan=True)   # NaN: a constant metric
    torch.testing.assert_close(rho.diagonal(), torch.ones(len(rho)))
    header, rows = result.summary()
    assert len(rows) == 5 and len(header) == len(rows[0])


def test_rank_correlations_turn_agreement_into_distance():
    kl = torch.tensor([3.0, 2.0, 1.0, 0.5])
    metrics = {"kl": kl, "ce": kl + 1, "top1_agreement": -kl, "top1_accuracy": -kl,
               "mse_logits": kl, "mse_resid": kl.flip(0), "cosine_distance": kl}
    rho = rank_correlations(metrics)
    assert rho[0, 2] == pytest.approx(1.0)              # 1 - agreement ranks like KL
    assert rho[0, 5] == pytest.approx(-1.0)


def test_compare_objectives_rejects_unknown_objective(tiny_model):
    tokens = byte_rows(2, 8)
    with pytest.raises(ValueError, match="objectives"):
        compare_objectives(tiny_model, tokens, tokens, objectives=("hinge",), progress=False)
    with pytest.raises(ValueError, match="held_out"):
        compare_objectives(tiny_model, tokens, tokens[:, :1], progress=False)


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_decoder_retrained_at_the_final_layer_recovers_the_unembedding(backend):
    from tl_lenses.tiny import tiny_bridge

    # Trained on text sampled from the model itself (temperature 1), the next token's
    # distribution *is* the model's, so the cross-entropy's minimiser among decoders
    # h -> unembed(h + A h + b) is the model's own unembedding (A = 0, b = 0). Two things make
    # that visible in a test: the random model's predictions are made confident like a
    # trained model's (a scaled unembedding; at scale 1 they are nearly uniform, so samples
    # carry almost no signal and greedy labels are decided by ~0.01-nat margins, which a
    # more confident decoder fits better than the model does), and there are ~14k tokens
    # for its 1056 parameters.
    make = tiny_hooked if backend == "hooked" else tiny_bridge
    model = make("llama-gqa", unembed_scale=30.0)
    tokens = generated_tokens(model, 2048 + 64, 8, temperature=1.0, seed=3, batch_size=512)
    train, held = tokens[:2048], tokens[2048:]
    n, d = model.cfg.n_layers, model.cfg.d_model
    decoder = Translators([resid_names(model)[-1]], d, name="retrained")
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        decoder.weight[0] = rotation - torch.eye(d)         # start far away: h -> Q h
    before = retrained_decoders(model, train, held, layers=[n], steps=1, lr=1e-12,
                                decoder=_copy(decoder), progress=False)
    result = retrained_decoders(model, train, held, layers=[n], decoder=decoder,
                                steps=300, lr=5e-2, batch_size=128, progress=False)
    start, end = before.metrics["retrained"], result.metrics["retrained"]
    assert start["top1_agreement"][-1] < 0.1 and start["kl"][-1] > 3
    assert end["top1_agreement"][-1] > 0.8 and end["kl"][-1] < 0.1
    # its held-out cross-entropy on the model's samples comes down to the model's own
    model_ce = result.metrics["logit lens"]["ce"][-1]
    assert abs(end["ce"][-1] - model_ce) < 0.1 < start["ce"][-1] - model_ce
    # at the final layer, the logit lens *is* the model: agreement 1, KL 0
    assert result.metrics["logit lens"]["top1_agreement"][-1] == 1
    assert result.metrics["logit lens"]["kl"][-1].abs() < 1e-5


def _copy(decoder: Translators) -> Translators:
    clone = Translators(decoder.hook_names, decoder.bias.shape[-1], name=decoder.name)
    clone.load_state_dict(decoder.state_dict())
    return clone


def test_retrained_logit_rows_match_evaluate_lenses(tiny_model):
    train, held = byte_rows(6, 10), byte_rows(3, 10, seed=2)
    result = retrained_decoders(tiny_model, train, held, steps=2, progress=False)
    assert result.hook_names == resid_names(tiny_model)
    reference = evaluate_lenses(tiny_model, held).metrics["logit"]
    torch.testing.assert_close(result.metrics["logit lens"]["ce"], reference.cross_entropy,
                               atol=2e-5, rtol=1e-4)
    # the tuned lens trained here passes the final residual through: same final row
    torch.testing.assert_close(result.metrics["tuned lens"]["ce"][-1], reference.cross_entropy[-1],
                               atol=2e-5, rtol=1e-4)
    header, rows = result.table()
    assert len(rows) == tiny_model.cfg.n_layers + 1 and len(header) == len(rows[0]) == 7
    with pytest.raises(ValueError, match="layers"):
        retrained_decoders(tiny_model, train, held, layers=[99], progress=False)
