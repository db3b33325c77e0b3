"""A tl_lenses lens as TransformerLens 4.x's ``lens=`` translator (``tools.analysis.logit_lens``).

TL 4.x's ``logit_lens(model, input, lens=f)`` calls ``f(entry, index)`` on each entry of
the accumulated residual stack (``[batch, pos, d_model]`` after its position and batch
selection) before the final norm, where ``index`` counts entries of the *whole* stack as
``accumulated_resid`` lays it out (``layers=`` only drops entries). tl_lenses' lenses
translate by hook name instead (``lens.translate(h, "blocks.3.hook_resid_pre")``), so the
adapter maps the index back to the hook name with :func:`tl_lenses.hooks.resid_names`, the
same layout. The TL tool then applies the final norm and unembedding itself, exactly as
tl_lenses' readout does, so a tuned lens reads the same through either (tested).

>>> from transformer_lens.tools.analysis import logit_lens          # doctest: +SKIP
>>> lens = load_tuned_lens("lenses/smollm", model)                   # doctest: +SKIP
>>> logit_lens(model, "The capital of France is", lens=tl_lens_hook(model, lens),
...            positions=None, top_k=5)                               # doctest: +SKIP
"""

from __future__ import annotations

from typing import Callable

from jaxtyping import Float
from torch import Tensor

from tl_lenses.hooks import resid_names
from tl_lenses.models import check_model
from tl_lenses.readout.fingerprint import check_lens

StackTranslator = Callable[[Tensor, int], Tensor]


def tl_lens_hook(model, lens, *, incl_mid: bool = False) -> StackTranslator:
    """``f(entry, index) -> entry`` translating each stack entry through ``lens``.

    Args:
        model: The HookedTransformer or compatibility-mode TransformerBridge the TL tool
            reads (and ``lens`` was made for).
        lens: A tl_lenses lens (``translate(resid, hook_name)``): a ``TunedLens``, an
            ``AttributeLens``, ``LogitLens()``...
        incl_mid: Pass the same ``incl_mid`` as to TL's ``logit_lens``: it decides which
            hook each stack index is (``resid_mid`` entries interleave with ``resid_pre``).

    Returns:
        The translator for ``lens=``: ``entry`` is ``[..., d_model]`` (any leading dims),
        ``index`` in ``[0, n_layers]`` (``[0, 2 n_layers]`` with ``incl_mid``); the result
        has ``entry``'s shape.

    Raises:
        TypeError: If ``lens`` has no ``translate`` method (a string, say).
        ValueError: If ``lens`` was made for another model (its width or its
            ``model_info`` fingerprint, :mod:`tl_lenses.readout.fingerprint`); when
            called, for an index outside the stack or a hook the lens does not cover.
    """
    check_model(model)
    check_lens(model, lens, allow_none=False)
    names = resid_names(model, incl_mid=incl_mid)

    def translate_entry(
        entry: Float[Tensor, "*rows d_model"], index: int
    ) -> Float[Tensor, "*rows d_model"]:
        if not 0 <= index < len(names):
            raise ValueError(f"stack index must be in [0, {len(names)}) (incl_mid={incl_mid}), "
                             f"got {index}")
        return lens.translate(entry, names[index])

    return translate_entry
