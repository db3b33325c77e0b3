"""Devices and dtypes: every method on every available device, half precision, and the
CUDA-only branches (compiled statistics, GPU chunk sizes, fused KL) exercised on the CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_no_hooks, assert_weights_unchanged, weights_snapshot

from tl_lenses import devices
from tl_lenses.attribution.core import dla
from tl_lenses.lenses.attribute.lens import attribute_lens
from tl_lenses.lenses.attribute.lre import LRE, estimate_lre
from tl_lenses.lenses.attribute.relations import Relation, Sample
from tl_lenses.lenses.logit import logit_lens
from tl_lenses.lenses.tuned.lens import TunedLens
from tl_lenses.lenses.tuned.train import train_tuned_lens
from tl_lenses.patchscopes.core import patchscope
from tl_lenses.patchscopes.sweep import patchscope_sweep
from tl_lenses.readout import _native as native
from tl_lenses.readout.apply import apply_lens
from tl_lenses.tiny import tiny_bridge, tiny_default, tiny_hooked, tiny_pair

PROMPT = "ab cd ef gh"
TOY = Relation("toy", ("{} =",), tuple(Sample(s, o) for s, o in
                                         zip("abcdefghijkl", "mnopqrstuvwx")))


def _build(backend, arch="llama-gqa", **kwargs):
    return (tiny_hooked if backend == "hooked" else tiny_bridge)(arch, **kwargs)


# ------------------------------------------------------------- models tl_lenses builds

@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_a_cuda_looking_default_does_not_leak(monkeypatch, backend):
    """TL's configs default to "cuda" when CUDA is available; our CPU models must say cpu."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = _build(backend)
    assert torch.device(model.cfg.device).type == "cpu"
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert devices.model_device(model) == torch.device("cpu")
    result = logit_lens(model, PROMPT)                   # tokens stay on the CPU
    assert result.entropy.device.type == "cpu"


def test_tiny_pair_on_a_device_and_dtype(device):
    hooked, bridge = tiny_pair("llama-gqa", device=device, dtype=torch.bfloat16)
    for model in (hooked, bridge):
        assert {p.device.type for p in model.parameters()} == {torch.device(device).type}
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert torch.device(model.cfg.device).type == torch.device(device).type
        with torch.no_grad():
            model(model.to_tokens(PROMPT))               # a plain forward works


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
@pytest.mark.parametrize("configured", ["cuda", "meta"])
def test_cfg_device_that_is_not_the_weights_fails_clearly(backend, configured):
    model = _build(backend)
    model.cfg.device = configured
    snapshot = weights_snapshot(model)
    with pytest.raises(ValueError, match=r"model\.cfg\.device is .* weights are on cpu"):
        logit_lens(model, PROMPT)
    with pytest.raises(ValueError, match=r"model\.cfg\.device"):
        dla(model, PROMPT, ("a", "b"))
    assert_weights_unchanged(model, snapshot)
    assert_no_hooks(model)


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_weights_on_several_devices_are_refused(backend):
    model = _build(backend)
    model.register_buffer("stray", torch.zeros(1, device="meta"))
    with pytest.raises(ValueError, match="model has parameters on several devices"):
        logit_lens(model, PROMPT)
    with pytest.raises(ValueError, match="target_model has parameters on several devices"):
        patchscope(_build(backend), PROMPT, PROMPT, source_layer=1, target_model=model)


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_a_model_changed_after_a_check_is_checked_again(backend):
    """The check's cache of a model's parameter dicts sees later moves and new modules."""
    model = _build(backend)
    assert devices.model_device(model) == torch.device("cpu")       # cached from here on
    block = model.blocks[0]
    block.stray = torch.nn.Linear(2, 2, device="meta")              # a new module, elsewhere
    with pytest.raises(ValueError, match="model has parameters on several devices"):
        logit_lens(model, PROMPT)
    del block.stray                                                 # leaves the tree: fine again
    assert devices.model_device(model) == torch.device("cpu")
    block.to("meta")                                                # a part moved
    with pytest.raises(ValueError, match="model has parameters on several devices"):
        dla(model, PROMPT, ("a", "b"))


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_a_whole_model_or_one_block_moved_after_a_check_is_seen(backend):
    """The remembered devices stand only while every block's sentinel tensor stays put."""
    model = _build(backend)
    assert devices.model_device(model) == torch.device("cpu")      # remembered from here on
    last = model.blocks[model.cfg.n_layers - 1]
    last.to("meta")
    with pytest.raises(ValueError, match="several devices"):
        devices.model_device(model)
    model.to("meta")
    with pytest.raises(ValueError, match="meta"):
        devices.model_device(model)


