"""Where a model lives, and compiled kernels for CUDA with an eager fallback.

Every method runs on the device that holds the model's weights and returns its tensors
there. TransformerLens moves inputs to ``model.cfg.device``, so that field must name the
weights' device: :func:`model_device` checks it (and that no parameter sits elsewhere), and
every method calls it through :func:`tl_lenses.models.check_model`, except tuned-lens
training, which accepts a model spread over several devices (:func:`lens_device`). The
check remembers each model's parameter and buffer dicts, found once per module tree (torch's
global registration hooks say when any tree changes), and the devices read from them while
one sentinel tensor per block stays where it was (:func:`_devices`), so it costs a few
microseconds, not a walk over thousands of modules.

:func:`compiled` wraps a pure tensor function in ``torch.compile`` for CUDA tensors (Inductor
emits Triton kernels that fuse the softmax statistics into one or two passes over the
logits). CPU tensors, a torch without Triton, ``$TL_LENSES_NO_COMPILE`` or any compile
failure run the same function eagerly: both give the same numbers up to float rounding.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import weakref
from typing import Callable

import torch

logger = logging.getLogger("tl_lenses")


def _matches(configured: torch.device, actual: torch.device) -> bool:
    """Whether ``cfg.device`` (often index-less: ``"cuda"``) names the ``actual`` device."""
    if configured.type != actual.type:
        return False
    if configured.index is not None:
        return configured.index == (actual.index or 0)
    if actual.type == "cuda" and actual.index is not None:
        # TL moves inputs to "cuda", i.e. the current CUDA device.
        return actual.index == torch.cuda.current_device()
    return True


def _fine(devices: set[torch.device], configured) -> bool:
    """Whether the one device is a loaded one that ``cfg.device`` names."""
    device = next(iter(devices))
    if device.type == "meta":
        return False
    if configured is None or configured == device or (
            device.index is None and configured == device.type):  # "cpu": no device built
        return True
    return _matches(torch.device(configured), device)


def model_device(model, *, argument: str = "model") -> torch.device:
    """The one device that holds every parameter and buffer of ``model``.

    Args:
        model: a HookedTransformer or TransformerBridge.
        argument: the name used in error messages.

    Returns:
        The device of the weights (``model.cfg.device`` when the model has none).

    Raises:
        ValueError: when the weights sit on several devices (a model split with
            ``n_devices > 1`` or a partly moved one), on the meta device (not loaded), or
            when ``model.cfg.device`` names another device than the weights' (TransformerLens
            would move every input there).
    """
    configured = getattr(model.cfg, "device", None)
    devices = _devices(model)
    if len(devices) == 1 and _fine(devices, configured):
        return devices.pop()  # the usual case: nothing more to check
    # Before an error, look again: a module may have left the tree since it was cached.
    devices = _devices(model, fresh=True)
    if not devices:
        return torch.device(configured or "cpu")
    if len(devices) > 1:
        raise ValueError(
            f"{argument} has parameters on several devices "
            f"({', '.join(sorted(map(str, devices)))}); this method needs the whole model on "
            f"one device: build it there (for a TransformerBridge move the HF model first, "
            f"then wrap it) or call {argument}.to(device). Only tuned-lens training "
            f"(train_tuned_lens, TunedLens.for_model) accepts a model spread over several "
            f"devices (see lens_device)"
        )
    device = devices.pop()
    if device.type == "meta":
        raise ValueError(f"{argument} has its weights on the meta device (not loaded)")
    if configured is not None and not _matches(torch.device(configured), device):
        raise ValueError(
            f"{argument}.cfg.device is {configured!r} but its weights are on {device}; "
            f"TransformerLens moves inputs to cfg.device, so every forward pass would mix "
            f"devices. Set {argument}.cfg.device = {str(device)!r} or move the model with "
            f"{argument}.to({str(device)!r})"
        )
    return device


def lens_device(model, device=None, *, argument: str = "model") -> torch.device:
    """The device a tuned lens trains on for ``model``, which may be spread over devices.

    A model on one device (checked as :func:`model_device` does) gives that device. A
    model spread over several (TL 3.x ``HookedTransformer`` with ``n_devices > 1``, a
    ``TransformerBridge`` booted with ``device_map``/``n_devices``) gives the device of its
    unembedding ``W_U``: the KL targets are computed there, so only the per-layer residuals
    travel. ``device`` overrides either choice.

    Args:
        model: a HookedTransformer or TransformerBridge.
        device: ``None``, or the device to use (a name or ``torch.device``); an index-less
            ``"cuda"`` means the current CUDA device.
        argument: the name used in error messages.

    Returns:
        The lens's device.

    Raises:
        TypeError: ``device`` is not a device name or ``torch.device``.
        ValueError: ``device`` names no usable device; a spread model with weights on the
            meta device (offloaded to CPU/disk by accelerate, or not loaded) or whose
            ``cfg.device`` names none of its devices; a one-device model as
            :func:`model_device` refuses it.
    """
    requested = _requested_device(device)
    found = _devices(model)
    if len(found) > 1:
        found = _devices(model, fresh=True)
    if len(found) <= 1:
        home = model_device(model, argument=argument)
        return home if requested is None else requested
    names = ", ".join(sorted(map(str, found)))
    if any(d.type == "meta" for d in found):
        raise ValueError(
            f"{argument} has weights on the meta device besides {names}: a device_map with "
            f"'cpu'/'disk' offload targets (accelerate keeps meta placeholders) or a model "
            f"not loaded; tuned-lens training needs every weight on a real device")
    configured = getattr(model.cfg, "device", None)
    if configured is not None and not any(_matches(torch.device(configured), d)
                                          for d in found):
        raise ValueError(f"{argument}.cfg.device is {configured!r}, none of the devices "
                         f"holding its weights ({names}); TransformerLens moves inputs there")
    return requested if requested is not None else model.W_U.device


def input_device(model) -> torch.device:
    """Where TransformerLens puts a forward pass's tokens.

    The model's one device, or for a model spread over several (checked by
    :func:`lens_device`) ``cfg.device``.
    """
    if len(_devices(model)) <= 1:
        return model_device(model)
    return torch.device(model.cfg.device)


def _requested_device(device) -> torch.device | None:
    """``device`` as a concrete ``torch.device`` (None stays None), checked."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"lens_device must be a device name or torch.device, got "
                        f"{type(device).__name__}")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"lens_device {device!r} is not a device name") from None
    if parsed.type == "meta":
        raise ValueError("lens_device must be a real device, not 'meta'")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"lens_device {device!r}: CUDA is not available")
        if parsed.index is None:
            parsed = torch.device("cuda", torch.cuda.current_device())
        elif parsed.index >= torch.cuda.device_count():
            raise ValueError(f"lens_device {device!r}: only {torch.cuda.device_count()} "
                             "CUDA device(s)")
    return parsed


