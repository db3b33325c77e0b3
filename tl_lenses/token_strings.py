"""Token ids as strings, as ``model.to_str_tokens`` gives them, each id decoded once.

Results carry their prompts' tokens as strings for their views. Decoding them each call
cost DLA on 16 x 256 tokens a third of its time, so each distinct id is decoded once per
tokenizer (:func:`token_pieces`), and a result may hold a :class:`TokenStrings`, which
decodes on first use.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from torch import Tensor


def str_tokens(model, tokens: Tensor) -> list[list[str]]:
    """Each prompt's tokens as strings (token ids as text when the model has no tokenizer).

    The same strings as ``model.to_str_tokens(row)`` (each id decoded alone, no clean-up),
    but each distinct id is decoded once per tokenizer (:func:`token_pieces`).
    """
    return _decode_rows(getattr(model, "tokenizer", None), tokens)


def _decode_rows(tokenizer, tokens: Tensor) -> list[list[str]]:
    rows = tokens.tolist()
    if tokenizer is None:
        return [[str(t) for t in row] for row in rows]
    # the distinct ids from the rows already in hand (torch.unique costs more for a prompt)
    piece = token_pieces(tokenizer, set().union(*rows)).__getitem__
    return [list(map(piece, row)) for row in rows]


# tokenizer -> ((vocabulary size, id of its Rust core), {id: string}): what was decoded.
_PIECES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def token_pieces(tokenizer, ids) -> dict[int, str]:
    """A table holding each of ``ids`` decoded alone (no clean-up), as ``to_str_tokens`` does.

    Strings are kept per tokenizer (held weakly); only new ids are decoded, in one batch
    through a fast tokenizer's Rust core. The table is dropped when the vocabulary size or
    the Rust core object changes (a decoder edited in place is not noticed).
    """
    core = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) \
        else None
    try:
        key = (len(tokenizer), id(core))
        known = _PIECES.get(tokenizer)
        if known is None or known[0] != key:
            known = _PIECES[tokenizer] = (key, {})
        table = known[1]
    except TypeError:  # an unsized, unhashable or not weakly referable tokenizer
        table = {}
    missing = sorted(set(ids).difference(table))
    if missing and core is not None and hasattr(core, "decode_batch"):
        table.update(zip(missing, core.decode_batch([[i] for i in missing],
                                                    skip_special_tokens=False)))
    elif missing:
        table.update(zip(missing, tokenizer.batch_decode([[i] for i in missing],
                                                         clean_up_tokenization_spaces=False)))
    return table


class TokenStrings(Sequence):
    """``str_tokens(model, tokens)``, decoded when first read (rows counted without it).

    A sequence of rows of strings; equal to the list :func:`str_tokens` gives. It keeps
    ``tokens`` and the model's tokenizer (not the model).
    """

    def __init__(self, model, tokens: Tensor):
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            raise TypeError(f"tokens must be int token ids shaped [batch, pos], got "
                            f"{type(tokens).__name__} {getattr(tokens, 'shape', '')}")
        self._tokenizer = getattr(model, "tokenizer", None)
        self._tokens = tokens
        self._rows: list[list[str]] | None = None

    def _decoded(self) -> list[list[str]]:
        if self._rows is None:
            self._rows = _decode_rows(self._tokenizer, self._tokens)
        return self._rows

    def __getitem__(self, index):
        return self._decoded()[index]

    def __len__(self) -> int:
        return len(self._tokens)

    def __eq__(self, other) -> bool:
        if isinstance(other, TokenStrings):
            other = other._decoded()
        return isinstance(other, (list, tuple)) and self._decoded() == list(other)

    __hash__ = None  # mutable-looking like the list it stands for

    def __repr__(self) -> str:
        return repr(self._decoded())


__all__ = ["str_tokens", "token_pieces", "TokenStrings"]
