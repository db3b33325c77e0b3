"""Turning what users pass (text, a list of texts, token ids) into checked token batches."""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from tl_lenses.devices import model_device


def decode_each(tokenizer, ids) -> list[str]:
    """Each token id (a list or 1-d tensor) as its own string; the id itself without a tokenizer."""
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    if tokenizer is None:
        return [str(i) for i in ids]
    return [tokenizer.decode([i]) for i in ids]


def require_tokenizer(model, *, argument: str = "model") -> None:
    """Raise ValueError naming ``argument`` unless ``model`` has a tokenizer."""
    if getattr(model, "tokenizer", None) is None:
        raise ValueError(
            f"{argument} has no tokenizer, so text cannot be tokenized or tokens shown; "
            f"pass token ids, or set one with {argument}.set_tokenizer(...)"
        )


def to_tokens(model, input, *, argument: str = "input") -> Int[Tensor, "batch pos"]:
    """Tokens for ``input``: a string, a list of strings (right-padded) or an int tensor.

    Prompts are tokenized as the model's config says (``default_prepend_bos``), so a lens
    sees the same tokens as ``model(input)``. The tokens come back on the model's device,
    wherever a given tensor was.
    """
    if isinstance(input, str) or (
        isinstance(input, (list, tuple)) and all(isinstance(x, str) for x in input)
    ):
        texts = [input] if isinstance(input, str) else list(input)
        if not texts or any(text == "" for text in texts):
            raise ValueError(f"{argument} must be non-empty text, got {input!r}")
        require_tokenizer(model)
        # truncate=False: TL would silently cut a prompt longer than n_ctx.
        tokens = model.to_tokens(texts, padding_side="right", truncate=False)
    elif isinstance(input, Tensor):
        tokens = input.unsqueeze(0) if input.dim() == 1 else input
        if tokens.dim() != 2 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(
                f"{argument} as a tensor must hold int token ids shaped [pos] or [batch, pos], "
                f"got dtype {input.dtype} and shape {tuple(input.shape)}"
            )
        d_vocab = model.cfg.d_vocab
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= d_vocab):
            raise ValueError(f"{argument} has token ids outside [0, {d_vocab})")
    else:
        raise TypeError(
            f"{argument} must be a string, a list of strings or a tensor of token ids, "
            f"got {type(input).__name__}"
        )
    return _check_length(model, tokens, argument)


def _check_length(model, tokens: Tensor, argument: str) -> Tensor:
    if tokens.shape[-1] == 0:
        raise ValueError(f"{argument} has no tokens")
    n_ctx = model.cfg.n_ctx
    if tokens.shape[-1] > n_ctx:
        raise ValueError(
            f"{argument} is {tokens.shape[-1]} tokens long, more than the model's n_ctx={n_ctx}"
        )
    return tokens.to(model_device(model))


def single_token(model, token, *, argument: str = "target") -> int:
    """The id of a token given as an id or as text that must tokenize to exactly one token."""
    if isinstance(token, bool):
        raise TypeError(f"{argument} must be a token id or a one-token string, got a bool")
    if isinstance(token, int):
        if not 0 <= token < model.cfg.d_vocab:
            raise ValueError(f"{argument} id {token} is outside [0, {model.cfg.d_vocab})")
        return token
    if not isinstance(token, str):
        raise TypeError(f"{argument} must be a token id or a one-token string, got {token!r}")
    require_tokenizer(model)
    ids = model.to_tokens(token, prepend_bos=False)[0].tolist()
    if len(ids) != 1:
        pieces = [model.to_string([i]) for i in ids]
        raise ValueError(
            f"{argument} {token!r} is {len(ids)} tokens {pieces}, not one; pass a single token "
            "(mind the leading space: ' Paris' and 'Paris' differ)"
        )
    return ids[0]


def str_tokens(model, tokens: Tensor) -> list[list[str]]:
    """Each prompt's tokens as strings (token ids as text when the model has no tokenizer).

    The same strings as ``model.to_str_tokens(row)`` (each id decoded alone, no clean-up),
    but each distinct id is decoded once, in one batch through a fast tokenizer's Rust core:
    decoding 64 x 1024 ids one by one in Python costs about as long as a GPU lens readout.
    """
    rows = tokens.tolist()
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return [[str(t) for t in row] for row in rows]
    unique = sorted({i for row in rows for i in row})
    core = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) \
        else None
    if core is not None and hasattr(core, "decode_batch"):
        pieces = core.decode_batch([[i] for i in unique], skip_special_tokens=False)
    else:
        pieces = tokenizer.batch_decode([[i] for i in unique],
                                        clean_up_tokenization_spaces=False)
    table = dict(zip(unique, pieces))
    return [[table[i] for i in row] for row in rows]
