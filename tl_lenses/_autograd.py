"""Autograd for the methods that need it, whatever grad mode the caller is in.

Tuned-lens training, the LRE's Jacobian, retrained decoders and the gradient-alignment
analysis take gradients. Notebooks often call them inside ``torch.no_grad()`` (autograd then
records nothing) or ``torch.inference_mode()``, where not even ``torch.enable_grad()`` turns
recording back on: a Jacobian read off such a pass was silently all zeros, and training
failed with a bare autograd error. :func:`needs_autograd` runs the method with grad mode on
and outside inference mode; the caller's modes are restored after.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable)


def needs_autograd(fn: F) -> F:
    """Decorator: call ``fn`` with grad mode on and inference mode off.

    Tensor arguments made under inference mode (token ids built in an ``inference_mode``
    block) are cloned into ordinary tensors first: autograd may not save an inference tensor
    for the backward pass (an embedding saves its indices).
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad():
            args = tuple(map(_ordinary, args))
            kwargs = {key: _ordinary(value) for key, value in kwargs.items()}
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _ordinary(value):
    """``value``, or an ordinary copy of it when it is an inference-mode tensor."""
    if isinstance(value, Tensor) and value.is_inference():
        return value.clone()
    return value


__all__ = ["needs_autograd"]
