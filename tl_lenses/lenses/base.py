"""The Lens abstraction: translate a residual into the final layer's basis, then unembed.

Every lens in tl_lenses is ``unembed(translate(h, hook_name))``: the logit lens translates by
the identity, the tuned lens by a learned affine map per hook point, the attribute lens by a
linear relational embedding. The shared readout (:func:`tl_lenses.readout.read_lens`) owns
the unembedding, so it can stream vocabulary-sized logits through reused buffers.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from jaxtyping import Float
from torch import Tensor


@runtime_checkable
class Lens(Protocol):
    """Anything with a ``name`` and ``translate(resid, hook_name) -> resid``."""

    name: str

    def translate(
        self, resid: Float[Tensor, "*rows d_model"], hook_name: str
    ) -> Float[Tensor, "*rows d_model"]: ...


class LogitLens:
    """The logit lens (nostalgebraist 2020): decode every layer as if it were the last."""

    name = "logit lens"

    def translate(
        self, resid: Float[Tensor, "*rows d_model"], hook_name: str
    ) -> Float[Tensor, "*rows d_model"]:
        return resid

    def __repr__(self) -> str:
        return "LogitLens()"
