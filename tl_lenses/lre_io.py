"""Saving and loading linear relational embeddings: safetensors + JSON, tied to one model.

An LRE folder holds ``lre.safetensors`` (``weight``, ``bias``) and ``lre.json``
(beta, layer, relation, template, the training facts, method, the model's shape and decoder
fingerprint, the weights file's sha256). Loading checks all of it as
:mod:`tl_lenses.tuned_io` does for lenses: another model, a corrupt or truncated file,
each is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

from tl_lenses.lre import LRE, check_layer
from tl_lenses.relations import Sample
from tl_lenses.tuned_io import (check_same_model, file_sha256, model_info, read_json_config,
                                read_weights)

WEIGHTS, CONFIG = "lre.safetensors", "lre.json"
FORMAT = "tl_lenses.lre/1"
_FIELDS = {"d_model", "beta", "layer", "relation", "template", "train", "method", "model",
           "weights_sha256"}


def save_lre(lre: LRE, path, model) -> Path:
    """Write ``lre`` (estimated on ``model``) into the folder ``path``; returns the folder.

    >>> save_lre(estimate_lre(model, relation, layer=6), "lres/country_capital", model)  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    if not isinstance(lre, LRE):
        raise TypeError(f"lre must be an LRE, got {type(lre).__name__}")
    info = model_info(model)
    if lre.d_model != info["d_model"]:
        raise ValueError(f"lre has d_model={lre.d_model}, the model {info['d_model']}")
    check_layer(model, lre.layer)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    # in their own dtype (float32, or float64 from estimate_lre(dtype=...)): exact round trip
    save_file({"weight": lre.weight.detach().cpu().contiguous(),
               "bias": lre.bias.detach().cpu().contiguous()}, str(folder / WEIGHTS))
    config = {
        "format": FORMAT, "d_model": lre.d_model, "beta": lre.beta, "layer": lre.layer,
        "relation": lre.relation, "template": lre.template,
        "train": [[fact.subject, fact.object] for fact in lre.train], "method": lre.method,
        "model": info, "weights_sha256": file_sha256(folder / WEIGHTS),
    }
    (folder / CONFIG).write_text(json.dumps(config, indent=1))
    return folder


def load_lre(path, model) -> LRE:
    """Read an LRE folder written by :func:`save_lre`, checked against ``model``."""
    folder = Path(path)
    config = read_json_config(folder, CONFIG, FORMAT, _FIELDS)
    check_same_model(config["model"], model, source=f"the LRE in {folder}")
    check_layer(model, config["layer"])
    tensors = read_weights(folder / WEIGHTS, config)
    d = config["d_model"]
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if shapes != {"weight": (d, d), "bias": (d,)}:
        raise ValueError(f"{folder / WEIGHTS} holds tensors {shapes}, but d_model is {d}")
    device = model.cfg.device
    return LRE(tensors["weight"].to(device), tensors["bias"].to(device),
               beta=float(config["beta"]), layer=config["layer"], relation=config["relation"],
               template=config["template"],
               train=tuple(Sample(subject, obj) for subject, obj in config["train"]),
               method=config["method"])
