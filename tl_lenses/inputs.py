"""Turning what users pass (text, a list of texts, token ids) into checked token batches."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_lenses._ints import as_int, as_ints, ids_as_tensor
from tl_lenses.devices import model_device
from tl_lenses.token_strings import TokenStrings, str_tokens, token_pieces  # noqa: F401


def decode_each(tokenizer, ids) -> list[str]:
    """Each token id (a list or 1-d tensor) as its own string.

    The id itself without a tokenizer; "" for -1 (no token: a pad cell, a non-finite one).
    """
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    if tokenizer is None:
        return [str(i) if i >= 0 else "" for i in ids]
    return [tokenizer.decode([i]) if i >= 0 else "" for i in ids]


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
    wherever a given tensor was. For unequal prompts use :func:`to_batch`, which also says
    which cells are padding.
    """
    return to_batch(model, input, padding_side="right", argument=argument).tokens


def one_prompt(model, input, *, argument: str = "prompt") -> Int[Tensor, "1 pos"]:
    """Tokens ``[1, pos]`` of one prompt (text or ids).

    Raises:
        ValueError: naming ``argument``, for several prompts (never silently cut to one).
    """
    tokens = to_tokens(model, input, argument=argument)
    if tokens.shape[0] != 1:
        raise ValueError(f"{argument} must be one prompt, got {tokens.shape[0]}; run "
                         "several one at a time (or use the sweep)")
    return tokens


def to_batch(
    model, input, *, padding_side: str | None = None,
    attention_mask: Int[Tensor, "batch pos"] | Bool[Tensor, "batch pos"] | None = None,
    argument: str = "input", device: torch.device | None = None,
) -> "Batch":
    """A checked :class:`Batch` (tokens + attention mask) for what a user passes.

    Args:
        model: a HookedTransformer or TransformerBridge.
        input: a string, a list of strings, token ids ``[pos]`` or ``[batch, pos]`` (an
            int tensor, a numpy int array, a list of ints or equal lists of ints), or a
            :class:`Batch` (returned as it is).
        padding_side: ``"right"`` or ``"left"`` for a list of strings; None takes the
            tokenizer's setting (TL's ``padding_side``), else right. With token ids and a
            mask, the side is read off the mask (and must agree when given).
        attention_mask: for token ids only: 1 (or True) marks a prompt's tokens, 0 its
            padding; each row one contiguous run of real tokens at one side. None: every
            cell is a token.
        argument: the name used in error messages.
        device: the model's device when the caller has checked it already (None: found
            with :func:`~tl_lenses.devices.model_device`, a walk over every parameter).

    Returns:
        The batch; every prompt tokenized alone (so its tokens equal the prompt's own),
        then padded with the pad id on ``padding_side``.

    Raises:
        ValueError: empty text, ids outside the vocabulary, a prompt longer than n_ctx, a
            mask with the wrong shape, gaps or an empty row, a mask with text, or a
            ``padding_side`` that is neither side or contradicts the mask.
        TypeError: an input of another type.
    """
    if isinstance(input, Batch):
        if attention_mask is not None or padding_side not in (None, input.padding_side):
            raise ValueError(f"{argument} is a Batch, which has its own attention_mask and "
                             "padding_side: pass neither")
        return input
    if padding_side is not None and padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES} or None, got "
                         f"{padding_side!r}")
    if isinstance(input, str) or (
        isinstance(input, (list, tuple)) and all(isinstance(x, str) for x in input)
    ):
        if attention_mask is not None:
            raise ValueError(f"attention_mask is only for token ids: {argument} is text, "
                             "whose padding tl_lenses makes itself (choose padding_side=)")
        return _text_batch(model, [input] if isinstance(input, str) else list(input),
                           padding_side or _tokenizer_side(model), argument, device)
    if not isinstance(input, Tensor) and (ids := ids_as_tensor(input, argument)) is not None:
        input = ids  # a numpy array or nested lists of ids: checked as a tensor below
    if isinstance(input, Tensor):
        tokens = input.unsqueeze(0) if input.dim() == 1 else input
        if tokens.dim() != 2 or tokens.dtype.is_floating_point or tokens.dtype.is_complex \
                or tokens.dtype == torch.bool:
            raise ValueError(
                f"{argument} as a tensor must hold int token ids shaped [pos] or [batch, pos], "
                f"got dtype {input.dtype} and shape {tuple(input.shape)}"
            )
        if tokens.dtype != torch.long:  # uint8, int16...: the embedding takes int64 (int32)
            tokens = tokens.long()
        check_ids(model, tokens, argument)
        tokens = _check_length(model, tokens, argument, device)
        if attention_mask is None:
            batch = Batch(tokens, torch.ones_like(tokens, dtype=torch.bool),
                          padding_side or _tokenizer_side(model))
            batch.__dict__["padded"] = False  # known: spare the cached property its pass
            return batch
        return Batch(tokens, *_check_mask(tokens, attention_mask, padding_side))
    raise TypeError(
        f"{argument} must be a string, a list of strings, token ids (a tensor, a numpy array "
        f"or lists of ints) or a Batch, got {type(input).__name__}"
    )



