"""The axis vocabulary of tl_lenses, declared once.

Every public signature spells its shapes with these names (TransformerLens's own), and the
test run checks them at runtime (jaxtyping + beartype). The same names appear in einops
patterns.

====================  ===========================================================
axis                  meaning
====================  ===========================================================
``batch``             prompts in a batch
``pos``               token positions (query / destination side); in a lens result,
                      the positions that were read (``_`` marks a prompt's full length)
``src_pos``           source (key) positions of an attention head
``layer``             rows of a lens readout: one per hook point decoded
``d_model``           residual-stream width
``d_vocab``           vocabulary size
``d_mlp``             MLP hidden width (neurons)
``head_index``        attention heads of one layer
``k``                 the k of a top-k
``component``         residual-stream writers in an attribution (heads, MLPs, ...)
``direction``         logit directions of an attribution (a token, a difference, a vector)
``source``            earlier components feeding a head's values in a head-path DLA
====================  ===========================================================
"""

from __future__ import annotations

import numbers
from typing import Union

from jaxtyping import Float, Int
from torch import Tensor

Resid = Float[Tensor, "batch pos d_model"]
ResidStack = Float[Tensor, "layer batch pos d_model"]
Logits = Float[Tensor, "batch pos d_vocab"]
Tokens = Int[Tensor, "batch pos"]
PerPosition = Float[Tensor, "batch pos"]
PerLayerPosition = Float[Tensor, "layer batch pos"]
# What a layer, position, token id or head argument takes: an int, a numpy integer or a
# 0-d int tensor (read with tl_lenses._ints.as_int; a bool is refused there).
IntLike = Union[int, numbers.Integral, Int[Tensor, ""]]

__all__ = [
    "Resid",
    "ResidStack",
    "Logits",
    "Tokens",
    "PerPosition",
    "PerLayerPosition",
    "IntLike",
]
