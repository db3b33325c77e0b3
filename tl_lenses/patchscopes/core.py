"""Patchscopes (Ghandeharioun et al. 2024): decode a hidden state by patching it into a prompt.

Source ``(S, i, M, l)``: the residual ``h`` of model ``M`` at layer ``l``, position ``i``,
on prompt ``S``. Target ``(T, i*, f, M*, l*)``: while ``M*`` runs on ``T``, the residual
at layer ``l*``, position ``i*`` is **replaced** by ``f(h)`` and the forward pass goes on
(optionally generating). The patched model's next-token prediction at the end of ``T``
is what ``h`` "says" through the lens of the target prompt.

Layers index the residual stream as :func:`tl_lenses.hooks.resid_names` lays it out:
``l`` in ``[0, n_layers]``, where ``l < n_layers`` is ``blocks.{l}.hook_resid_pre`` (``0``
is the embedding) and ``l = n_layers`` is the final ``blocks.{n_layers-1}.hook_resid_post``;
negative layers count from the end of that ``n_layers + 1``-long stream. Positions may be
negative (counted from the end of their own prompt); position 0 can be patched.

Generation with a patch: the patch applies to the prompt pass only; later tokens read the
patched keys and values. On a HookedTransformer those come from TL's KV cache
(``TransformerLensKeyValueCache``); on a TransformerBridge (TL 3.9), passing HF's cache
through the bridge gives wrong logits, so each step re-runs the whole sequence with the
patch (the same result, without the speed-up).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_lenses._ints import as_int
from tl_lenses.hooks import (
    flowing_name,
    resolve_layer,
    resolve_position,
    run_cache,
    tl_name,
)
from tl_lenses.inputs import decode_each, one_prompt
from tl_lenses.models import check_model, is_bridge
from tl_lenses.patchscopes import view as _view
from tl_lenses.typing import IntLike
from tl_lenses.viz.brief import brief_repr
from tl_lenses.viz.notebook import NotebookView

Transform = Callable[[Tensor], Tensor]

logger = logging.getLogger("tl_lenses")


@dataclass(frozen=True)
class AffineMap:
    """``f(h) = W h + b``: an affine map from one residual space into another.

    One convention across tl_lenses: ``weight`` is ``[d_out, d_in]`` and ``bias``
    ``[d_out]``, as in ``nn.Linear``, :class:`~tl_lenses.lenses.attribute.lre.LRE` and
    :class:`~tl_lenses.lenses.tuned.lens.TunedLens`. ``A`` (``= weight.T``, a view) is the
    same map in row-vector form, ``h @ A + b``, which is how least squares produces it and
    how a ``(A, b)`` pair given as ``transform=`` is read.
    """

    weight: Float[Tensor, "d_out d_in"]
    bias: Float[Tensor, " d_out"]

    __repr__ = brief_repr  # one line: tensors by shape, lists by length

    def __post_init__(self):
        if self.weight.dim() != 2 or self.bias.shape != (self.weight.shape[0],):
            raise ValueError(
                f"AffineMap needs weight shaped [d_out, d_in] and bias shaped [d_out], got "
                f"{tuple(self.weight.shape)} and {tuple(self.bias.shape)}"
            )

    @classmethod
    def from_rows(cls, A: Float[Tensor, "d_in d_out"], b: Float[Tensor, " d_out"]) -> "AffineMap":
        """The map ``h @ A + b`` (row-vector form): ``weight = A.T`` (a view, no copy)."""
        if A.dim() != 2:
            raise ValueError(f"A must be a matrix [d_in, d_out], got shape {tuple(A.shape)}")
        return cls(A.T, b)

    @property
    def A(self) -> Float[Tensor, "d_in d_out"]:
        """The map in row-vector form: ``f(h) = h @ A + b``."""
        return self.weight.T

    @property
    def b(self) -> Float[Tensor, " d_out"]:
        """The bias (row-vector form's name)."""
        return self.bias

    def __call__(self, h: Float[Tensor, "*rows d_in"]) -> Float[Tensor, "*rows d_out"]:
        """``h @ W^T + b`` for every row of ``h``."""
        return h @ self.A.to(h.dtype) + self.bias.to(h.dtype)


def apply_transform(
    transform: Transform | AffineMap | tuple | None, h: Float[Tensor, "rows d_in"], d_out: int,
) -> Float[Tensor, "rows d_out"]:
    """``f(h)`` for every row, checking that ``f`` lands in the target's ``d_model``.

    ``transform`` is None (identity), a callable, an :class:`AffineMap` or a pair ``(A, b)``
    read in row-vector form (``h @ A + b``, ``A`` shaped ``[d_in, d_out]``).
    """
    if transform is None:
        if h.shape[-1] != d_out:
            raise ValueError(
                f"source d_model={h.shape[-1]} differs from target d_model={d_out}; pass a "
                "transform (e.g. an AffineMap from fit_affine_map) to map between them"
            )
        return h
    if isinstance(transform, tuple):
        transform = AffineMap.from_rows(*transform)
    if isinstance(transform, AffineMap) and transform.A.shape != (h.shape[-1], d_out):
        raise ValueError(
            f"transform A must be shaped [source d_model={h.shape[-1]}, target d_model={d_out}]"
            f", got {tuple(transform.A.shape)}"
        )
    if not callable(transform):
        raise TypeError(f"transform must be callable, an AffineMap or (A, b), got {transform!r}")
    out = transform(h)
    if not isinstance(out, Tensor) or out.shape != (*h.shape[:-1], d_out):
        raise ValueError(
            f"transform must map [rows, {h.shape[-1]}] to [rows, {d_out}], got "
            f"{getattr(out, 'shape', type(out))}"
        )
    return out


def patch_hook(value: Float[Tensor, " d_model"], position: IntLike) -> Callable:
    """A ``(resid, hook)`` closure that replaces ``resid[:, position]`` by ``value``.

    For users' own ``run_with_hooks``; ``position`` may be negative. The residual is cloned
    first: TL hands the same tensor to the previous block's ``resid_post`` (and to a cache).

    >>> h = source_state(model, "Diana, Princess of Wales", layer=6)          # doctest: +SKIP
    >>> hook = patch_hook(h, position=-1)                                      # doctest: +SKIP
    >>> hooks = [("blocks.6.hook_resid_pre", hook)]                            # doctest: +SKIP
    >>> model.run_with_hooks(tokens, fwd_hooks=hooks)                          # doctest: +SKIP
    """
    if not isinstance(value, Tensor) or value.dim() != 1:
        raise ValueError(f"value must be one d_model vector, got {getattr(value, 'shape', value)}")
    if (index := as_int(position)) is None:  # an int, a numpy integer or a 0-d int tensor
        raise ValueError(f"position must be an int, got {position!r}")
    position = index

    def hook(resid: Tensor, hook) -> Tensor:
        if not -resid.shape[1] <= position < resid.shape[1]:
            raise ValueError(
                f"position {position} is outside the {resid.shape[1]} positions at "
                f"{tl_name(hook.name)}"
            )
        resid = resid.clone()
        resid[:, position] = value.to(resid)
        return resid

    return hook


def rows_hook(rows: Sequence[int], positions: Sequence[int], values: Tensor) -> Callable:
    """A hook patching ``resid[rows[j], positions[j]] = values[j]`` (one hook per layer)."""
    rows_t = torch.as_tensor(list(rows), dtype=torch.long)
    pos_t = torch.as_tensor(list(positions), dtype=torch.long)

    def hook(resid: Tensor, hook) -> Tensor:
        resid = resid.clone()
        resid[rows_t.to(resid.device), pos_t.to(resid.device)] = values.to(resid)
        return resid

    return hook


def source_states(
    model, tokens: Int[Tensor, "batch pos"], layers: Sequence[IntLike],
    positions: Sequence[IntLike],
) -> Float[Tensor, "layer n_positions d_model"]:
    """The residuals of one prompt at ``layers`` x ``positions`` (one forward pass)."""
    if tokens.shape[0] != 1:
        raise ValueError(f"source tokens must be one prompt, got batch {tokens.shape[0]}")
    named = [resolve_layer(model, l, argument="source_layer") for l in layers]
    pos = [resolve_position(p, tokens.shape[1], argument="source_position") for p in positions]
    cache = run_cache(model, tokens, [name for _, name in named])
    return torch.stack([cache[name][0, pos] for _, name in named]).detach()


def source_state(model, prompt, layer: IntLike,
                 position: IntLike = -1) -> Float[Tensor, " d_model"]:
    """``h``: the residual of ``model`` on ``prompt`` at ``layer``, ``position``."""
    check_model(model)
    tokens = one_prompt(model, prompt, argument="source_prompt")
    return source_states(model, tokens, [layer], [position])[0, 0]


def run_patched(
    model, tokens: Int[Tensor, "batch pos"], hook_names: Sequence[str],
    positions: Sequence[int], values: Float[Tensor, "batch d_model"], *,
    max_new_tokens: int = 0, reuse_prefix: bool = True,
) -> tuple[Float[Tensor, "batch d_vocab"], Int[Tensor, "batch new_pos"]]:
    """Row ``j`` of ``tokens`` runs with ``hook_names[j]`` at ``positions[j]`` set to ``values[j]``.

    Returns the logits after the last prompt token and the greedy continuation (``[batch,
    0]`` when ``max_new_tokens`` is 0). Positions must be non-negative. Rows share one length
    (no padding: callers group rows by target prompt). With ``reuse_prefix`` on a
    HookedTransformer, the tokens before the earliest patched position run once (batch 1)
    and their keys/values are shared by every row: a sweep whose patches sit at the last
    token costs one token per row instead of the whole prompt.
    """
    if len(hook_names) != tokens.shape[0] or len(positions) != tokens.shape[0]:
        raise ValueError("need one hook name and one position per row of tokens")
    groups: dict[str, list[int]] = {}
    hook_dict = model.hook_dict
    for row, name in enumerate(hook_names):
        # Where sae-lens spliced an SAE in, patch what flows on: its hook_sae_output.
        groups.setdefault(flowing_name(hook_dict, name), []).append(row)
    if not is_bridge(model):
        logits, new = _run_cached(model, tokens, groups, list(positions), values,
                                  max_new_tokens, reuse_prefix)
    else:
        logits, new = _run_rerun(model, tokens, groups, list(positions), values, max_new_tokens)
    bad = ~logits.isfinite().all(-1)
    if bool(bad.any()):
        named = sorted({hook_names[row] for row in bad.nonzero()[:, 0].tolist()})
        logger.warning("non-finite patched logits (a NaN or inf patched in at %s): those "
                       "runs have no top tokens (-1)", ", ".join(named))
    return logits, new


def _hooks(groups: dict[str, list[int]], positions: list[int], values: Tensor, offset: int):
    return [(name, rows_hook(rows, [positions[r] - offset for r in rows], values[rows]))
            for name, rows in groups.items()]


def _run_cached(model, tokens, groups, positions, values, max_new_tokens, reuse_prefix):
    from transformer_lens import TransformerLensKeyValueCache as KVCache
    from transformer_lens.cache.key_value_cache_entry import (
        TransformerLensKeyValueCacheEntry as Entry,
    )

    batch = tokens.shape[0]
    start = min(positions) if reuse_prefix and bool((tokens == tokens[:1]).all()) else 0
    # An explicit all-ones mask: TL would otherwise mask any token equal to the pad token.
    ones = lambda t: torch.ones_like(t)  # noqa: E731
    with torch.no_grad():
        prefix = KVCache.init_cache(model.cfg, model.cfg.device, 1)
        if start > 0:
            model(tokens[:1, :start], past_kv_cache=prefix, attention_mask=ones(tokens[:1, :start]))
        cache = KVCache(
            entries=[Entry(e.past_keys.expand(batch, -1, -1, -1),
                           e.past_values.expand(batch, -1, -1, -1)) for e in prefix.entries],
            previous_attention_mask=prefix.previous_attention_mask.expand(batch, -1),
        )
        suffix = tokens[:, start:]
        logits = model.run_with_hooks(
            suffix, past_kv_cache=cache, attention_mask=ones(suffix),
            fwd_hooks=_hooks(groups, positions, values, start),
        )[:, -1]
        last, new = logits, []
        for _ in range(max_new_tokens):
            new.append(last.argmax(-1, keepdim=True))
            if len(new) < max_new_tokens:
                last = model(new[-1], past_kv_cache=cache, attention_mask=ones(new[-1]))[:, -1]
    return logits, _stack(new, batch, tokens.device)


def _run_rerun(model, tokens, groups, positions, values, max_new_tokens):
    batch = tokens.shape[0]
    hooks = _hooks(groups, positions, values, 0)
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)[:, -1]
        last, seq, new = logits, tokens, []
        for _ in range(max_new_tokens):
            new.append(last.argmax(-1, keepdim=True))
            seq = torch.cat([seq, new[-1]], dim=1)
            if len(new) < max_new_tokens:
                last = model.run_with_hooks(seq, fwd_hooks=hooks)[:, -1]
    return logits, _stack(new, batch, tokens.device)