def check_ids(model, ids: Tensor, argument: str, *, allow_none: bool = False,
              vocab: int | None = None) -> None:
    """Fail unless every id is in ``[0, vocab)`` (or -1, "none", with ``allow_none``).

    ``vocab``: as in :func:`single_token` (None: the input vocabulary, ``d_vocab``).
    """
    d_vocab, low = model.cfg.d_vocab if vocab is None else vocab, -1 if allow_none else 0
    if not ids.numel():
        return
    smallest, largest = ids.aminmax()  # one pass (a DLA call's tokens are checked each time)
    if int(smallest) < low or int(largest) >= d_vocab:
        bad = ids[(ids < low) | (ids >= d_vocab)].flatten()[:5].tolist()
        none = " (or -1 for none)" if allow_none else ""
        raise ValueError(f"{argument} has token ids outside [0, {d_vocab}){none}: {bad}")


def _tokenizer_side(model) -> str:
    side = getattr(getattr(model, "tokenizer", None), "padding_side", None)
    return side if side in PADDING_SIDES else "right"


def _text_batch(model, texts: list[str], side: str, argument: str,
                device: torch.device | None) -> "Batch":
    if not texts or any(text == "" for text in texts):
        raise ValueError(f"{argument} must be non-empty text, got {texts!r}")
    require_tokenizer(model)
    # Each prompt alone: its tokens are exactly those of the prompt run by itself.
    # truncate=False: TL would silently cut a prompt longer than n_ctx.
    device = device or model_device(model)
    rows = [_check_length(model, model.to_tokens(text, truncate=False), argument, device)[0]
            for text in texts]
    width = max(len(row) for row in rows)
    tokens = torch.full((len(rows), width), _pad_id(model), dtype=torch.long,
                        device=rows[0].device)
    mask = torch.zeros(len(rows), width, dtype=torch.bool, device=rows[0].device)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        tokens[i, span], mask[i, span] = row, True
    return Batch(tokens, mask, side)


def _pad_id(model) -> int:
    tokenizer = model.tokenizer
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if pad is not None:
            return int(pad)
    return 0


def _check_mask(tokens: Tensor, mask, side: str | None) -> tuple[Tensor, str]:
    """(a bool mask, the padding side it shows, which must agree with ``side`` if given)."""
    if not isinstance(mask, Tensor) or mask.shape != tokens.shape or mask.is_floating_point():
        # the dtype too: a float mask of the right shape read "got (1, 8)" for (1, 8)
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) \
            else type(mask).__name__
        raise ValueError(
            f"attention_mask must be an int or bool tensor shaped like the tokens "
            f"{tuple(tokens.shape)}, got {got}"
        )
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("attention_mask must hold only 0 and 1")
    mask = mask.to(tokens.device).bool()
    if not mask.any(1).all():
        raise ValueError("attention_mask has a row without any token")
    as_int = mask.int()
    right = bool((as_int[:, 1:] <= as_int[:, :-1]).all())   # 1...1 0...0 in every row
    left = bool((as_int[:, 1:] >= as_int[:, :-1]).all())    # 0...0 1...1
    if not (right or left):
        raise ValueError("attention_mask must mark each prompt's tokens as one contiguous "
                         "run at the same side of every row (right or left padding)")
    if right and left:  # no padding at all: either side
        return mask, side or "right"
    shown = "right" if right else "left"
    if side not in (None, shown):
        raise ValueError(f"padding_side={side!r} contradicts attention_mask, which pads on "
                         f"the {shown}")
    return mask, shown