# Bumped whenever any module registers a submodule, parameter or buffer (torch's global
# registration hooks): while it stands still, a model's module tree is the one cached below.
_STRUCTURE = [0]


def _bump(*args) -> None:
    _STRUCTURE[0] += 1


def tree_version() -> int:
    """A count that changes whenever any module anywhere registers a submodule or tensor.

    What was found by walking a module tree (a parameter, buffer or submodule registered
    anywhere bumps it) still holds while the count stands still.
    """
    return _STRUCTURE[0]


for _register in (torch.nn.modules.module.register_module_module_registration_hook,
                  torch.nn.modules.module.register_module_parameter_registration_hook,
                  torch.nn.modules.module.register_module_buffer_registration_hook):
    _register(_bump)
# model -> (structure count, the parameter and buffer dicts of its modules, sentinels:
# (dict, key, device) of one tensor per block and per other top-level module, the devices)
_HOLDERS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
_GROUP = re.compile(r"^(.*?\.\d+|[^.]*)(?:\.|$)")   # "blocks.3.mlp" -> "blocks.3"


def _devices(model: torch.nn.Module, *, fresh: bool = False) -> set[torch.device]:
    """The devices of every parameter and buffer of ``model``.

    Walking a Bridge's module tree (thousands of modules for a 30-layer model) took most of
    a small DLA's time, and every method checks the model, so the parameter and buffer
    dicts of its modules are kept until any module anywhere registers a new submodule,
    parameter or buffer; reading the ~500 tensors' devices then still took ~100 us a call,
    so the devices found are kept too, while one sentinel tensor per block (and per other
    top-level module: embeddings, final norm, unembedding) stays where it was, read live
    from its dict. ``model.to(...)``, and moving any block or top-level module, shows at
    once; a part moved *inside* a block after a check (one block's MLP alone) shows at the
    next walk (torch's own device error comes first in a forward pass). ``fresh``: walk
    the tree again and read every tensor.
    """
    cached = None if fresh else _HOLDERS.get(model)
    if cached is not None and cached[0] == _STRUCTURE[0] and _unmoved(cached[2]):
        return set(cached[3])  # a copy: callers pop from it
    # New, restructured or moved (rare): walk again, sentinels included.
    holders, sentinels = _walk(model)
    found = {t.device for d in holders for t in d.values() if t is not None}
    _HOLDERS[model] = (_STRUCTURE[0], holders, sentinels, found)
    return set(found)


