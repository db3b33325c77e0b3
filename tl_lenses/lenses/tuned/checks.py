"""Argument checks for tuned-lens training, kept apart from the training loop.

:func:`check_training` fails early, naming the argument, on everything
:func:`~tl_lenses.lenses.tuned.train.train_tuned_lens` would otherwise ignore, misread or
crash on deep inside the loop (a zero batch size, a negative step count, a lens made for
another model, token ids outside the vocabulary, ``resume`` without a checkpoint folder).
It reads the config's fields by name, so it does not depend on where ``TrainConfig`` lives.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor

from tl_lenses._formats import check_same_model
from tl_lenses.hooks import check_hook_names, final_resid_name
from tl_lenses.inputs import check_ids
from tl_lenses.lenses.tuned.lens import TunedLens
from tl_lenses.streams import TensorRows, TokenStream

RECIPES = ("fast", "reference")


def check_training(model, tokens, lens, config, *, callback=None, resume=False) -> None:
    """Raise ValueError/TypeError naming the argument unless training can honour all of it.

    Args:
        model: the model (already checked by the caller).
        tokens: the training rows: int ids ``[batch, pos]`` within the vocabulary and
            ``n_ctx``.
        lens: None (a fresh lens) or a ``TunedLens`` for ``model``.
        config: a ``TrainConfig`` with the recipe's defaults filled in (``resolved()``).
        callback: None or a callable.
        resume: a bool; True needs ``config.checkpoint_dir``.

    Raises:
        TypeError: a field or argument of the wrong type.
        ValueError: a value out of range, ids outside the vocabulary, a lens for another
            model, or ``resume`` without a checkpoint folder.
    """
    check_config(config)
    if not isinstance(tokens, (TokenStream, TensorRows)):   # streams check as they read
        check_tokens(model, tokens)
    if lens is not None:
        check_lens(model, lens)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable(step, seconds, lens) or None, got "
                        f"{type(callback).__name__}")
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be a bool, got {resume!r}")
    if resume and not config.checkpoint_dir:
        raise ValueError("resume=True needs checkpoint_dir (the folder to resume from)")


def check_config(config) -> None:
    """Each ``TrainConfig`` field's type and range (None fields must be resolved first)."""
    if config.recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {config.recipe!r}")
    _int("steps", config.steps, low=0)
    _int("batch_size", config.batch_size, low=1)
    if getattr(config, "micro_batch_size", None) is not None:
        _int("micro_batch_size", config.micro_batch_size, low=1)
    _int("ls_tokens", config.ls_tokens, low=0)
    _int("max_chunk_elements", config.max_chunk_elements, low=1)
    _int("checkpoint_every", config.checkpoint_every, low=1)
    _int("seed", config.seed, low=None)
    if config.time_budget is not None:
        _number("time_budget", config.time_budget, positive=True)
    _number("lr", config.lr, positive=True)
    _number("momentum", config.momentum)
    if not config.momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {config.momentum!r}")
    _number("weight_decay", config.weight_decay)
    _number("clip", config.clip)                    # 0 turns clipping off
    _number("ridge", config.ridge)
    _number("ls_time_fraction", config.ls_time_fraction, positive=True)
    if config.ls_time_fraction > 1:
        raise ValueError(f"ls_time_fraction must be in (0, 1], got {config.ls_time_fraction!r}")
    for name in ("bf16", "progress"):
        if not isinstance(getattr(config, name), bool):
            raise TypeError(f"{name} must be a bool, got {getattr(config, name)!r}")
    folder = config.checkpoint_dir
    if folder is not None:
        if not isinstance(folder, (str, os.PathLike)) or folder == "":
            raise TypeError(f"checkpoint_dir must be a folder path or None, got {folder!r}")
        if Path(folder).exists() and not Path(folder).is_dir():
            raise ValueError(f"checkpoint_dir {folder} is a file, not a folder")


def check_tokens(model, tokens) -> None:
    """Int token rows ``[batch, pos]``: at least one row, at most n_ctx, ids in the vocabulary."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point \
            or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        got = (f"a {tokens.dtype} tensor of shape {tuple(tokens.shape)}"
               if isinstance(tokens, Tensor) else type(tokens).__name__)
        raise ValueError(
            f"tokens must be an int tensor of token rows shaped [batch, pos] or a TokenStream, "
            f"got {got}; text (strings, files, folders, a dataset) becomes rows with "
            f"tll.token_split(model, texts=[...] or paths=[...]).train, or streams with "
            f"tll.tuned.TokenStream(model, paths=...)")
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ValueError(f"tokens rows are {tokens.shape[1]} tokens long, more than the model's "
                         f"n_ctx={model.cfg.n_ctx}: pack them with seq_len <= {model.cfg.n_ctx} "
                         "(token_split(model, ..., seq_len=...))")
    if tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must hold >= 1 row of 1..n_ctx={model.cfg.n_ctx} tokens, "
                         f"got shape {tuple(tokens.shape)}")
    check_ids(model, tokens, "tokens")


def check_lens(model, lens) -> None:
    """A ``TunedLens`` whose hook points, width and fingerprint are ``model``'s."""
    if not isinstance(lens, TunedLens):
        raise TypeError(f"lens must be a TunedLens, got {type(lens).__name__}")
    if lens.d_model != model.cfg.d_model:
        raise ValueError(f"lens has d_model={lens.d_model}, the model {model.cfg.d_model}")
    check_hook_names(model, lens.hook_names, argument="lens.hook_names")
    if lens.final_name != final_resid_name(model):
        raise ValueError(f"lens decodes against {lens.final_name!r}, but the model's final "
                         f"residual is {final_resid_name(model)!r}")
    if lens.model_info:
        check_same_model(lens.model_info, model, source="lens")


def _int(name: str, value, *, low: int | None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _number(name: str, value, *, positive: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, "
                         f"got {value!r}")