def _check_length(model, tokens: Tensor, argument: str,
                  device: torch.device | None = None) -> Tensor:
    if tokens.shape[-1] == 0:
        raise ValueError(f"{argument} has no tokens")
    n_ctx = model.cfg.n_ctx
    if tokens.shape[-1] > n_ctx:
        raise ValueError(
            f"{argument} is {tokens.shape[-1]} tokens long, more than the model's n_ctx={n_ctx}"
        )
    return tokens.to(device or model_device(model))


def single_token(model, token, *, argument: str = "target", vocab: int | None = None) -> int:
    """The id of a token given as an id or as text that must tokenize to exactly one token.

    ``vocab``: ids allowed, ``[0, vocab)`` (None: ``d_vocab``); a token read off the logits
    passes the output vocabulary's (``d_vocab_out`` may differ, as in TL's toy models).
    """
    if isinstance(token, bool):
        raise TypeError(f"{argument} must be a token id or a one-token string, got a bool")
    vocab = model.cfg.d_vocab if vocab is None else vocab
    if (value := as_int(token)) is not None:  # an int, a numpy integer or a 0-d int tensor
        token = value
        if not 0 <= token < vocab:
            raise ValueError(f"{argument} id {token} is outside [0, {vocab})"
                             f"{'' if vocab == model.cfg.d_vocab else ' (the output vocabulary)'}")
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
    if ids[0] >= vocab:
        raise ValueError(f"{argument} {token!r} is token {ids[0]}, outside the model's output "
                         f"vocabulary [0, {vocab}): no logit reads it")
    return ids[0]


PADDING_SIDES = ("right", "left")


@dataclass(frozen=True)
class Batch:
    """Token ids with their attention mask: which cells hold a prompt's tokens, which padding.

    Each prompt's real tokens are one contiguous run: from column 0 (right padding) or up to
    the last column (left padding). Methods index positions *within each prompt*, so a
    prompt reads the same tokens, and gets the same numbers, in a batch as alone.
    """

    tokens: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    padding_side: str = "right"

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        """Each prompt's number of real tokens."""
        return self.mask.sum(1)

    @property
    def offsets(self) -> Int[Tensor, " batch"]:
        """The column of each prompt's first real token (0 unless left-padded)."""
        if self.padding_side == "left":
            return self.tokens.shape[1] - self.lengths
        return torch.zeros_like(self.lengths)

    @functools.cached_property
    def padded(self) -> bool:
        """Whether any cell is padding (read once: a Batch is immutable)."""
        return not bool(self.mask.all())

    def last(self) -> Int[Tensor, " batch"]:
        """The column of each prompt's last real token."""
        return self.offsets + self.lengths - 1

    def forward_kwargs(self, model) -> dict:
        """Keyword arguments for ``model(...)``/``run_with_cache``/``run_with_hooks``.

        The attention mask goes to the model whenever there is padding (TL then also
        derives each prompt's positions from it, for learned and rotary positions alike),
        and whenever the tokenizer pads on the left: TL would otherwise rebuild a mask from
        the pad id, which may also be a real token (BOS = EOS = pad in many vocabularies).
        """
        tokenizer = getattr(model, "tokenizer", None)
        if self.padded or getattr(tokenizer, "padding_side", "right") == "left":
            return {"attention_mask": self.mask.long()}
        return {}

    def select(self, positions, *, argument: str = "positions") -> Selection:
        """Per-prompt columns for ``positions`` counted within each prompt.

        ``None``: every position of the longest prompt; an int or a list of ints, where a
        negative one counts back from each prompt's own last token (-1 is every prompt's
        last real token). A position a shorter prompt lacks is a masked cell.

        Raises:
            TypeError: naming ``argument``, for anything but None, an int or a list of ints
                (a float, a string such as ``"last"``: use -1).
            ValueError: naming ``argument``, for an empty list or a position out of range.
        """
        padded = self.padded
        longest = int(self.lengths.max()) if padded else self.tokens.shape[1]
        if positions is None:
            wanted = list(range(longest))
        else:
            wanted = as_ints(positions)  # ints, numpy integers and 0-d int tensors alike
            if wanted is None:
                raise TypeError(f"{argument} must be None, an int or a list of ints (-1 = the "
                                f"last token), got {positions!r}")
            bad = [p for p in wanted
                   if isinstance(p, bool) or not isinstance(p, int) or not -longest <= p < longest]
            if bad or not wanted:
                one = as_int(positions) is not None
                raise ValueError(f"{argument} must {'be in' if one else 'be non-empty ints in'} "
                                 f"[-{longest}, {longest}) (the longest prompt's length), got "
                                 f"{positions if one else bad or wanted}")
        return (self._per_prompt if padded else self._shared)(wanted, longest)

    def _per_prompt(self, wanted: list[int], longest: int) -> Selection:
        """Each prompt's own columns for ``wanted`` (the general case: padding)."""
        requested = torch.tensor(wanted, device=self.tokens.device)
        lengths = self.lengths[:, None]
        within = torch.where(requested < 0, requested + lengths, requested)   # [batch, n]
        mask = (within >= 0) & (within < lengths)
        columns = self.offsets[:, None] + within.clamp(min=0).minimum(lengths - 1)
        # A negative position counts back from each prompt's own end, which is another
        # column per prompt: it keeps its sign (p % longest would name the longest's).
        labels = [p if p < 0 and self.padded else p % longest for p in wanted]
        return Selection(labels, columns, mask)

    def _shared(self, wanted: list[int], longest: int) -> Selection:
        """What :meth:`_per_prompt` gives for an unpadded batch, in three tensor ops."""
        positions = [p % longest for p in wanted]
        columns = torch.tensor([positions] * self.tokens.shape[0], device=self.tokens.device)
        selection = Selection(positions, columns, torch.ones_like(columns, dtype=torch.bool))
        selection.__dict__["complete"] = True  # known here: no pass over the mask
        if positions == list(range(positions[0], positions[0] + len(positions))):
            # known here: spare Selection._shared_run its pass over the columns
            selection.__dict__["_shared_run"] = slice(positions[0], positions[0] + len(positions))
        return selection


