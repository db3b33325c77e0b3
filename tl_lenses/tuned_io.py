"""Saving and loading tuned lenses: safetensors weights + a JSON config tied to one model.

A lens folder holds ``lens.safetensors`` (``bias`` and, for an affine lens, ``weight``) and
``lens.json`` (hook names, kind, the model's shape, a fingerprint of its decoder, the
weights file's sha256, and how it was trained). Loading checks all of it: a lens trained
for another model is an error, not a warning.

The fingerprint has two parts. ``unembed_sha256`` hashes the final norm and unembedding
exactly; when it differs (the same model on the other backend, or in another dtype, differs
in the last bits) the ``probe`` decides: the decoder's logits of a few fixed random
residuals must match to a relative 1e-3, which another model's decoder will not.

:func:`import_tuned_lens_library` reads lenses trained by the ``tuned-lens`` library
(``config.json`` + ``params.pt``): its translator ``i`` reads HF's ``hidden_states[i]``,
which is TL's ``blocks.{i}.hook_resid_pre``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from tl_lenses.lenses.tuned import TunedLens
from tl_lenses.models import check_model
from tl_lenses.unembed import Unembed

WEIGHTS, CONFIG = "lens.safetensors", "lens.json"
FORMAT = "tl_lenses.tuned_lens/1"
N_PROBES, N_PROBE_IDS, PROBE_RTOL = 4, 16, 1e-3


def model_info(model) -> dict:
    """The shape of ``model`` and a fingerprint of its final norm + unembedding."""
    check_model(model)
    unembed = Unembed.from_model(model)
    cfg = model.cfg
    return {
        "model_name": str(getattr(cfg, "model_name", "")), "n_layers": cfg.n_layers,
        "d_model": cfg.d_model, "d_vocab": unembed.d_vocab, "norm": unembed.kind,
        "unembed_sha256": _unembed_hash(unembed), "probe": _probe(unembed),
    }


def _unembed_hash(unembed: Unembed) -> str:
    digest = hashlib.sha256()
    for tensor in (unembed.weight, unembed.bias, unembed.W_U, unembed.b_U):
        if tensor is not None:
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _probe(unembed: Unembed) -> list[list[float]]:
    """Decoder logits of fixed random residuals at fixed vocabulary ids."""
    generator = torch.Generator().manual_seed(1234)
    resid = torch.randn(N_PROBES, unembed.d_model, generator=generator)
    ids = torch.randint(0, unembed.d_vocab, (N_PROBE_IDS,), generator=generator)
    with torch.no_grad():
        logits = unembed(resid.to(unembed.W_U.device, torch.float32)).float().cpu()
    return logits[:, ids].tolist()


def check_same_model(info: dict, model, *, source: str = "lens") -> None:
    """Raise ValueError unless ``info`` (a lens's model_info) describes ``model``."""
    mine = model_info(model)
    for key in ("n_layers", "d_model", "d_vocab", "norm"):
        if info.get(key) != mine[key]:
            raise ValueError(
                f"{source} was made for a different model: {key}={info.get(key)!r} there, "
                f"{mine[key]!r} in this model ({info.get('model_name')!r} vs "
                f"{mine['model_name']!r})"
            )
    if info.get("unembed_sha256") == mine["unembed_sha256"]:
        return
    theirs, ours = torch.tensor(info.get("probe", [])), torch.tensor(mine["probe"])
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=PROBE_RTOL,
                                                        atol=PROBE_RTOL):
        raise ValueError(
            f"{source} was made for a different model: the fingerprint of the final norm and "
            f"unembedding (W_U) does not match ({info.get('model_name')!r} vs "
            f"{mine['model_name']!r})"
        )


def save_tuned_lens(lens: TunedLens, path, *, training: dict | None = None) -> Path:
    """Write ``lens`` into the folder ``path`` (created); returns the folder."""
    from safetensors.torch import save_file

    if not isinstance(lens, TunedLens):
        raise TypeError(f"lens must be a TunedLens, got {type(lens).__name__}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().float().cpu().contiguous()
               for name, p in (("bias", lens.bias), ("weight", lens.weight)) if p is not None}
    save_file(tensors, str(folder / WEIGHTS))
    config = {
        "format": FORMAT, "kind": lens.kind, "d_model": lens.d_model,
        "hook_names": lens.hook_names, "final_name": lens.final_name,
        "model": lens.model_info, "weights_sha256": file_sha256(folder / WEIGHTS),
        "training": training or {},
    }
    (folder / CONFIG).write_text(json.dumps(config, indent=1))
    return folder


def load_tuned_lens(path, model) -> TunedLens:
    """Read a lens folder written by :func:`save_tuned_lens`, checked against ``model``.

    >>> lens = load_tuned_lens("lenses/smollm", model)   # doctest: +SKIP
    """
    folder = Path(path)
    config = read_config(folder)
    check_same_model(config["model"], model, source=f"the lens in {folder}")
    tensors = read_weights(folder / WEIGHTS, config)
    lens = TunedLens(config["hook_names"], config["d_model"], final_name=config["final_name"],
                     kind=config["kind"], model_info=config["model"])
    _copy_params(lens, tensors, folder / WEIGHTS)
    return lens.to(model.cfg.device)


def read_config(folder: Path) -> dict:
    """The JSON config of a lens folder, with clear errors for missing or broken files."""
    return read_json_config(folder, CONFIG, FORMAT, {"kind", "d_model", "hook_names",
                                                     "final_name", "model", "weights_sha256"})


def read_json_config(folder: Path, name: str, fmt: str, required: set[str]) -> dict:
    """``folder/name`` as a dict of format ``fmt`` holding ``required`` keys, or a clear
    error: missing folder or file, invalid JSON (corrupt, truncated), another format."""
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


def read_weights(path: Path, config: dict) -> dict:
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


def _copy_params(lens: TunedLens, tensors: dict, source) -> None:
    expected = {name: tuple(p.shape) for name, p in lens.named_parameters()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if expected != found:
        raise ValueError(f"{source} holds tensors {found}, but the config needs {expected}")
    with torch.no_grad():
        for name, param in lens.named_parameters():
            param.copy_(tensors[name])


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def import_tuned_lens_library(path, model) -> TunedLens:
    """A :class:`TunedLens` from a folder written by the ``tuned-lens`` library.

    Its ``config.json`` gives ``d_model``, ``num_hidden_layers`` and ``bias``; its
    ``params.pt`` (loaded with ``weights_only=True``) the state dict of its translators
    (``{i}.weight``, ``{i}.bias``: ``nn.Linear`` layers). Translator ``i`` maps onto
    ``blocks.{i}.hook_resid_pre``. The residual must be the HF model's own, i.e. the TL
    model loaded without ``center_writing_weights`` (tl_lenses' default processing).
    """
    folder = Path(path)
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

