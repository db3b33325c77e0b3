"""Lenses: each turns a residual vector at a named hook point into vocabulary logits."""

from tl_lenses.lenses.base import Lens, LogitLens

__all__ = ["Lens", "LogitLens"]