def _stack(new: list[Tensor], batch: int, device) -> Tensor:
    if not new:
        return torch.zeros(batch, 0, dtype=torch.long, device=device)
    return torch.cat(new, dim=1)


@dataclass(repr=False)
class PatchscopeResult(NotebookView):
    """One patched run: what was read, what was written, and what the target then said.

    ``logits`` are the target model's next-token logits after the last prompt token;
    ``generated_ids`` its greedy continuation (empty unless ``max_new_tokens`` > 0).
    """

    source_layer: int
    source_position: int
    target_layer: int
    target_position: int
    source_hook: str
    target_hook: str
    hidden: Float[Tensor, " d_source"]
    patched: Float[Tensor, " d_model"]
    target_tokens: Int[Tensor, " pos"]
    logits: Float[Tensor, " d_vocab"]
    generated_ids: Int[Tensor, " new_pos"]
    tokenizer: Any = None

    def top_tokens(self, k: int = 5) -> list[str]:
        """The target's ``k`` most likely next tokens as strings.

        None when the logits are not finite (they have no order then).
        """
        if not bool(self.logits.isfinite().all()):
            return []
        return decode_each(self.tokenizer, self.logits.topk(k).indices)

    @property
    def generated_text(self) -> str:
        """The greedy continuation decoded (ids as text without a tokenizer)."""
        ids = self.generated_ids.tolist()
        return self.tokenizer.decode(ids) if self.tokenizer is not None else str(ids)

    def to_html(self, k: int = 5) -> str:
        """This run as HTML: layers, positions, the top-``k`` next tokens, the generation."""
        return _view.patchscope_html(self, k)

    def _view_html(self, full: bool = False, **view) -> str:
        return _view.patchscope_html(self, **view)