def test_meta_weights_are_refused():
    model = tiny_default().to("meta")
    with pytest.raises(ValueError, match="meta"):
        logit_lens(model, torch.tensor([[1, 2, 3]]))


# ------------------------------------------------------ core properties on each device

@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_core_properties_on_each_device(device, backend):
    """Per method, an exact identity, run on ``device`` with inputs given on the CPU."""
    model = _build(backend, device=device)
    dev = torch.device(device).type
    tokens = model.to_tokens(PROMPT).cpu()               # on the CPU on purpose
    with torch.no_grad():
        logits = model(tokens.to(model.cfg.device))
    # logit lens: the final row is the model's own distribution (KL 0, same top-1)
    lens = logit_lens(model, tokens, target="next")
    assert lens.entropy.device.type == dev and lens.top_ids.device.type == dev
    assert torch.equal(lens.top_ids[-1, ..., 0], logits.argmax(-1))
    assert lens.kl_to_final[-1].abs().max() < 1e-5
    # a fresh tuned lens is the logit lens
    tuned = apply_lens(model, tokens, TunedLens.for_model(model), target="next")
    assert torch.equal(tuned.top_ids, lens.top_ids)
    # DLA: the parts add up to the logit difference
    parts = dla(model, tokens, ("a", "b"), neurons=True, positions=None)
    torch.testing.assert_close(parts.values.sum(0), parts.logits, rtol=1e-4, atol=1e-4)
    diff = logits[..., model.to_single_token("a")] - logits[..., model.to_single_token("b")]
    torch.testing.assert_close(parts.logits[..., 0], diff.float(), rtol=1e-4, atol=1e-4)
    # patchscope: the identity patch reproduces the logits exactly
    result = patchscope(model, PROMPT, PROMPT, source_layer=2, max_new_tokens=2)
    assert result.logits.device.type == dev
    assert torch.equal(result.logits, logits[0, -1])
    sweep = patchscope_sweep(model, PROMPT, PROMPT, source_layers=[1, 2], target_layers=[1, 2],
                             pairs="same", k=3)
    assert torch.equal(sweep.top_ids[:, 0].cpu(), logits[0, -1].argmax().cpu().expand(2))
    # LRE: the identity LRE's attribute lens is the logit lens; an estimate is finite
    identity = attribute_lens(model, tokens, LRE.identity(model.cfg.d_model))
    assert torch.equal(identity.top_ids, lens.top_ids[..., :identity.top_ids.shape[-1]])
    lre = estimate_lre(model, TOY, 1, n=3)
    assert lre.weight.device.type == dev and torch.isfinite(lre.weight).all()
    # tuned-lens training runs and gives a finite lens on the device
    trained = train_tuned_lens(model, torch.randint(0, 256, (8, 16)), steps=2, batch_size=4,
                               ls_tokens=64, progress=False)
    assert trained.lens.bias.device.type == dev and torch.isfinite(trained.lens.bias).all()
    assert_no_hooks(model)


