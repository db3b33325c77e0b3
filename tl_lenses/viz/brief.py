"""One-line reprs for dataclasses that hold tensors: fields by shape, size or short value.

A dataclass's own repr prints every tensor element and list item (an LRE's weight and bias
on SmolLM2: 10 kB; a training result's per-step losses: one float per step), which floods
a notebook or a log. ``brief_repr`` keeps one line naming every field.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn


def brief_repr(self) -> str:
    """``Type(field=brief value, ...)`` over the dataclass's ``repr=True`` fields.

    Use as ``__repr__ = brief_repr`` in the class body (the dataclass then keeps it).
    """
    if not dataclasses.is_dataclass(self):
        return object.__repr__(self)
    fields = ", ".join(f"{f.name}={_brief(getattr(self, f.name))}"
                       for f in dataclasses.fields(self) if f.repr)
    return f"{type(self).__name__}({fields})"


def _brief(value, nested: bool = False) -> str:
    """A short stand-in for a field's value: tensors by shape, long containers by size."""
    if isinstance(value, Tensor):
        return f"Tensor{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, nn.Module):
        return f"<{type(value).__name__}>"
    if value is None or isinstance(value, (bool, int, float, str)):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    if isinstance(value, dict):
        keys = ", ".join(map(repr, list(value)[:4]))
        return f"{{{len(value)} keys: {keys}{', ...' if len(value) > 4 else ''}}}"
    if isinstance(value, (list, tuple)) and not nested:
        if len(value) <= 4:
            items = ", ".join(_brief(v, nested=True) for v in value)
            return f"[{items}]" if isinstance(value, list) else f"({items})"
        return f"<{type(value).__name__} of {len(value)}>"
    if isinstance(value, (list, tuple)):
        return f"<{type(value).__name__} of {len(value)}>"
    return f"<{type(value).__name__}>"


__all__ = ["brief_repr"]
