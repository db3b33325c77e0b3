"""The Lens protocol: what the shared readout needs of a lens.

Every lens in tl_lenses is ``unembed(translate(h, hook_name))``: the logit lens translates by
the identity, the tuned lens by a learned affine map per hook point, the attribute lens by a
linear relational embedding. The readout (:func:`tl_lenses.readout.read_lens`) owns the
unembedding, so it can stream vocabulary-sized logits through reused buffers. ``None`` in
place of a lens means the logit lens.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from jaxtyping import Float
from torch import Tensor


@runtime_checkable
class Lens(Protocol):
    """Anything with a ``name`` and ``translate(resid, hook_name) -> resid``.

    ``translate`` maps residuals ``[*rows, d_model]`` read at ``hook_name`` into the final
    layer's basis (same shape). Returning the input object itself marks an identity
    translation, which lets the readout reuse the final layer's logits.
    """

    name: str

    def translate(
        self, resid: Float[Tensor, "*rows d_model"], hook_name: str
    ) -> Float[Tensor, "*rows d_model"]:
        """Map ``resid`` read at ``hook_name`` into the final layer's basis."""