@dataclass(frozen=True)
class Selection:
    """Positions read from a batch, per prompt.

    ``positions`` label what was read, within each prompt: an unpadded batch's are
    non-negative; a padded batch keeps a negative one (-1: each prompt's own last token,
    a different column per prompt). ``columns[b, i]`` is the token (column of the padded
    tokens) prompt ``b`` reads for ``positions[i]``; ``mask[b, i]`` is False where prompt
    ``b`` has no such token (it is shorter), and ``columns`` then points at one of its
    tokens so gathers stay in range.
    """

    positions: list[int]
    columns: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]

    def gather(self, values: Float[Tensor, "batch full *rest"]) -> Float[Tensor, "batch pos *rest"]:
        """``values`` at the selected columns of each prompt.

        A view (no copy) where every prompt reads the same run of consecutive columns (an
        unpadded batch, e.g. the last position); callers must not write into the result.
        """
        if self._shared_run is not None:
            return values[:, self._shared_run]
        index = self.columns.to(values.device)
        index = index.view(*index.shape, *([1] * (values.dim() - 2)))
        return values.gather(1, index.expand(-1, -1, *values.shape[2:]))

    @functools.cached_property
    def complete(self) -> bool:
        """Whether every prompt has every selected position (no masked cell)."""
        return bool(self.mask.all())

    @property
    def shared_column(self) -> int | None:
        """The column every prompt reads when that is one column (else None)."""
        run = self._shared_run
        return run.start if run is not None and run.stop - run.start == 1 else None

    @functools.cached_property
    def _shared_run(self) -> slice | None:
        """The columns as one slice when every prompt reads the same consecutive ones.

        DLA gathers every component's cache entry at the selection, so for the common
        unpadded case a slice (a view) saves an index build and a copy per component.
        """
        first = self.columns[:1]
        if not bool((self.columns == first).all()):
            return None
        row = first[0].tolist()
        if row != list(range(row[0], row[0] + len(row))):
            return None
        return slice(row[0], row[0] + len(row))
