"""Logit directions for DLA: which logit (or logit difference, or vector) is attributed.

A direction ``u`` is read off the final norm's output: ``value = norm(resid) · vector +
offset``; :func:`residual_readout` folds the norm's weight, bias and centering into it so
that ``logit = resid_final · u / s + c`` with the norm's scale ``s`` frozen (see
:mod:`tl_lenses.attribution.core`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Union

import torch
from jaxtyping import Float
from torch import Tensor

from tl_lenses._ints import as_int
from tl_lenses.inputs import single_token, token_pieces
from tl_lenses.models import check_model
from tl_lenses.readout.unembed import Unembed


@dataclass(frozen=True, eq=False)  # fields hold tensors: == compares identity
class LogitDirections:
    """Directions read off the final norm's output: ``value = norm(resid) · vector + offset``.

    A token's direction is its W_U column with ``offset = b_U[token]``; an answer-minus-wrong
    direction is the difference of both; a free vector has offset 0.
    """

    vectors: Float[Tensor, "direction d_model"]
    offset: Float[Tensor, " direction"]
    labels: list[str]
    # (answer, wrong) token ids per direction (wrong = -1 for one token's logit; None for a
    # free vector): what a soft-capped model's own capped value is computed from.
    token_pairs: tuple[tuple[int, int] | None, ...] | None = None

    def __len__(self) -> int:
        return len(self.labels)


DirectionSpec = Union[str, int, tuple, Tensor, LogitDirections, list]


def logit_directions(model, directions: DirectionSpec, *,
                     unembed: Unembed | None = None) -> LogitDirections:
    """Parse ``directions`` into :class:`LogitDirections`.

    Accepted: a one-token string or a token id (that token's logit); a pair
    ``(answer, wrong)`` (the logit difference); a float tensor ``[d_model]`` or
    ``[n, d_model]`` (vectors multiplying the final norm's output, e.g. W_U columns); or a
    list of any of these for several directions at once. Note the list/tuple distinction:
    ``[" Mary", " John"]`` is two directions, ``(" Mary", " John")`` their difference.
    ``unembed``: the model's :class:`Unembed` when the caller has read it already (reading
    it checks the model and ``b_U`` for zeros, a pass over the vocabulary).
    """
    if unembed is None:
        check_model(model)
    if isinstance(directions, LogitDirections):
        _check_width(model, directions.vectors)
        return directions
    items = directions if isinstance(directions, list) else [directions]
    if not items:
        raise ValueError("directions must name at least one direction")
    unembed = unembed if unembed is not None else Unembed.from_model(model)
    # Token specs parsed before (DLA over many prompts names the same answers each call):
    # tokenizing and labelling them was a tenth of a small DLA's time.
    spec = _spec_key(directions)
    known = None if spec is None else _known_tokens(model, unembed, spec)
    if known is not None:
        return _token_directions(unembed, *known)
    parts = [_one_direction(model, unembed, item, i) for i, item in enumerate(items)]
    if len(parts) == 1:  # the usual case: no concatenation (the parts are fresh tensors)
        vectors, offset, labels, pairs = parts[0]
        dirs = LogitDirections(_float32(vectors), _float32(offset), list(labels), tuple(pairs))
    else:
        dirs = LogitDirections(
            torch.cat([p[0] for p in parts]).float(),
            torch.cat([p[1] for p in parts]).float(),
            [label for p in parts for label in p[2]],
            tuple(pair for p in parts for pair in p[3]),
        )
    if spec is not None:
        _remember(model, unembed, spec, dirs)
    return dirs


def _token_label(model, token: int, *more: int) -> str:
    """``repr`` of each token's string (``#id`` without a tokenizer), joined by " - "."""
    tokens = (token, *more)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return " - ".join(f"#{t}" for t in tokens)
    pieces = token_pieces(tokenizer, tokens)  # model.to_string([token]), memoised
    return " - ".join(repr(pieces[t]) for t in tokens)


def _one_direction(model, unembed: Unembed, item, i: int):
    """(vectors [n, d_model], offsets [n], labels, token pairs) of one direction spec.

    The tensors are fresh (never views of the model's weights or the user's tensor), so
    :class:`LogitDirections` may hold them without a copy.
    """
    W_U = unembed.W_U.detach()
    if isinstance(item, Tensor) and item.is_floating_point():
        vectors = item[None] if item.dim() == 1 else item
        _check_width(model, vectors, shape=tuple(item.shape))
        vectors = vectors.detach().to(W_U.device, W_U.dtype, copy=True)
        labels = [f"v{i}"] if item.dim() == 1 else [f"v{i}.{j}" for j in range(len(vectors))]
        return vectors, torch.zeros(len(vectors), device=W_U.device), labels, [None] * len(labels)
    if isinstance(item, tuple):
        if len(item) != 2:
            raise ValueError(f"a direction tuple must be (answer, wrong), got {item!r}")
        a = _output_token(model, unembed, item[0], "answer")
        b = _output_token(model, unembed, item[1], "wrong")
        if a == b:
            raise ValueError(
                f"answer and wrong are the same token ({_token_label(model, a)}); their logit "
                "difference is identically 0"
            )
        label = _token_label(model, a, b)
        offset = _bias(unembed, a) - _bias(unembed, b)
        # select: the cheapest column read (a view); the difference is a new tensor
        return (W_U.select(1, a) - W_U.select(1, b)).unsqueeze(0), offset, [label], [(a, b)]
    token = _output_token(model, unembed, item, "directions")
    return W_U.select(1, token)[None].clone(), _bias(unembed, token).clone(), \
        [_token_label(model, token)], [(token, -1)]


def _bias(unembed: Unembed, token: int) -> Float[Tensor, " 1"]:
    """``b_U[token]`` as a one-element tensor (a view; zero where the model has no ``b_U``)."""
    if unembed.b_U is None:
        return torch.zeros(1, device=unembed.W_U.device)
    return unembed.b_U.detach().narrow(0, token, 1)


def _output_token(model, unembed: Unembed, token, argument: str) -> int:
    """A token id of the *output* vocabulary (``d_vocab_out`` may differ from the input's)."""
    value = as_int(token)  # an int, a numpy integer or a 0-d int tensor (answer_tokens[i])
    if value is not None:
        if not 0 <= value < unembed.d_vocab:
            raise ValueError(f"{argument} id {value} is outside the output vocabulary "
                             f"[0, {unembed.d_vocab})")
        return value
    if isinstance(token, Tensor):
        raise TypeError(
            f"{argument}: a {token.dtype} tensor of shape {tuple(token.shape)} is neither "
            f"a token id (an int or a 0-d int tensor) nor a direction vector (a float "
            f"tensor [d_model] or [n, d_model])")
    return single_token(model, token, argument=argument, vocab=unembed.d_vocab)


def _float32(tensor: Tensor) -> Tensor:
    """``tensor.float()``, without a dispatch when it is float32 already (DLA's hot path)."""
    return tensor if tensor.dtype == torch.float32 else tensor.float()


def _check_width(model, vectors: Tensor, shape: tuple | None = None) -> None:
    """Refuse anything but float ``[n, d_model]`` (``shape``: as the user gave it)."""
    d_model = model.cfg.d_model
    if vectors.dim() != 2 or vectors.shape[-1] != d_model or not vectors.is_floating_point():
        raise ValueError(
            f"direction vectors must be float [d_model={d_model}] or [n, d_model], got "
            f"{vectors.dtype} {shape or tuple(vectors.shape)}"
        )


def residual_readout(
    model, directions: LogitDirections, *, unembed: Unembed | None = None
) -> tuple[Float[Tensor, "d_model direction"], Float[Tensor, " direction"]]:
    """``(u, c)`` with ``logit = resid_final · u / s + c`` under the frozen-scale convention.

    Folds the final norm's weight into ``u``, its bias into ``c``, and LayerNorm's centering
    into ``u`` (centering the direction equals centering every component). ``unembed``: as
    in :func:`logit_directions`.
    """
    unembed = unembed if unembed is not None else Unembed.from_model(model)
    vectors = directions.vectors
    if vectors.device != unembed.W_U.device or vectors.dtype != torch.float32:
        vectors = vectors.to(unembed.W_U.device, torch.float32)
    if unembed.weight is not None:
        u = vectors.T * _float32(unembed.weight.detach()).unsqueeze(1)   # a new tensor
    else:
        u = vectors.T.clone()
    const = directions.offset.to(u.device, torch.float32, copy=True)
    if unembed.bias is not None:
        const = const + vectors @ unembed.bias.detach().float()
    if unembed.kind == "layernorm":
        u = u - u.mean(0, keepdim=True)
    return u, const


# Token directions remembered per model (see _known_tokens): a notebook's few answer pairs.
MAX_REMEMBERED = 64
# model -> (weak reference to its tokenizer, (tokenizer length, output vocabulary),
#           {spec key: (token pairs, labels)})
_TOKENS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _spec_key(directions) -> tuple | None:
    """A hashable key of a spec made of ints and strings only, else None (parsed each call).

    ``type(x) is int``: a bool (refused by parsing) never passes as the int it equals; a
    list and a tuple (several directions, a difference) get different keys.
    """
    if isinstance(directions, list):
        items = tuple(map(_item_key, directions))
        return None if not items or None in items else ("list", items)
    item = _item_key(directions)
    return None if item is None else ("one", item)


def _item_key(item):
    if type(item) in (int, str):
        return item
    if type(item) is tuple and all(type(x) in (int, str) for x in item):
        return item
    return None


def _known_tokens(model, unembed: Unembed, spec: tuple) -> tuple | None:
    """``(token pairs, labels)`` parsed earlier for ``spec`` on this model, or None.

    Parsing (tokenizing strings, checking ids, decoding labels) depends on the tokenizer
    and the output vocabulary only: remembered while the tokenizer is the same object of
    the same length and the vocabulary the same size. The vectors are read off ``W_U``
    every call, so an edit of the weights (in place or not) is always seen.
    """
    tokens = _TOKENS.get(model)
    if tokens is None or tokens[1] != _parse_state(model, unembed):
        return None
    if tokens[0]() is not getattr(model, "tokenizer", None):
        return None
    return tokens[2].get(spec)


def _remember(model, unembed: Unembed, spec: tuple, dirs: LogitDirections) -> None:
    tokenizer, state = getattr(model, "tokenizer", None), _parse_state(model, unembed)
    if state is None:
        return
    tokens = _TOKENS.get(model)
    if tokens is None or tokens[1] != state or tokens[0]() is not tokenizer:
        try:
            tokens = _TOKENS[model] = (_weak(tokenizer), state, {})
        except TypeError:  # a model or tokenizer that can't be weakly referenced: parse each call
            return
    if len(tokens[2]) >= MAX_REMEMBERED:
        del tokens[2][next(iter(tokens[2]))]   # the oldest
    tokens[2][spec] = (dirs.token_pairs, tuple(dirs.labels))


def _parse_state(model, unembed: Unembed) -> tuple | None:
    """What a parse depends on besides the tokenizer's identity (None: not rememberable)."""
    tokenizer = getattr(model, "tokenizer", None)
    try:
        return (None if tokenizer is None else len(tokenizer), unembed.d_vocab)
    except TypeError:  # an unsized tokenizer: its changes can't be seen
        return None


def _weak(obj):
    """A weak reference to ``obj`` (a callable returning None for None)."""
    return _none if obj is None else weakref.ref(obj)


def _none() -> None:
    return None


def _token_directions(unembed: Unembed, pairs: tuple, labels: tuple) -> LogitDirections:
    """:class:`LogitDirections` of known token pairs (``(a, -1)``: token a's own logit).

    The same arithmetic as :func:`_one_direction`'s, so the same numbers bit for bit.
    """
    W_U = unembed.W_U.detach()
    vectors, offsets = [], []
    for a, b in pairs:
        if b < 0:
            vectors.append(W_U.select(1, a))
            offsets.append(_bias(unembed, a))
        else:
            vectors.append(W_U.select(1, a) - W_U.select(1, b))
            offsets.append(_bias(unembed, a) - _bias(unembed, b))
    if len(pairs) == 1 and pairs[0][1] >= 0:  # the usual case: the difference is fresh
        return LogitDirections(_float32(vectors[0].unsqueeze(0)), _float32(offsets[0]),
                               list(labels), pairs)
    return LogitDirections(torch.stack(vectors).float(), torch.cat(offsets).float(),
                           list(labels), pairs)


__all__ = ["DirectionSpec", "LogitDirections", "logit_directions", "residual_readout"]
