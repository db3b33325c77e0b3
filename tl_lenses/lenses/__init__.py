"""Lenses: each turns a residual vector at a named hook point into vocabulary logits.

``logit.py`` (the logit lens), ``tuned/`` (the tuned lens, Belrose et al. 2023),
``attribute/`` (the attribute lens with linear relational embeddings, Hernandez et al. 2024).
Every lens is a :class:`~tl_lenses.readout.lens.Lens` read by the shared readout;
``tl_hook.py`` plugs any of them into TransformerLens 4.x's ``logit_lens(..., lens=)``.
"""

from tl_lenses.lenses.logit import LogitLens, logit_lens
from tl_lenses.lenses.tl_hook import tl_lens_hook
from tl_lenses.readout.lens import Lens

__all__ = ["Lens", "LogitLens", "logit_lens", "tl_lens_hook"]
