"""Integer-like argument values: Python ints, numpy integers, 0-d integer tensors.

Users index with what their code has at hand (``np.arange``, ``tensor.argmax()``), so every
place that takes a layer, a position, a token id or a head reads it through :func:`as_int`.
A bool is never an index here (``True`` as a layer is a mistake, not layer 1).
"""

from __future__ import annotations

import numbers

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