def patchscope(
    model, source_prompt, target_prompt, *, source_layer: IntLike, source_position: IntLike = -1,
    target_layer: IntLike | None = None, target_position: IntLike = -1, target_model=None,
    transform: Transform | AffineMap | tuple | None = None, max_new_tokens: int = 0,
) -> PatchscopeResult:
    """Run one patchscope (Ghandeharioun et al. 2024, Fig. 1).

    Source ``(S, i, M, l)``, target ``(T, i*, f, M*, l*)``:

    ``h`` = the residual of ``model`` on ``source_prompt`` at ``source_layer``,
    ``source_position``; the target pass *replaces* the residual of ``target_model`` on
    ``target_prompt`` at ``target_layer``, ``target_position`` by ``f(h)`` and continues,
    optionally generating greedily (later tokens read the patched keys and values). An
    identity patch reproduces the unpatched logits bit for bit.

    Args:
        model: the source model ``M``.
        source_prompt: ``S`` (a string or int tokens ``[1, pos]``).
        target_prompt: ``T``.
        source_layer: ``l``, a residual-stream layer (0 = embedding, ``n_layers`` = final;
            negatives count back).
        source_position: ``i`` (negatives count back).
        target_layer: ``l*`` (default ``l``).
        target_position: ``i*``.
        target_model: ``M*`` (default ``M``).
        transform: ``f``: None (identity), a callable, an :class:`AffineMap` or ``(A, b)``.
        max_new_tokens: greedy tokens to generate after the patch.

    Returns:
        A :class:`PatchscopeResult`: ``hidden`` ``[d_source]``, ``patched`` ``[d_model]``,
        next-token ``logits`` ``[d_vocab]`` and ``generated_ids``.

    Raises:
        ValueError: naming the argument: layers or positions out of range, a negative
            ``max_new_tokens`` (or one running past ``n_ctx``), a transform landing in the
            wrong width.

    >>> r = patchscope(model, "hello world", "cat -> cat; x", source_layer=1, max_new_tokens=2)
    >>> r.logits.shape == (model.cfg.d_vocab,), r.generated_ids.shape
    (True, torch.Size([2]))
    """
    check_model(model)
    target_model = model if target_model is None else target_model
    check_model(target_model, argument="target_model")
    check_generation(max_new_tokens, allow_zero=True)
    s_tokens = one_prompt(model, source_prompt, argument="source_prompt")
    t_tokens = one_prompt(target_model, target_prompt, argument="target_prompt")
    s_layer, s_hook = resolve_layer(model, source_layer, argument="source_layer")
    t_layer, t_hook = resolve_layer(target_model, source_layer if target_layer is None
                                  else target_layer, argument="target_layer")
    s_pos = resolve_position(source_position, s_tokens.shape[1], argument="source_position")
    t_pos = resolve_position(target_position, t_tokens.shape[1], argument="target_position")
    check_context(target_model, t_tokens.shape[1], max_new_tokens, argument="target_prompt")
    hidden = source_states(model, s_tokens, [s_layer], [s_pos])[0]
    patched = apply_transform(transform, hidden, target_model.cfg.d_model)
    logits, new = run_patched(target_model, t_tokens, [t_hook], [t_pos], patched,
                              max_new_tokens=max_new_tokens, reuse_prefix=False)
    return PatchscopeResult(s_layer, s_pos, t_layer, t_pos, s_hook, t_hook, hidden[0],
                            patched[0], t_tokens[0], logits[0], new[0],
                            getattr(target_model, "tokenizer", None))


