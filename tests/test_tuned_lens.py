"""Tuned lens: identity at init, translation, readouts, least squares, training, files, data."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import assert_no_hooks, assert_weights_unchanged, weights_snapshot
from tl_lenses.data import pack_tokens, read_text_files, split_rows, token_split
from tl_lenses.hooks import final_resid_name, resid_names
from tl_lenses.lenses.logit import LogitLens
from tl_lenses.lenses.tuned.eval import evaluate_lenses
from tl_lenses.lenses.tuned.io import (
    CONFIG,
    WEIGHTS,
    import_tuned_lens_library,
    load_tuned_lens,
    save_tuned_lens,
)
from tl_lenses.lenses.tuned.lens import TunedLens
from tl_lenses.lenses.tuned.train import Moments, train_tuned_lens
from tl_lenses.models import bridge_from_hf, hooked_from_hf, llama_config
from tl_lenses.readout.apply import LensCollector, apply_lens, apply_lens_to_cache
from tl_lenses.readout.lens import Lens
from tl_lenses.readout.unembed import Unembed
from tl_lenses.tiny import byte_tokenizer, gpt2_config, tiny_default, tiny_hf_model

PROMPT = "The cat sat on the mat."


def random_lens(model, kind="affine", seed=0, scale=0.1) -> TunedLens:
    lens = TunedLens.for_model(model, kind=kind)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=generator))
    return lens


def sharp_model(arch: str, backend: str, scale: float = 6.0):
    """A tiny model with a peaked output distribution (so KL between layers is large)."""
    hf = tiny_hf_model(arch)
    with torch.no_grad():
        hf.lm_head.weight.mul_(scale)
    if backend == "bridge":
        return bridge_from_hf(hf, byte_tokenizer(), "GPT2LMHeadModel" if arch == "gpt2"
                              else "LlamaForCausalLM")
    cfg = gpt2_config(hf.config) if arch == "gpt2" else llama_config(hf.config)
    return hooked_from_hf(hf, byte_tokenizer(), cfg)


# --- the lens itself -------------------------------------------------------------------------

def test_fresh_lens_is_exactly_the_logit_lens(tiny_model):
    lens = TunedLens.for_model(tiny_model)
    assert isinstance(lens, Lens)
    tuned, logit = apply_lens(tiny_model, PROMPT, lens), apply_lens(tiny_model, PROMPT)
    assert tuned.hook_names == logit.hook_names == resid_names(tiny_model)
    for field in ("top_ids", "top_logits", "entropy", "kl_to_final", "target_rank"):
        assert torch.equal(getattr(tuned, field), getattr(logit, field)), field


def test_translate_is_residual_affine_per_hook_name(tiny_model):
    lens = random_lens(tiny_model)
    h = torch.randn(2, 5, tiny_model.cfg.d_model)
    for i, name in enumerate(lens.hook_names):
        expected = h + h @ lens.weight[i].T + lens.bias[i]
        torch.testing.assert_close(lens.translate(h, name), expected)
    stacked = torch.stack([h.reshape(-1, h.shape[-1])] * len(lens.hook_names))
    by_layer = torch.stack([lens.translate(h, n).reshape(-1, h.shape[-1])
                            for n in lens.hook_names])
    torch.testing.assert_close(lens.translate_stack(stacked), by_layer)
    assert torch.equal(lens.translate(h, final_resid_name(tiny_model)), h)


def test_variants_and_uncovered_hook_names(tiny_model):
    bias_only = random_lens(tiny_model, kind="bias")
    assert bias_only.weight is None and bias_only.name == "tuned lens (bias only)"
    h = torch.randn(3, tiny_model.cfg.d_model)
    torch.testing.assert_close(bias_only.translate(h, "blocks.1.hook_resid_pre"),
                               h + bias_only.bias[1])
    subset = TunedLens.for_model(tiny_model, layers=[2, 0])
    assert subset.hook_names == ["blocks.0.hook_resid_pre", "blocks.2.hook_resid_pre"]
    with pytest.raises(ValueError, match="no translator"):
        subset.translate(h, "blocks.1.hook_resid_pre")
    mids = TunedLens.for_model(tiny_model, hook_names=["blocks.1.hook_resid_mid"])
    assert mids.hook_names == ["blocks.1.hook_resid_mid"]


def test_bad_lens_arguments(tiny_model):
    with pytest.raises(ValueError, match="kind"):
        TunedLens.for_model(tiny_model, kind="linear")
    with pytest.raises(ValueError, match="layers"):
        TunedLens.for_model(tiny_model, layers=[99])
    with pytest.raises(ValueError, match="not both"):
        TunedLens.for_model(tiny_model, layers=[0], hook_names=["blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match="hook_names"):
        TunedLens.for_model(tiny_model, hook_names=["blocks.0.attn.hook_pattern"])
    with pytest.raises(ValueError, match="at least one"):
        TunedLens.for_model(tiny_model, hook_names=[final_resid_name(tiny_model)])
    with pytest.raises(TypeError):
        TunedLens.for_model(object())


def test_readouts_agree_prompt_cache_hooks(tiny_model):
    """apply_lens, apply_lens_to_cache and LensCollector give one answer, = a manual decode."""
    lens = random_lens(tiny_model, scale=0.3)
    snapshot = weights_snapshot(tiny_model)
    direct = apply_lens(tiny_model, PROMPT, lens, k=3)
    tokens = tiny_model.to_tokens(PROMPT)
    _, cache = tiny_model.run_with_cache(tokens)
    from_cache = apply_lens_to_cache(tiny_model, cache, tokens, lens, k=3)
    collector = LensCollector(tiny_model, lens)
    tiny_model.run_with_hooks(tokens, fwd_hooks=collector.fwd_hooks())
    from_hooks = collector.result(tokens, k=3)
    for other in (from_cache, from_hooks):
        assert torch.equal(other.top_ids, direct.top_ids)
        torch.testing.assert_close(other.kl_to_final, direct.kl_to_final)
    unembed = Unembed.from_model(tiny_model)
    name = lens.hook_names[1]
    manual = unembed(lens.translate(cache[name], name)).argmax(-1)
    assert torch.equal(direct.top_ids[1, ..., 0], manual)
    assert not torch.equal(direct.top_ids, apply_lens(tiny_model, PROMPT, k=3).top_ids)
    assert_weights_unchanged(tiny_model, snapshot)
    assert_no_hooks(tiny_model)


# --- least squares and training ---------------------------------------------------------------

def test_least_squares_recovers_a_known_affine_map():
    torch.manual_seed(0)
    n_layers, d, rows = 3, 8, 400
    A = 0.3 * torch.randn(n_layers, d, d)
    b = torch.randn(n_layers, d)
    h = torch.randn(n_layers, rows, d)
    y = h + torch.bmm(h, A.transpose(1, 2)) + b[:, None]
    moments = Moments.zeros(n_layers, d)
    x = torch.cat([h, torch.ones(n_layers, rows, 1)], -1)
    moments.add(x[:, :250], y[:, :250])
    moments.add(x[:, 250:], y[:, 250:])           # accumulation = one big batch
    A_hat, b_hat = moments.solve(ridge=0.0)
    torch.testing.assert_close(A_hat, A, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b_hat, b, atol=1e-4, rtol=1e-4)
    shrunk, _ = moments.solve(ridge=1e3)          # a huge ridge pulls towards the identity
    assert shrunk.abs().max() < 0.01 * A.abs().max()
    only_bias = Moments.zeros(n_layers, d)
    only_bias.add(x, h + b[:, None])
    torch.testing.assert_close(only_bias.solve_bias(0.0), b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_training_lowers_held_out_kl(backend):
    """Tiny GPT-2 blocks add nearly linear updates: an affine lens can undo nearly all drift."""
    model = sharp_model("gpt2", backend)
    snapshot = weights_snapshot(model)
    generator = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (48, 32), generator=generator)
    held = torch.randint(0, 256, (8, 32), generator=generator)
    fast = train_tuned_lens(model, train, steps=3, ls_tokens=1024, progress=False)
    ref = train_tuned_lens(model, train, recipe="reference", steps=12, progress=False)
    ev = evaluate_lenses(model, held, {"logit": LogitLens(), "fast": fast.lens,
                                       "reference": ref.lens})
    logit_kl = ev.metrics["logit"].mean_kl
    assert logit_kl > 0.05
    assert ev.metrics["fast"].mean_kl < 0.1 * logit_kl
    assert ev.metrics["reference"].mean_kl < 0.9 * logit_kl
    assert fast.steps == 3 and len(fast.losses) == 3 and fast.tokens_seen == 3 * 8 * 32
    assert_weights_unchanged(model, snapshot)
    assert_no_hooks(model)


def test_reference_recipe_uses_the_libraries_optimizer_settings():
    """tuned-lens 0.2.0: SGD(lr=lr_scale * (1 - momentum), momentum 0.9, Nesterov, wd 1e-3)
    with lr_scale 1; the optimizer's lr must not be scaled by (1 - momentum) twice."""
    from tl_lenses.lenses.tuned.train import TrainConfig, _optimizer

    cfg = TrainConfig(recipe="reference").resolved()
    group = _optimizer(TunedLens.for_model(tiny_default("gpt2")), cfg).param_groups[0]
    lr_scale, momentum = 1.0, 0.9
    assert group["lr"] == pytest.approx(lr_scale * (1 - momentum))
    assert group["momentum"] == momentum and group["nesterov"]
    assert group["weight_decay"] == 1e-3 and cfg.clip == 1.0