def _walk(model: torch.nn.Module) -> tuple[list[dict], list[tuple]]:
    """The parameter and buffer dicts of every module, and a sentinel per module group."""
    holders, sentinels, seen = [], [], set()
    for name, module in model.named_modules():
        for d in (module._parameters, module._buffers):
            if not d:
                continue
            holders.append(d)
            group = _GROUP.match(name).group(1)
            key = next((k for k, t in d.items() if t is not None), None)
            if key is not None and group not in seen:
                seen.add(group)
                sentinels.append((d, key, d[key].device))
    return holders, sentinels


def _unmoved(sentinels: list[tuple]) -> bool:
    """Whether every sentinel tensor is still in its dict, on the device it was on."""
    for d, key, device in sentinels:
        tensor = d.get(key)
        if tensor is None or tensor.device != device:
            return False
    return True


def fast_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware, faster than float32.

    CUDA: compute capability 8.0 or later (Ampere on). CPU: the x86 flags ``avx512_bf16`` or
    ``amx_bf16``, or the Arm ``bf16`` feature (``/proc/cpuinfo``; elsewhere oneDNN's own
    check). Without them torch emulates bf16 matmuls: on an AVX2-only AMD EPYC a
    ``[128, 576] @ [576, 8192]`` one ran ~60x slower than in float32. Other devices: False.

    Args:
        device: the device the matmuls run on.

    Returns:
        True where bf16 matmuls are native.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and _cpu_bf16()


def _cpuinfo_has_bf16(cpuinfo: str) -> bool:
    """Whether ``/proc/cpuinfo`` text lists bf16 matmul units (x86 ``flags``, Arm ``Features``)."""
    flags = {word for line in cpuinfo.splitlines()
             if line.startswith(("flags", "Features")) for word in line.split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


@functools.lru_cache(maxsize=1)
def _cpu_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            return _cpuinfo_has_bf16(file.read())
    except OSError:  # not Linux: ask oneDNN (AVX-512 or Arm bf16 units)
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except Exception:
            return False


def compile_enabled(device: torch.device) -> bool:
    """Whether :func:`compiled` functions take the compiled path for tensors on ``device``."""
    if device.type != "cuda" or os.environ.get("TL_LENSES_NO_COMPILE"):
        return False
    return _triton_available()


@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    try:
        from torch.utils._triton import has_triton

        return bool(has_triton())
    except Exception:  # an old torch or a broken Triton: stay eager
        return False


class compiled:
    """``fn`` compiled with ``torch.compile`` when its first tensor argument is on CUDA.

    The first compile or run failure logs a warning and makes this wrapper eager for the
    rest of the process (the eager function computes the same numbers). ``force=True`` on a
    call takes the compiled path on any device (tests use it on the CPU).
    """

    def __init__(self, fn: Callable, *, dynamic_dim0: bool = True):
        functools.update_wrapper(self, fn)
        self.fn, self.dynamic_dim0 = fn, dynamic_dim0
        self._compiled = None
        self.failed: str | None = None

    def __call__(self, *args, force: bool = False):
        """``fn(*args)``, compiled when the first argument is on CUDA (or ``force``)."""
        first = args[0]
        if self.failed is None and (force or compile_enabled(first.device)):
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(self.fn, dynamic=None)
                if self.dynamic_dim0:
                    _mark_dynamic(first)
                return self._compiled(*args)
            except Exception as error:  # Inductor/Triton missing or failing: stay correct
                self.failed = f"{type(error).__name__}: {str(error)[:300]}"
                logger.warning("torch.compile of %s failed (%s); using eager torch",
                               self.fn.__name__, self.failed)
        return self.fn(*args)


def _mark_dynamic(tensor: torch.Tensor) -> None:
    """Compile once for any number of rows (the last chunk is shorter than the others)."""
    mark = getattr(torch._dynamo, "maybe_mark_dynamic", None)
    if mark is not None and tensor.dim() and tensor.shape[0] > 1:
        mark(tensor, 0)