def check_generation(max_new_tokens, *, allow_zero: bool = False) -> int:
    """``max_new_tokens`` as an int >= 1 (>= 0 with ``allow_zero``), else ValueError."""
    low = 0 if allow_zero else 1
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < low:
        raise ValueError(f"max_new_tokens must be an int >= {low}, got {max_new_tokens!r}")
    return max_new_tokens


def check_context(model, prompt_len: int, max_new_tokens: int, *,
                  argument: str = "target_prompt") -> None:
    """Refuse a generation that would run past the model's ``n_ctx`` or out of its vocabulary.

    The prompt's ``prompt_len`` tokens and all but the last of the ``max_new_tokens``
    generated ones are fed back, so ``prompt_len + max_new_tokens - 1`` positions must fit.
    Checked before any forward pass: past ``n_ctx`` a HookedTransformer raises a bare
    IndexError and some TransformerBridge models silently read positions they never learnt.

    A model whose output vocabulary is wider than its input one (``d_vocab_out >
    d_vocab``) cannot generate: a greedy id past ``d_vocab`` cannot be fed back (TL raised
    a bare IndexError from its embedding).

    Raises:
        ValueError: naming ``max_new_tokens``, the prompt's length and ``n_ctx``, or the
            two vocabulary sizes.
    """
    d_vocab, d_out = model.cfg.d_vocab, getattr(model.cfg, "d_vocab_out", -1)
    if max_new_tokens and isinstance(d_out, int) and d_out > d_vocab:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} needs a model that can read what it writes, and "
            f"this one predicts d_vocab_out={d_out} ids but embeds only d_vocab={d_vocab}; "
            "pass max_new_tokens=0 (the next-token logits are still returned)"
        )
    n_ctx = model.cfg.n_ctx
    if max_new_tokens and prompt_len + max_new_tokens - 1 > n_ctx:
        room = n_ctx - prompt_len + 1
        raise ValueError(
            f"max_new_tokens={max_new_tokens} runs past the model's context: {argument} is "
            f"{prompt_len} tokens long and n_ctx={n_ctx}, so at most {room} new tokens fit"
        )
