"""Tuned-lens training on a model spread over several devices (one device here: faked).

This machine has one device, so the spread is faked where the device check reads it
(``devices._devices``): the choice of the lens's device, the refusals, and that every
residual is moved there with ``.to``. ``tiny_spread`` over ("cpu", "cpu") runs TL's own split
machinery (HookedTransformer ``n_devices``, accelerate's dispatch hooks on a Bridge) on the
CPU; ``benchmarks/gpu_check.py`` runs it over two GPUs.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tl_lenses import devices
from tl_lenses._compat import HAS_HOOKED
from tl_lenses.lenses.logit import logit_lens
from tl_lenses.lenses.tuned import kl
from tl_lenses.lenses.tuned.lens import TunedLens
from tl_lenses.lenses.tuned.train import train_tuned_lens
from tl_lenses.readout.unembed import Unembed
from tl_lenses.tiny import tiny_bridge, tiny_default, tiny_hooked, tiny_spread

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


def _rows() -> torch.Tensor:
    return torch.randint(0, 256, (16, 12), generator=torch.Generator().manual_seed(4))


def _fake_spread(monkeypatch, model, found) -> None:
    """Make the device check see ``found`` as the devices of ``model``'s weights."""
    real = devices._devices
    monkeypatch.setattr(devices, "_devices", lambda m, fresh=False: set(found) if m is model
                        else real(m, fresh=fresh))


def _same_lens(a: TunedLens, b: TunedLens) -> None:
    for name, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], value), name


def test_a_one_device_model_trains_its_lens_there():
    model = tiny_default("gpt2")
    assert devices.lens_device(model) == devices.model_device(model) == torch.device("cpu")
    assert devices.lens_device(model, "cpu") == torch.device("cpu")
    assert devices.input_device(model) == torch.device("cpu")
    with pytest.raises(TypeError, match="lens_device"):
        devices.lens_device(model, 3)
    for bad in ("nonsense", "meta"):
        with pytest.raises(ValueError, match="lens_device"):
            devices.lens_device(model, bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            devices.lens_device(model, "cuda")
    with pytest.raises(ValueError, match="lens_device"):
        train_tuned_lens(model, _rows(), steps=1, lens_device="nonsense", progress=False)


def test_a_spread_model_gets_the_lens_on_its_unembeddings_device(monkeypatch):
    """The unembedding's device, not the first or the input one; the user may name another."""
    model = SimpleNamespace(cfg=SimpleNamespace(device="cuda:0"),
                            W_U=SimpleNamespace(device=CUDA1))
    _fake_spread(monkeypatch, model, {CUDA0, CUDA1})
    assert devices.lens_device(model) == CUDA1
    assert devices.lens_device(model, "cpu") == torch.device("cpu")
    assert devices.input_device(model) == CUDA0            # tokens go where TL puts them
    with pytest.raises(ValueError, match="several devices.*train_tuned_lens"):
        devices.model_device(model)                        # every other method refuses


def test_a_spread_with_offloaded_or_misnamed_weights_is_refused(monkeypatch):
    model = SimpleNamespace(cfg=SimpleNamespace(device="cuda:0"),
                            W_U=SimpleNamespace(device=CUDA1))
    _fake_spread(monkeypatch, model, {CUDA0, torch.device("meta")})
    with pytest.raises(ValueError, match="meta device.*offload"):
        devices.lens_device(model)
    _fake_spread(monkeypatch, model, {CUDA1, torch.device("cuda", 2)})
    with pytest.raises(ValueError, match="cfg.device is 'cuda:0'"):
        devices.lens_device(model)


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_training_accepts_a_spread_model_and_other_methods_refuse_it(monkeypatch, backend):
    if backend == "hooked" and not HAS_HOOKED:
        pytest.skip("TL 4.x has no HookedTransformer")
    model = (tiny_hooked if backend == "hooked" else tiny_bridge)("gpt2")
    plain = train_tuned_lens(model, _rows(), steps=2, batch_size=4, progress=False)
    _fake_spread(monkeypatch, model, {torch.device("cpu"), CUDA1})
    lens = TunedLens.for_model(model)                      # built for a spread model too
    spread = train_tuned_lens(model, _rows(), lens, steps=2, batch_size=4, progress=False)
    assert spread.lens_device == str(model.W_U.device) == "cpu"
    assert spread.config["lens_device"] == "cpu" and spread.losses == plain.losses
    _same_lens(plain.lens, spread.lens)
    with pytest.raises(ValueError, match="several devices.*train_tuned_lens"):
        logit_lens(model, "ab")


def test_every_residual_and_the_kl_target_are_moved_to_the_lens_device(monkeypatch):
    model = tiny_default("gpt2")
    lens = TunedLens.for_model(model)
    moves = []

    class Tracked(torch.Tensor):
        def to(self, *args, **kwargs):
            moves.append(args[0] if args else kwargs.get("device"))
            return super().to(*args, **kwargs)

    real = kl.run_cache
    monkeypatch.setattr(kl, "run_cache", lambda m, t, names: {
        n: v.as_subclass(Tracked) for n, v in real(m, t, names).items()})
    resids, final = kl.residuals(model, lens, _rows()[:2])
    assert len(moves) == len(lens.hook_names) + 1        # every layer and the final one
    assert all(torch.device(d) == lens.bias.device for d in moves)
    monkeypatch.undo()
    plain_resids, plain_final = kl.residuals(model, lens, _rows()[:2])
    assert torch.equal(resids.as_subclass(torch.Tensor), plain_resids)
    assert torch.equal(final.as_subclass(torch.Tensor), plain_final)


def test_the_decoder_moves_to_the_lens_device_whole():
    unembed = Unembed.from_model(tiny_default("gpt2"))
    assert unembed.to("cpu") is unembed                    # there already: no copy
    moved = unembed.to("meta")
    assert {t.device.type for t in (moved.weight, moved.bias, moved.W_U, moved.b_U)
            if t is not None} == {"meta"}
    assert unembed.W_U.device.type == "cpu"                # the model's own is untouched


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_tls_own_split_on_the_cpu_trains_the_same_lens(backend):
    """TL's split machinery (n_devices placement / accelerate hooks) over ("cpu", "cpu")."""
    if backend == "hooked" and not HAS_HOOKED:
        pytest.skip("TL 4.x has no HookedTransformer")
    split = tiny_spread("llama-gqa", backend, ("cpu", "cpu"))
    whole = (tiny_hooked if backend == "hooked" else tiny_bridge)("llama-gqa")
    kw = dict(steps=2, batch_size=4, ls_tokens=64, progress=False)
    a, b = train_tuned_lens(split, _rows(), **kw), train_tuned_lens(whole, _rows(), **kw)
    assert a.losses == b.losses
    _same_lens(b.lens, a.lens)


def test_tiny_spread_refuses_what_tl_cannot_split():
    with pytest.raises(ValueError, match="GPT-2 Bridge"):
        tiny_spread("gpt2", "bridge", ("cpu", "cpu"))
    if HAS_HOOKED:
        with pytest.raises(ValueError, match="consecutive CUDA"):
            tiny_spread("gpt2", "hooked", ("cpu", "cuda:0"))


def test_training_refuses_a_model_with_offloaded_weights():
    """Real weights beside meta placeholders (accelerate's CPU/disk offload): refused."""
    model = tiny_default("gpt2")
    model.register_buffer("stray", torch.zeros(1, device="meta"))
    with pytest.raises(ValueError, match="meta device.*offload"):
        train_tuned_lens(model, _rows(), steps=1, progress=False)
    with pytest.raises(ValueError, match="meta device.*offload"):
        TunedLens.for_model(model)