def test_training_is_reproducible_and_resumable(tmp_path):
    model = tiny_default("gpt2")
    tokens = torch.randint(0, 256, (24, 16), generator=torch.Generator().manual_seed(1))
    kw = dict(recipe="reference", batch_size=4, progress=False, seed=3, steps=4,
              checkpoint_every=2)
    one = train_tuned_lens(model, tokens, **kw).lens
    two = train_tuned_lens(model, tokens, **kw).lens
    assert torch.equal(one.weight, two.weight) and one.weight.abs().sum() > 0

    class Interrupt(Exception):
        pass

    def stop_at_2(step, seconds, lens):
        if step == 2:
            raise Interrupt

    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(Interrupt):
        train_tuned_lens(model, tokens, checkpoint_dir=ckpt, callback=stop_at_2, **kw)
    resumed = train_tuned_lens(model, tokens, checkpoint_dir=ckpt, resume=True, **kw)
    assert resumed.steps == 4 and len(resumed.losses) == 4
    torch.testing.assert_close(resumed.lens.weight, one.weight)


def test_bad_training_input():
    model = tiny_default("gpt2")
    # float tokens: the signature's Int[...] check (TypeError) or the function's ValueError
    with pytest.raises((TypeError, ValueError), match="tokens"):
        train_tuned_lens(model, torch.randn(4, 8))
    with pytest.raises(ValueError, match="n_ctx"):
        train_tuned_lens(model, torch.zeros(2, model.cfg.n_ctx + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="recipe"):
        train_tuned_lens(model, torch.zeros(4, 8, dtype=torch.long), recipe="adam")
    with pytest.raises(TypeError):
        train_tuned_lens(model, torch.zeros(4, 8, dtype=torch.long), lens=LogitLens())


# --- files -----------------------------------------------------------------------------------

def test_save_load_round_trip_is_exact(tmp_path, tiny_models):
    hooked, bridge = tiny_models
    lens = random_lens(hooked)
    folder = save_tuned_lens(lens, tmp_path / "lens", training={"steps": 3})
    for model in (hooked, bridge):             # same weights on the other backend load too
        loaded = load_tuned_lens(folder, model)
        assert loaded.hook_names == lens.hook_names and loaded.kind == lens.kind
        assert torch.equal(loaded.weight, lens.weight) and torch.equal(loaded.bias, lens.bias)
    bias_only = random_lens(hooked, kind="bias")
    loaded = load_tuned_lens(save_tuned_lens(bias_only, tmp_path / "bias"), hooked)
    assert loaded.weight is None and torch.equal(loaded.bias, bias_only.bias)


def test_loading_for_another_model_raises(tmp_path):
    lens = random_lens(tiny_default("gpt2"))
    folder = save_tuned_lens(lens, tmp_path / "lens")
    with pytest.raises(ValueError, match="different model"):
        load_tuned_lens(folder, tiny_default("gpt2", seed=1))     # same shape, other W_U
    with pytest.raises(ValueError, match="different model"):
        load_tuned_lens(folder, tiny_default("gpt2", n_layers=2))


def test_corrupt_or_truncated_files_raise(tmp_path):
    model = tiny_default("gpt2")
    folder = save_tuned_lens(random_lens(model), tmp_path / "lens")
    weights = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_tuned_lens(folder, model)
    flipped = bytearray(weights)
    flipped[-5] ^= 0xFF
    (folder / WEIGHTS).write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_tuned_lens(folder, model)
    (folder / WEIGHTS).write_bytes(weights)
    config = (folder / CONFIG).read_text()
    (folder / CONFIG).write_text(config[:40])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_tuned_lens(folder, model)
    with pytest.raises(FileNotFoundError):
        load_tuned_lens(tmp_path / "nowhere", model)


def test_import_tuned_lens_library_format(tmp_path, tiny_model):
    """A folder as the tuned-lens library writes it: nn.Linear translators per HF layer."""
    d, n = tiny_model.cfg.d_model, tiny_model.cfg.n_layers
    torch.manual_seed(0)
    translators = torch.nn.ModuleList([torch.nn.Linear(d, d) for _ in range(n)])
    folder = tmp_path / "tuned-lens"
    folder.mkdir()
    torch.save(translators.state_dict(), folder / "params.pt")
    (folder / "config.json").write_text(json.dumps({
        "base_model_name_or_path": "tiny", "d_model": d, "num_hidden_layers": n,
        "bias": True, "base_model_revision": None, "unembed_hash": None,
        "lens_type": "linear_tuned_lens"}))
    lens = import_tuned_lens_library(folder, tiny_model)
    tokens = tiny_model.to_tokens(PROMPT)
    _, cache = tiny_model.run_with_cache(tokens)
    with torch.no_grad():
        for i in range(n):      # their idx i reads hidden_states[i] = TL's resid_pre of block i
            h = cache[f"blocks.{i}.hook_resid_pre"]
            torch.testing.assert_close(lens.translate(h, f"blocks.{i}.hook_resid_pre"),
                                       h + translators[i](h))
    (folder / "config.json").write_text(json.dumps({"d_model": d + 1, "num_hidden_layers": n}))
    with pytest.raises(ValueError, match="d_model"):
        import_tuned_lens_library(folder, tiny_model)
    (folder / "params.pt").write_bytes(b"not a zip")
    (folder / "config.json").write_text(json.dumps({"d_model": d, "num_hidden_layers": n}))
    with pytest.raises(ValueError, match="corrupt"):
        import_tuned_lens_library(folder, tiny_model)


# --- data and evaluation ---------------------------------------------------------------------

def test_packing_and_split():
    docs = [torch.arange(5), torch.arange(10, 17)]
    rows = pack_tokens(docs, 4, separator=99)
    assert rows.tolist() == [[0, 1, 2, 3], [4, 99, 10, 11], [12, 13, 14, 15]]
    split = split_rows(torch.arange(40).reshape(10, 4), held_out=0.2, seed=0)
    assert split.held_out.shape == (2, 4) and split.train.shape == (8, 4)
    seen = torch.cat([split.train, split.held_out]).flatten().sort().values
    assert torch.equal(seen, torch.arange(40))
    again = split_rows(torch.arange(40).reshape(10, 4), held_out=0.2, seed=0)
    assert torch.equal(again.held_out, split.held_out)
    with pytest.raises(ValueError, match="seq_len"):
        pack_tokens(docs, 1)
    with pytest.raises(ValueError, match="at least 2"):
        split_rows(torch.zeros(1, 4, dtype=torch.long), 0.5, 0)


def test_token_sources(tmp_path):
    model = tiny_default("gpt2")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("hello world " * 20)
    (tmp_path / "a" / "two.rst").write_text("second file " * 20)
    (tmp_path / "a" / "skip.bin").write_bytes(b"\x00\x01")
    assert len(read_text_files(tmp_path / "a")) == 2
    assert len(read_text_files(str(tmp_path / "a" / "*.txt"))) == 1
    from_files = token_split(model, paths=[tmp_path / "a"], seq_len=16)
    from_texts = token_split(model, texts=read_text_files(tmp_path / "a"), seq_len=16)
    assert torch.equal(from_files.train, from_texts.train)
    assert from_files.n_tokens == 16 * ((240 + 1 + 240 + 1) // 16)   # bytes + separators
    from_tokens = token_split(model, tokens=torch.arange(64).reshape(2, 32), seq_len=16)
    assert from_tokens.n_tokens == 64
    gen_a = token_split(model, generate=4, seq_len=8, seed=5)
    gen_b = token_split(model, generate=4, seq_len=8, seed=5)
    assert torch.equal(gen_a.train, gen_b.train) and gen_a.train.shape[1] == 8
    with pytest.raises(FileNotFoundError):
        read_text_files(tmp_path / "missing")
    with pytest.raises(ValueError, match="exactly one"):
        token_split(model, texts=["a"], generate=2)
    with pytest.raises(TypeError):
        token_split(model, texts="one string")
    with pytest.raises(ValueError, match="held_out"):
        token_split(model, generate=4, seq_len=8, held_out=1.5)


def test_evaluation_matches_independent_references(tiny_model, tmp_path):
    tokens = torch.randint(32, 127, (3, 12), generator=torch.Generator().manual_seed(0))  # ASCII
    lens = random_lens(tiny_model, scale=0.2)
    ev = evaluate_lenses(tiny_model, tokens, {"logit": LogitLens(), "tuned": lens},
                         batch_size=2)
    logit = ev.metrics["logit"]
    # Final row: cross-entropy = the model's own loss; agreement with itself = 1; KL = 0.
    loss = tiny_model(tokens, return_type="loss")
    torch.testing.assert_close(logit.cross_entropy[-1], loss.detach().float(), rtol=1e-4,
                               atol=1e-4)
    assert logit.top1_agreement[-1] == 1 and abs(float(logit.kl[-1])) < 1e-5
    reference = apply_lens(tiny_model, tokens, positions=list(range(11)))
    torch.testing.assert_close(logit.kl, reference.kl_to_final.mean((1, 2)))
    assert logit.n_bytes == 3 * 11                     # byte tokenizer, ASCII: 1 byte a token
    torch.testing.assert_close(logit.kl_bpb, logit.kl / torch.log(torch.tensor(2.0)))
    assert not torch.allclose(ev.metrics["tuned"].kl[:-1], logit.kl[:-1])
    png = ev.save_png(tmp_path / "kl.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    html = ev.to_html()
    assert "<td>tuned</td>" in html and "data:image/png;base64" in html


def test_command_line_train_then_evaluate(tmp_path, capsys):
    import argparse

    from tl_lenses.lenses.tuned import cli as command

    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers(dest="command"))
    data = ["--model", "tiny-gpt2", "--generate", "6", "--seq-len", "16"]
    out = str(tmp_path / "lens")
    args = parser.parse_args(["train-tuned", *data, "--out", out, "--steps", "2",
                              "--ls-tokens", "64", "--batch-size", "2"])
    assert args.func(args) == 0
    args = parser.parse_args(["eval-lens", out, *data, "--out", str(tmp_path / "e.html"),
                              "--png", str(tmp_path / "e.png")])
    assert args.func(args) == 0
    assert "mean KL" in capsys.readouterr().out
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    args = parser.parse_args(["train-tuned", "--model", "tiny-gpt2", "--out", out])
    with pytest.raises(ValueError, match="--text"):
        args.func(args)


TEXT = ("The tuned lens learns, for every layer, an affine map into the basis of the last layer. "
        "Python is a programming language that lets you work quickly and integrate systems "
        "more effectively. The standard library offers modules for files, networking, text "
        "processing and much more, and the documentation describes each of them in detail. ")


@pytest.mark.slow
def test_warm_start_on_the_embedded_model(smollm):
    """A least-squares fit on ~500 tokens already cuts SmolLM's held-out KL several-fold."""
    from tl_lenses.lenses.tuned.eval import KLEvaluator

    split = token_split(smollm, texts=[TEXT * 8], seq_len=64, held_out=0.2, seed=0)
    lens = train_tuned_lens(smollm, split.train, steps=0, ls_tokens=512, batch_size=8,
                            progress=False).lens
    evaluator = KLEvaluator(smollm, split.held_out[:1])
    logit, tuned = evaluator.kl(LogitLens()), evaluator.kl(lens)
    assert torch.equal(evaluator.kl(TunedLens.for_model(smollm)), logit)
    assert tuned.mean() < 0.5 * logit.mean()


def test_huggingface_dataset_source():
    datasets = pytest.importorskip("datasets")
    model = tiny_default("gpt2")
    texts = ["first document " * 10, "", "second one " * 10]
    dataset = datasets.Dataset.from_dict({"text": texts})
    from_dataset = token_split(model, dataset=dataset, seq_len=16)
    from_texts = token_split(model, texts=[t for t in texts if t], seq_len=16)
    assert torch.equal(from_dataset.train, from_texts.train)
    with pytest.raises(ValueError, match="column"):
        from tl_lenses.data import dataset_texts
        dataset_texts(dataset, column="body")
