"""The attribute lens (Hernandez et al. 2024): one LRE applied to every layer and token.

An LRE maps the subject's residual at its layer to the final residual that decodes to the
relation's object. Applying the same map to the residual of *any* layer and position, and
decoding the result like the logit lens, shows where the model holds that attribute (the
capital of a country mentioned three tokens ago, say) even when it is not about to say it.
"""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

from tl_lenses.lenses.attribute.lre import LRE, check_lre
from tl_lenses.readout.apply import apply_lens
from tl_lenses.readout.result import LensResult


class AttributeLens:
    """A :class:`~tl_lenses.readout.lens.Lens` translating by ``beta * W h + b``.

    The translation is the same at every hook point; the shared readout then applies the
    final norm (with the translated vector's own statistics) and the unembedding. With the
    identity LRE (``LRE.identity``) this is exactly the logit lens.
    """

    def __init__(self, lre: LRE):
        if not isinstance(lre, LRE):
            raise TypeError(f"lre must be a tl_lenses.lenses.attribute.lre.LRE, "
                            f"got {type(lre).__name__}")
        self.lre = lre
        label = f" {lre.relation!r}," if lre.relation else ""
        self.name = f"attribute lens ({lre.method}{label} layer {lre.layer}, beta {lre.beta:g})"

    @property
    def d_model(self) -> int:
        """The LRE's residual width."""
        return self.lre.d_model

    @property
    def model_info(self) -> dict:
        """The fingerprint of the model the LRE was estimated on (empty when unknown)."""
        return self.lre.model_info

    def translate(
        self, resid: Float[Tensor, "*rows d_model"], hook_name: str
    ) -> Float[Tensor, "*rows d_model"]:
        """``LRE(h)`` for every row: the relation's object, then read like the logit lens."""
        if resid.shape[-1] != self.lre.d_model:
            raise ValueError(f"resid must end in d_model={self.lre.d_model}, got shape "
                             f"{tuple(resid.shape)}")
        return self.lre(resid)

    def __repr__(self) -> str:
        return f"AttributeLens({self.name})"


def attribute_lens(model, input, lre: LRE, **kwargs) -> LensResult:
    """The attribute lens (Hernandez et al. 2024, Fig. 8): ``LRE(h)`` decoded at every cell.

    Each residual is mapped by the LRE into the final layer's basis and read like the logit
    lens. The default target (``"final"``) is the model's own final top-1, so the rank grid
    shows where the attribute and the next token differ.

    Args:
        model: the model the LRE was estimated on.
        input: a string, strings, or int tokens ``[batch, pos]``.
        lre: an :class:`~tl_lenses.lenses.attribute.lre.LRE`.
        **kwargs: :func:`~tl_lenses.readout.apply.apply_lens`'s (``layers``, ``positions``,
            ``k``, ``target``, ...).

    Returns:
        A :class:`~tl_lenses.readout.result.LensResult`.

    Raises:
        TypeError: ``lre`` is not an :class:`~tl_lenses.lenses.attribute.lre.LRE` (its
            ``weight`` tensor, say).
        ValueError: an LRE of another width or estimated on another model (its
            ``model_info``), and every error of ``apply_lens``.

    >>> facts = tuple(Sample(s, o) for s, o in zip("abcdef", "uvwxyz"))
    >>> relation = Relation("toy", ("{} =",), facts)
    >>> result = attribute_lens(model, "a = u", estimate_lre(model, relation, layer=1, n=3), k=2)
    >>> result.lens.startswith("attribute lens"), result.top_ids.shape[-1]
    (True, 2)
    """
    check_lre(model, lre)
    return apply_lens(model, input, AttributeLens(lre), **kwargs)
