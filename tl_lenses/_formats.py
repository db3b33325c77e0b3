"""One file format for everything tl_lenses saves: safetensors weights + a JSON config.

A saved folder holds a weights file and a JSON config whose ``format`` field names its kind
(``tl_lenses.tuned_lens/1``, ``tl_lenses.lre/1``: see :data:`FORMATS`). The config records
the model's shape, a fingerprint of its decoder and the weights file's sha256; reading
checks all of it, so a lens or LRE made for another model, or a corrupt or truncated file,
is an error and never a warning.

The fingerprint (:mod:`tl_lenses.readout.fingerprint`) is the model's
shape and its decoder's logits of a few fixed random residuals, which must match to a
relative 1e-3: the same model on the other backend or in another dtype passes, another
model's decoder does not.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tl_lenses.readout.fingerprint import check_same_model


@dataclass(frozen=True)
class Format:
    """File names and required config keys of one saved kind."""

    weights: str
    config: str
    required: frozenset[str]


FORMATS = {
    "tl_lenses.tuned_lens/1": Format("lens.safetensors", "lens.json", frozenset(
        {"kind", "d_model", "hook_names", "final_name", "model", "weights_sha256"})),
    "tl_lenses.lre/1": Format("lre.safetensors", "lre.json", frozenset(
        {"d_model", "beta", "layer", "relation", "template", "train", "method", "model",
         "weights_sha256"})),
}


def write_folder(path, fmt: str, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write ``tensors`` and ``config`` (plus ``format`` and the weights' sha256) to ``path``.

    Returns the folder (created if needed).
    """
    from safetensors.torch import save_file  # optional at import time, needed here

    spec = FORMATS[fmt]
    folder = folder_path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"path {folder} is a file; a {fmt} is saved as a folder")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / spec.weights))
    full = {"format": fmt, **config, "weights_sha256": file_sha256(folder / spec.weights)}
    (folder / spec.config).write_text(json.dumps(full, indent=1))
    return folder


def read_folder(path, fmt: str, model, *, source: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a folder written by :func:`write_folder`, checked against ``model``.

    Raises:
        FileNotFoundError: no folder, config or weights file.
        ValueError: invalid JSON, another format, a sha256 mismatch (corrupt or truncated
            weights), or a config made for another model.
    """
    spec = FORMATS[fmt]
    folder = folder_path(path)
    if folder.is_file() and folder.name in (spec.config, spec.weights):
        folder = folder.parent          # a file of the folder names the folder
    config = read_json_config(folder, spec.config, fmt, spec.required)
    check_same_model(config["model"], model, source=source)
    return config, read_weights(folder / spec.weights, config)


def folder_path(path) -> Path:
    """``path`` as a Path; TypeError naming ``path`` for anything but text or a PathLike."""
    if not isinstance(path, (str, os.PathLike)) or (isinstance(path, str) and not path):
        raise TypeError(f"path must be a folder path (str or os.PathLike), got {path!r}")
    return Path(path)


def read_json_config(folder: Path, name: str, fmt: str, required: frozenset[str]) -> dict:
    """``folder/name`` as a dict of format ``fmt`` holding ``required`` keys.

    Raises:
        FileNotFoundError: a missing folder or file.
        ValueError: invalid JSON (corrupt, truncated) or another format.
    """
    if folder.is_file():
        raise FileNotFoundError(f"{folder} is a file: give the {fmt} folder (the one that "
                                f"holds {name})")
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder at {folder}")
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {name}; is it a {fmt} folder?")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is corrupt or truncated (not valid JSON: {error})") from None
    missing = ({"format"} | required) - set(config if isinstance(config, dict) else ())
    if missing or config.get("format") != fmt:
        raise ValueError(f"{path} is not a {fmt} config (missing {sorted(missing)})")
    return config


def read_weights(path: Path, config: dict) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file whose sha256 the config recorded (else a clear error)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"weights {path} are missing")
    if file_sha256(path) != config["weights_sha256"]:
        raise ValueError(f"{path} is corrupt or truncated: its sha256 does not match the "
                         "one recorded in the config when it was saved")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(f"{path} is corrupt or truncated: {error}") from None


def file_sha256(path: Path) -> str:
    """The hex sha256 of the file at ``path``."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