# ------------------------------------------------------------------ half precision

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_every_method_in_half_precision(backend, dtype):
    """Half-precision models run every method; the statistics come out in float32."""
    full = _build(backend)
    half = _build(backend, dtype=dtype)
    assert {p.dtype for p in half.parameters()} == {dtype}
    ref = logit_lens(full, PROMPT, target="next")
    lens = logit_lens(half, PROMPT, target="next")
    assert lens.entropy.dtype == lens.kl_to_final.dtype == lens.top_probs.dtype == torch.float32
    assert (lens.top_ids[..., 0] == ref.top_ids[..., 0]).float().mean() > 0.8
    assert torch.isfinite(lens.kl_to_final).all()
    parts = dla(half, PROMPT, ("a", "b"), neurons=True)
    assert parts.values.dtype == torch.float32 and torch.isfinite(parts.values).all()
    result = patchscope(half, PROMPT, PROMPT, source_layer=1, max_new_tokens=2)
    assert torch.isfinite(result.logits).all() and len(result.generated_ids) == 2
    sweep = patchscope_sweep(half, PROMPT, PROMPT, source_layers=[0, 1], target_layers=[1], k=2)
    assert torch.isfinite(sweep.top_probs).all()
    trained = train_tuned_lens(half, torch.randint(0, 256, (8, 16)), steps=2, batch_size=4,
                               ls_tokens=64, progress=False)
    assert torch.isfinite(trained.lens.weight).all()
    tuned = apply_lens(half, PROMPT, trained.lens)
    assert torch.isfinite(tuned.kl_to_final).all()
    lre = estimate_lre(half, TOY, 1, n=3)
    assert torch.isfinite(lre.weight).all()
    assert torch.isfinite(attribute_lens(half, PROMPT, lre).entropy).all()


# ------------------------------------------------- CUDA-only branches, run on the CPU

def _compile_as_eager(monkeypatch):
    """Make the CUDA branches run on the CPU: compile 'enabled', torch.compile the identity."""
    monkeypatch.setattr(devices, "compile_enabled", lambda device: True)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)


def test_compiled_wrapper_falls_back_to_eager_on_failure(monkeypatch, caplog):
    def broken(fn, **kwargs):
        raise RuntimeError("no triton here")

    monkeypatch.setattr(torch, "compile", broken)
    square = devices.compiled(lambda x: x * x)
    x = torch.arange(4.0)
    with caplog.at_level("WARNING", logger="tl_lenses"):
        assert torch.equal(square(x, force=True), x * x)
    assert "no triton here" in square.failed and "failed" in caplog.text
    assert torch.equal(square(x, force=True), x * x)     # stays eager, no second warning


def test_compile_is_off_on_the_cpu_and_by_env(monkeypatch):
    assert not devices.compile_enabled(torch.device("cpu"))
    monkeypatch.setenv("TL_LENSES_NO_COMPILE", "1")
    assert not devices.compile_enabled(torch.device("cuda"))


def test_gpu_chunk_size_fits_the_buffer_budget():
    from tl_lenses.readout.engine import DEFAULT_CHUNK, GPU_BUFFER_BYTES, auto_chunk_size

    assert auto_chunk_size(torch.device("cpu"), 49152, compiled=False) == DEFAULT_CHUNK
    for vocab in (257, 49152, 256_000):
        for compiled in (True, False):
            rows = auto_chunk_size(torch.device("cuda"), vocab, compiled=compiled)
            buffers = 3 if compiled else 4
            assert rows >= 64 and rows * vocab * 4 * buffers <= GPU_BUFFER_BYTES or rows == 64
    assert auto_chunk_size(torch.device("cuda"), 49152, compiled=True) >= 1024


def test_the_cuda_readout_branch_equals_the_eager_one(monkeypatch, tiny_model):
    """The compiled-statistics branch (taken on CUDA), here compiled to eager on the CPU."""
    tokens = tiny_model.to_tokens(["hello world", "abcdefgh"])
    eager = logit_lens(tiny_model, tokens, target="next", incl_mid=True, fused=False)
    _compile_as_eager(monkeypatch)
    monkeypatch.setattr(native, "row_stats_kernel", lambda: None)   # as on a GPU: no C kernel
    from tl_lenses.readout import engine

    calls = []
    real = engine.stats_backend
    monkeypatch.setattr(engine, "stats_backend",
                        lambda *a: calls.append(real(*a)) or calls[-1])
    gpu = logit_lens(tiny_model, tokens, target="next", incl_mid=True, chunk_size=7)
    assert calls == ["compiled"]
    assert torch.equal(gpu.top_ids, eager.top_ids)
    assert torch.equal(gpu.target_rank, eager.target_rank)
    for name in ("top_probs", "entropy", "kl_to_final", "target_prob"):
        torch.testing.assert_close(getattr(gpu, name), getattr(eager, name),
                                   rtol=1e-5, atol=1e-5, equal_nan=True)


