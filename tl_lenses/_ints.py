"""Integer-like argument values: Python ints, numpy integers, 0-d integer tensors.

Users index with what their code has at hand (``np.arange``, ``tensor.argmax()``), so every
place that takes a layer, a position, a token id or a head reads it through :func:`as_int`.
A bool is never an index here (``True`` as a layer is a mistake, not layer 1).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from torch import Tensor


def as_int(value) -> int | None:
    """``value`` as a Python int when it is integer-like, else None (bools included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):  # int and numpy's integer scalars
        return int(value)
    if isinstance(value, Tensor) and value.dim() == 0 and not (
            value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        return int(value)
    return None


def is_int(value) -> bool:
    """Whether :func:`as_int` takes ``value``."""
    return as_int(value) is not None


def as_ints(values) -> list | None:
    """An integer-like ``values`` as ``[int]``, an iterable of them as a list.

    Each item an int where integer-like, left as it is otherwise (for the caller's message);
    None for anything else (a string, a float, a bool).
    """
    one = as_int(values)
    if one is not None:
        return [one]
    if isinstance(values, (str, bytes, float, bool)) or not hasattr(values, "__iter__"):
        return None
    if isinstance(values, Tensor) and values.dim() == 0:  # a float or bool scalar tensor
        return None
    return [as_int(v) if is_int(v) else v for v in values]


def ids_as_tensor(input, argument: str) -> Tensor | None:
    """Token ids given as a numpy array, a list of ints or equal lists of ints, as a tensor.

    None for anything else (text, a Batch, other types: the caller's messages). Rows of
    unequal lengths are an error: where the padding is must come from an attention mask.
    """
    if isinstance(input, np.ndarray):  # float/bool arrays too: the caller names the dtype
        return torch.as_tensor(input) if input.dtype.kind in "biuf" else None
    if not isinstance(input, (list, tuple)) or not input:
        return None
    if all(as_int(x) is not None for x in input):
        return torch.tensor([as_int(x) for x in input])
    rows = [as_ints(row) if isinstance(row, (list, tuple, np.ndarray, Tensor)) else None
            for row in input]
    if any(row is None or not row or any(as_int(x) is None for x in row)  # bools too
           for row in rows):
        return None
    if len({len(row) for row in rows}) > 1:
        raise ValueError(
            f"{argument} holds token rows of different lengths {[len(r) for r in rows]}; pad "
            "them to one length and pass attention_mask= (1 = token, 0 = pad), or pass text"
        )
    return torch.tensor(rows)
