"""Saving and loading linear relational embeddings: safetensors + JSON, tied to one model.

An LRE folder holds ``lre.safetensors`` (``weight``, ``bias``) and ``lre.json``
(beta, layer, relation, template, the training facts, method, the model's shape and decoder
fingerprint, the weights file's sha256). Loading checks all of it as
:mod:`tl_lenses._formats` does for every saved kind: another model, a corrupt or truncated file,
each is an error.
"""

from __future__ import annotations

from pathlib import Path

from tl_lenses._formats import FORMATS, folder_path, read_folder, write_folder
from tl_lenses.hooks import resolve_layer
from tl_lenses.lenses.attribute.lre import LRE, check_lre
from tl_lenses.lenses.attribute.relations import Sample
from tl_lenses.readout.fingerprint import model_info

FORMAT = "tl_lenses.lre/1"
WEIGHTS, CONFIG = FORMATS[FORMAT].weights, FORMATS[FORMAT].config


def save_lre(lre: LRE, path, model) -> Path:
    """Write ``lre`` (estimated on ``model``) into the folder ``path``; returns the folder.

    >>> lre = estimate_lre(model, relation, layer=6)                 # doctest: +SKIP
    >>> save_lre(lre, "lres/country_capital", model)                 # doctest: +SKIP
    """
    check_lre(model, lre)
    info = model_info(model)
    resolve_layer(model, lre.layer, negative=False)
    # in their own dtype (float32, or float64 from estimate_lre(dtype=...)): exact round trip
    tensors = {"weight": lre.weight.detach().cpu().contiguous(),
               "bias": lre.bias.detach().cpu().contiguous()}
    config = {
        "d_model": lre.d_model, "beta": lre.beta, "layer": lre.layer,
        "relation": lre.relation, "template": lre.template,
        "train": [[fact.subject, fact.object] for fact in lre.train], "method": lre.method,
        "model": info,
    }
    return write_folder(path, FORMAT, tensors, config)


def load_lre(path, model) -> LRE:
    """Read an LRE folder written by :func:`save_lre`, checked against ``model``."""
    folder = folder_path(path)
    config, tensors = read_folder(folder, FORMAT, model, source=f"the LRE in {folder}")
    resolve_layer(model, config["layer"], negative=False)
    d = config["d_model"]
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if shapes != {"weight": (d, d), "bias": (d,)}:
        raise ValueError(f"{folder / WEIGHTS} holds tensors {shapes}, but d_model is {d}")
    device = model.cfg.device
    return LRE(tensors["weight"].to(device), tensors["bias"].to(device),
               beta=float(config["beta"]), layer=config["layer"], relation=config["relation"],
               template=config["template"],
               train=tuple(Sample(subject, obj) for subject, obj in config["train"]),
               method=config["method"], model_info=config["model"])
