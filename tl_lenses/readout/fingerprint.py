"""Which model a lens, an LRE or a saved file was made for, checked wherever it is used.

:func:`model_info` records a model's shape and a fingerprint of its decoder (the final norm
and the unembedding). ``unembed_sha256`` hashes the decoder exactly; the ``probe`` holds the
decoder's logits of a few fixed random residuals at a few fixed vocabulary ids.
:func:`check_same_model` decides by the shape and the probe alone, to a relative
:data:`PROBE_RTOL`: the same weights on the other backend, in another dtype or on another
device pass (they differ in the last bits), another model's decoder does not. The probe
costs a ``[4, d_model] x [d_model, 16]`` matmul and is cached per model until its decoder
tensors change, so checking at every use (:func:`check_lens`) costs microseconds.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Mapping

import torch

from tl_lenses.readout.unembed import Unembed

N_PROBES, N_PROBE_IDS, PROBE_RTOL = 4, 16, 1e-3
SHAPE_KEYS = ("n_layers", "d_model", "d_vocab", "norm")
# model -> (decoder tensors' identity and version, its shape and probe)
_PROBES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_info(model) -> dict:
    """The shape of ``model`` and a fingerprint of its final norm + unembedding.

    A model spread over several devices is accepted (its decoder is gathered on W_U's).
    """
    info = _cheap_info(model)
    info["unembed_sha256"] = _unembed_hash(Unembed.from_model(model, spread=True))
    return info


def check_same_model(info: dict, model, *, source: str = "lens") -> None:
    """Raise ValueError unless ``info`` (a saved :func:`model_info`) describes ``model``."""
    mine = _cheap_info(model)
    for key in SHAPE_KEYS:
        if info.get(key) != mine[key]:
            raise ValueError(
                f"{source} was made for a different model: {key}={info.get(key)!r} there, "
                f"{mine[key]!r} in this model{_names(info, mine)}"
            )
    if not _close(info.get("probe"), mine["probe"]):
        raise ValueError(
            f"{source} was made for a different model: the fingerprint of the final norm and "
            f"unembedding (W_U) does not match{_names(info, mine)}"
        )


def _names(info: dict, mine: dict) -> str:
    # Model names only help when they differ (models built in memory are all 'external').
    theirs = info.get("model_name")
    return "" if theirs == mine["model_name"] else f" ({theirs!r} vs {mine['model_name']!r})"


def check_lens(model, lens, *, argument: str = "lens", allow_none: bool = True) -> None:
    """The one check of a lens before it is applied to ``model`` (every entry point calls it).

    Args:
        model: the model the lens is about to read.
        lens: an object with ``translate(resid, hook_name)`` (``None``: the logit lens, when
            ``allow_none``). A lens carrying ``model_info`` (``TunedLens``, ``AttributeLens``)
            or ``d_model`` is checked against ``model``.
        argument: the argument's name, for the messages.
        allow_none: whether ``None`` (the logit lens) is accepted.

    Raises:
        TypeError: naming ``argument``: a string or path (a lens must be loaded first), a
            lens class instead of an instance, or anything without a callable ``translate``.
        ValueError: naming ``argument``: a lens of another width or made for another model.
    """
    if lens is None and allow_none:
        return
    if isinstance(lens, (str, bytes, os.PathLike)):
        raise TypeError(
            f"{argument} must be a lens object (TunedLens, LogitLens(), AttributeLens...)"
            f"{' or None for the logit lens' if allow_none else ''}, got the "
            f"{type(lens).__name__} {lens!r}; load a saved lens first "
            "(load_tuned_lens(path, model))"
        )
    if isinstance(lens, type):
        # The class's translate is callable too, and failed later as a missing argument.
        raise TypeError(f"{argument} must be a lens instance, got the class {lens.__name__}; "
                        f"make one first (LogitLens(), TunedLens.for_model(model), "
                        f"load_tuned_lens(path, model))")
    if not callable(getattr(lens, "translate", None)):
        # An LRE maps a subject's state, not a hook point's: it is read through the
        # attribute lens (named, not imported: tl_lenses.lenses.attribute imports this module).
        hint = ("; an LRE is read as a lens through AttributeLens(lre) "
                "(tl_lenses.attribute.AttributeLens), or call tl_lenses.attribute_lens(model, "
                "input, lre)" if type(lens).__name__ == "LRE" else "")
        raise TypeError(f"{argument} must be a lens with translate(resid, hook_name)"
                        f"{' or None' if allow_none else ''}, got {type(lens).__name__}{hint}")
    d_model = getattr(lens, "d_model", None)
    if isinstance(d_model, int) and d_model != model.cfg.d_model:
        raise ValueError(f"{argument} has d_model={d_model} but the model has "
                         f"d_model={model.cfg.d_model}: it was made for another model")
    info = getattr(lens, "model_info", None)
    if info:
        check_same_model(info, model, source=argument)


def check_each_lens(model, lenses, *, argument: str = "lenses", allow_none: bool = False) -> None:
    """:func:`check_lens` on each lens of a ``{name: lens}`` mapping or a sequence of lenses.

    ``allow_none``: whether an entry may be None (the logit lens), for consumers that read
    through the shared readout.

    Raises:
        TypeError: ``lenses`` is neither (a string is not a sequence of lenses), or an entry
            fails :func:`check_lens` (named ``lenses[key]``).
        ValueError: an entry made for another model.
    """
    if lenses is None:
        return
    if isinstance(lenses, Mapping):
        items = list(lenses.items())
    elif isinstance(lenses, (list, tuple)):
        items = list(enumerate(lenses))
    else:
        raise TypeError(f"{argument} must be a mapping {{name: lens}} or a list of lenses, got "
                        f"{type(lenses).__name__} {lenses!r}")
    for key, lens in items:
        check_lens(model, lens, argument=f"{argument}[{key!r}]", allow_none=allow_none)


def _close(theirs, ours: list[list[float]]) -> bool:
    """``torch.allclose(theirs, ours, rtol=atol=PROBE_RTOL)`` on nested lists, in Python.

    64 numbers: plain floats are ten times faster than building two tensors.
    """
    if not isinstance(theirs, list) or len(theirs) != len(ours):
        return False
    for row, our_row in zip(theirs, ours):
        if not isinstance(row, list) or len(row) != len(our_row):
            return False
        for a, b in zip(row, our_row):
            if not abs(a - b) <= PROBE_RTOL * (1 + abs(b)):
                return False
    return True


def _cheap_info(model) -> dict:
    """:func:`model_info` without the sha256 (the probe is cached per model)."""
    # An all-zero b_U kept (not read as None): dropping it costs a pass over the vocabulary
    # at every check, and adding zeros leaves the probe's logits as they are.
    unembed = Unembed.from_model(model, spread=True, drop_zero_bias=False)
    key = tuple((id(t), t._version, t.dtype, t.device) if t is not None else None
                for t in (unembed.weight, unembed.bias, unembed.W_U, unembed.b_U))
    key += (unembed.kind, unembed.eps, unembed.soft_cap)
    cached = _PROBES.get(model)
    if cached is None or cached[0] != key:
        cfg = model.cfg
        cached = key, {
            "model_name": str(getattr(cfg, "model_name", "")), "n_layers": cfg.n_layers,
            "d_model": cfg.d_model, "d_vocab": unembed.d_vocab, "norm": unembed.kind,
            "probe": _probe(unembed.to(unembed.W_U.device)),
        }
        _PROBES[model] = cached
    return dict(cached[1])


def _unembed_hash(unembed: Unembed) -> str:
    digest = hashlib.sha256()
    for tensor in (unembed.weight, unembed.bias, unembed.W_U, unembed.b_U):
        if tensor is not None:
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _probe(unembed: Unembed) -> list[list[float]]:
    """Decoder logits of fixed random residuals at fixed vocabulary ids.

    Only the probed columns of ``W_U`` are multiplied: the same numbers as decoding the
    whole vocabulary and picking them, at a ``d_vocab / 16``-th of the cost.
    """
    generator = torch.Generator().manual_seed(1234)
    resid = torch.randn(N_PROBES, unembed.d_model, generator=generator)
    ids = torch.randint(0, unembed.d_vocab, (N_PROBE_IDS,), generator=generator)
    device = unembed.W_U.device
    with torch.no_grad():
        x = unembed.normalize(resid.to(device, torch.float32)).float()
        columns = ids.to(device)
        logits = x @ unembed.W_U.detach()[:, columns].float()
        if unembed.b_U is not None:
            logits = logits + unembed.b_U.detach()[columns].float()
        logits = unembed.cap(logits)
    return logits.cpu().tolist()
