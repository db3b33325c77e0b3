"""The logit lens: decode every layer and position through the final norm and unembedding."""

from __future__ import annotations

from tl_lenses.lenses.apply import apply_lens
from tl_lenses.lenses.base import LogitLens
from tl_lenses.result import LensResult


def logit_lens(model, input, **kwargs) -> LensResult:
    """The logit lens of ``input`` at every residual-stream layer and position.

    Each layer's residual is re-normalised with its own statistics, then unembedded
    (``+ b_U``). Keyword arguments: ``hook_names`` or ``layers`` and ``incl_mid`` (which
    rows), ``positions``, ``k`` (top-k, default 5), ``target`` (``"final"`` (default): the
    final layer's top-1; ``"next"``: the true next token; a one-token string or id; or
    None), ``chunk_size``, ``keep_logits``, ``progress``.

    >>> result = logit_lens(model, "The capital of France is")     # doctest: +SKIP
    >>> result.top_tokens()[-1][-1][0]                                # doctest: +SKIP
    ' Paris'
    """
    return apply_lens(model, input, LogitLens(), **kwargs)