def test_the_cuda_training_branch_matches_the_cpu_one(monkeypatch):
    """The fused KL gradient (compiled on CUDA) gives the CPU path's gradient and loss."""
    from tl_lenses.lenses.tuned import train

    model = tiny_default("gpt2")
    lens = TunedLens.for_model(model)
    with torch.no_grad():
        lens.weight.normal_(0, 0.05)
        lens.bias.normal_(0, 0.05)
    tokens = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    unembed = train.Unembed.from_model(model)
    W = unembed.W_U.detach().to(torch.bfloat16)
    cpu_kl = train.kl_backward(model, lens, unembed, W, tokens, 10**8)
    cpu_grads = [p.grad.clone() for p in lens.parameters()]
    lens.zero_grad()
    _compile_as_eager(monkeypatch)
    gpu_kl = train.kl_backward(model, lens, unembed, W, tokens, 10**8)
    torch.testing.assert_close(gpu_kl, cpu_kl, rtol=2e-2, atol=2e-3)
    for got, want in zip((p.grad for p in lens.parameters()), cpu_grads):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-3)


@pytest.mark.slow
def test_compiled_statistics_equal_the_eager_ones_on_the_cpu():
    """torch.compile really compiling the statistics (Inductor's C++ backend; ~1-2 min)."""
    from tl_lenses.readout._row_stats import compiled_sums, eager_sums

    logits = torch.randn(6, 1000) * 4
    chosen = logits[:, 7].clone()
    got = compiled_sums(logits, chosen, force=True)
    assert compiled_sums.failed is None
    scratch = torch.empty_like(logits)
    sum_exp, e_z, n_above = eager_sums(logits, logits.amax(-1, keepdim=True), chosen[:, None],
                                       scratch)
    torch.testing.assert_close(got[1], logits.amax(-1))
    torch.testing.assert_close(got[2], sum_exp)
    torch.testing.assert_close(got[3], e_z, rtol=1e-4, atol=1e-3)
    assert torch.equal(got[4].float(), n_above.float())


# ------------------------------------------------------------------ the GPU check script

def test_gpu_check_smoke_correctness_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py --cpu-smoke: the correctness part passes on the CPU."""
    import json
    import runpy

    namespace = runpy.run_path("benchmarks/gpu_check.py", run_name="gpu_check")
    path = tmp_path / "gpu_check.json"
    code = namespace["main"](["--cpu-smoke", "--correctness-only", "--json", str(path)])
    out = json.loads(path.read_text())
    failed = {k: v["detail"] for k, v in out["correctness"].items() if not v["ok"]}
    assert code == 0 and not failed, failed


def test_str_tokens_equal_tls_own(tiny_model):
    """The batched decode gives TL's to_str_tokens, row by row (repeats and padding too)."""
    from tl_lenses.inputs import str_tokens

    tokens = tiny_model.to_tokens(["héllo wörld, hello", "ab"], padding_side="right")
    tokens = torch.cat([tokens, torch.tensor([[256, 0], [255, 128]])], dim=1)
    assert str_tokens(tiny_model, tokens) == [tiny_model.to_str_tokens(row) for row in tokens]


def test_a_sentinel_removed_behind_torchs_back_is_walked_again():
    """A parameter dict edited directly (no registration hook fires) is read afresh."""
    model = tiny_default()
    assert devices.model_device(model) == torch.device("cpu")
    first, key, _ = devices._HOLDERS[model][2][0]          # the first sentinel
    saved, first[key] = first[key], None
    try:
        assert devices.model_device(model) == torch.device("cpu")
    finally:
        first[key] = saved
    assert devices.model_device(model) == torch.device("cpu")
