"""Saving and loading tuned lenses, in tl_lenses' one file format (:mod:`tl_lenses._formats`).

A lens folder holds ``lens.safetensors`` (``bias`` and, for an affine lens, ``weight``) and
``lens.json`` (hook names, kind, the model's shape, a fingerprint of its decoder, the
weights file's sha256, and how it was trained). Loading checks all of it: a lens trained
for another model is an error, not a warning.

:func:`import_tuned_lens_library` reads lenses trained by the ``tuned-lens`` library
(``config.json`` + ``params.pt``): its translator ``i`` reads HF's ``hidden_states[i]``,
which is TL's ``blocks.{i}.hook_resid_pre``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tl_lenses._formats import FORMATS, folder_path, read_folder, write_folder
from tl_lenses.lenses.tuned.lens import TunedLens

FORMAT = "tl_lenses.tuned_lens/1"
WEIGHTS, CONFIG = FORMATS[FORMAT].weights, FORMATS[FORMAT].config


def save_tuned_lens(lens: TunedLens, path, *, training: dict | None = None) -> Path:
    """Write ``lens`` into the folder ``path`` (created); returns the folder."""
    if not isinstance(lens, TunedLens):
        raise TypeError(f"lens must be a TunedLens, got {type(lens).__name__}")
    if training is not None and not isinstance(training, dict):
        raise TypeError(f"training must be a dict (JSON-serialisable) or None, got "
                        f"{type(training).__name__}")
    tensors = {name: p.detach().float().cpu().contiguous()
               for name, p in (("bias", lens.bias), ("weight", lens.weight)) if p is not None}
    config = {"kind": lens.kind, "d_model": lens.d_model, "hook_names": lens.hook_names,
              "final_name": lens.final_name, "model": lens.model_info,
              "training": training or {}}
    try:  # before anything is written: a half-written folder would read as corrupt
        json.dumps(config)
    except TypeError as error:
        raise TypeError(f"training must be JSON-serialisable: {error}") from None
    return write_folder(path, FORMAT, tensors, config)


def load_tuned_lens(path, model) -> TunedLens:
    """Read a lens folder written by :func:`save_tuned_lens`, checked against ``model``.

    >>> lens = load_tuned_lens("lenses/smollm", model)   # doctest: +SKIP
    """
    folder = folder_path(path)
    config, tensors = read_folder(folder, FORMAT, model, source=f"the lens in {folder}")
    lens = TunedLens(config["hook_names"], config["d_model"], final_name=config["final_name"],
                     kind=config["kind"], model_info=config["model"])
    _copy_params(lens, tensors, folder / WEIGHTS)
    return lens.to(model.cfg.device)


def _copy_params(lens: TunedLens, tensors: dict, source) -> None:
    expected = {name: tuple(p.shape) for name, p in lens.named_parameters()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if expected != found:
        raise ValueError(f"{source} holds tensors {found}, but the config needs {expected}")
    with torch.no_grad():
        for name, param in lens.named_parameters():
            param.copy_(tensors[name])


def import_tuned_lens_library(path, model) -> TunedLens:
    """A :class:`TunedLens` from a folder written by the ``tuned-lens`` library.

    Its ``config.json`` gives ``d_model``, ``num_hidden_layers`` and ``bias``; its
    ``params.pt`` (loaded with ``weights_only=True``) the state dict of its translators
    (``{i}.weight``, ``{i}.bias``: ``nn.Linear`` layers). Translator ``i`` maps onto
    ``blocks.{i}.hook_resid_pre``. The residual must be the HF model's own, i.e. the TL
    model loaded without ``center_writing_weights`` (tl_lenses' default processing).
    """
    folder = folder_path(path)
    config = _read_library_config(folder)
    n, d = model.cfg.n_layers, model.cfg.d_model
    if (config["num_hidden_layers"], config["d_model"]) != (n, d):
        raise ValueError(
            f"the lens in {folder} is for num_hidden_layers={config['num_hidden_layers']}, "
            f"d_model={config['d_model']}; the model has n_layers={n}, d_model={d}"
        )
    state = _read_library_params(folder / "params.pt")
    lens = TunedLens.for_model(model)
    with torch.no_grad():
        for i in range(n):
            weight, bias = state.get(f"{i}.weight"), state.get(f"{i}.bias")
            if weight is None or tuple(weight.shape) != (d, d):
                raise ValueError(f"{folder / 'params.pt'} lacks a [{d}, {d}] '{i}.weight'")
            lens.weight[i].copy_(weight.float())
            if bias is not None:
                lens.bias[i].copy_(bias.float())
    return lens.to(model.cfg.device)


def _read_library_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file() or not (folder / "params.pt").is_file():
        raise FileNotFoundError(f"{folder} must hold the tuned-lens files config.json and "
                                "params.pt")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is corrupt or truncated (not valid JSON: {error})") from None
    lens_type = config.get("lens_type", "linear_tuned_lens")
    if lens_type != "linear_tuned_lens":
        raise ValueError(f"{path}: lens_type {lens_type!r} is not supported "
                         "(only 'linear_tuned_lens')")
    if not all(isinstance(config.get(k), int) for k in ("d_model", "num_hidden_layers")):
        raise ValueError(f"{path} must give int d_model and num_hidden_layers")
    return config


def _read_library_params(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, pickle with forbidden globals, ...
        raise ValueError(f"{path} is corrupt, truncated or not a weights-only state dict: "
                         f"{error}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} must hold a state dict, got {type(state).__name__}")
    return state

