"""Head-path DLA (the seed's Figure 5b): an earlier component's output carried through a head.

Head ``(l, h)`` at destination ``d`` writes ``z[d] @ W_O`` with ``z[d] = sum_s A[d, s] v[s]``
and ``v[s] = ln1(resid_pre_l)[s] @ W_V + b_V``. With ``fold_ln`` ln1 only normalises, and
freezing its scale ``s1[s]`` (``blocks.{l}.ln1.hook_scale``) makes it linear, so with the
final scale ``s_f`` frozen too (see :mod:`tl_lenses.attribution.core`) and ``resid_pre_l``
split into the earlier components ``c``, the head's DLA splits exactly into

    path(c, s)   = A[d, s] · center(c[s]) / s1[s] · (W_V W_O u) / s_f[d]
    path(b_V, s) = A[d, s] · b_V · (W_O u) / s_f[d]

summing over every source ``c`` (``embed``, ``pos_embed``, heads, ``b_O`` and MLPs of earlier
layers) and source position ``s`` to that head's DLA. The attention pattern is held at its
forward value: this is the OV path only; what a source does through queries and keys is
not attributed. GQA: a head reads the W_V / b_V of its key-value group (HT's ``attn.W_V`` is
already per head, the Bridge's per group; both are handled).

Nothing per path is built in d_model: each dest head's ``W_V W_O u`` is computed once and
every source is projected onto it (heads through ``W_O`` first).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_lenses._ints import as_int, is_int
from tl_lenses.attribution import view as _view
from tl_lenses.attribution.attention import head_patterns
from tl_lenses.attribution.core import (
    DirectionSpec,
    DLAResult,
    _final_scale,
    _present,
    check_cache,
    logit_directions,
    parse_head_label,
    require_input,
    residual_readout,
)
from tl_lenses.attribution.identity import check_paths
from tl_lenses.attribution.norms import sublayer_norm
from tl_lenses.attribution.provenance import ModelStamp, check_source, stamp
from tl_lenses.cache_checks import check_cache_input, has_pos_embed
from tl_lenses.hooks import final_resid_name, run_cache, spliced_sites
from tl_lenses.inputs import str_tokens, to_batch
from tl_lenses.models import check_model, is_bridge
from tl_lenses.readout.unembed import Unembed, norm_params
from tl_lenses.typing import IntLike
from tl_lenses.viz.notebook import NotebookView

logger = logging.getLogger("tl_lenses")


class PathLabels(Sequence):
    """Labels ``"L2H1 <- L0 MLP @ pos 4"`` made on demand (there can be millions of paths)."""

    def __init__(self, heads: list[str], sources: list[str], n_pos: int,
                 index: Tensor | None = None):
        self.heads, self.sources, self.n_pos = heads, sources, n_pos
        n = len(heads) * len(sources) * n_pos
        self._index = torch.arange(n) if index is None else index

    def __len__(self) -> int:
        return len(self._index)

    def _make(self, flat: int) -> str:
        head, rest = divmod(flat, len(self.sources) * self.n_pos)
        source, pos = divmod(rest, self.n_pos)
        return f"{self.heads[head]} <- {self.sources[source]} @ pos {pos}"

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._make(int(j)) for j in self._index[i]]
        return self._make(int(self._index[i]))

    def __iter__(self):
        return (self._make(int(j)) for j in self._index)

    def index(self, label: str) -> int:
        """Position of ``label`` (``ValueError`` if it is not one of these paths)."""
        head, _, rest = label.partition(" <- ")
        source, _, pos = rest.rpartition(" @ pos ")
        if head not in self.heads or source not in self.sources or not pos.isdigit() \
                or int(pos) >= self.n_pos:
            raise ValueError(label)
        flat = (self.heads.index(head) * len(self.sources) + self.sources.index(source)) \
            * self.n_pos + int(pos)
        hits = (self._index == flat).nonzero()
        if not len(hits):
            raise ValueError(label)
        return int(hits[0])

    def take(self, index: list[int]) -> "PathLabels":
        """The labels at ``index`` (a list of positions into this sequence)."""
        return PathLabels(self.heads, self.sources, self.n_pos, self._index[index])


@dataclass(frozen=True, eq=False)  # fields hold tensors: == compares identity
class HeadPathResult(NotebookView):
    """``values[head, source, batch, src_pos, direction]``: source → head → logit paths.

    ``heads`` label the destination heads (``L2H1``), ``sources`` the earlier components
    plus ``b_V`` (a source that is not earlier than the head contributes exactly 0).
    ``values.sum((1, 3))`` is each head's DLA at ``position``, which counts within each
    prompt: ``destinations[b]`` is the token of ``tokens`` prompt ``b`` read (for -1 its own
    last token). ``src_pos`` runs over the columns of ``tokens``; ``mask`` marks which are
    tokens (pads are attended by nothing, so their paths are exactly 0).
    """

    values: Float[Tensor, "head_index source batch src_pos direction"]
    heads: list[str]
    sources: list[str]
    position: int
    directions: list[str]
    tokens: Int[Tensor, "batch _"]
    logits: Float[Tensor, "batch direction"]
    scale: Float[Tensor, " batch"]
    str_tokens: list[list[str]] | None = None
    mask: Bool[Tensor, "batch src_pos"] | None = None
    destinations: Int[Tensor, " batch"] | None = None
    attention: dict | None = field(default=None, repr=False, compare=False)
    source: ModelStamp | None = field(default=None, repr=False, compare=False)

    def head_totals(self) -> Float[Tensor, "head_index batch direction"]:
        """Each head's DLA, rebuilt from its paths."""
        return self.values.sum((1, 3))

    def flat(self) -> DLAResult:
        """Every path as one component of a :class:`DLAResult` (lazy labels)."""
        n_head, n_source, batch, n_pos, n_dir = self.values.shape
        values = einops.rearrange(self.values, "h c b s k -> (h c s) b k")[:, :, None]
        return DLAResult(
            values=values, labels=PathLabels(self.heads, self.sources, n_pos),
            directions=self.directions, positions=[self.position], tokens=self.tokens,
            logits=self.logits[:, None], scale=self.scale[:, None],
            str_tokens=self.str_tokens,
            columns=None if self.destinations is None else self.destinations[:, None],
            source=self.source, attention_mask=self.mask,
        )

    def top(self, k: int = 10, *, batch: int = 0, direction: int = 0,
            absolute: bool = True) -> DLAResult:
        """The ``k`` largest paths at one (batch, direction)."""
        return self.flat().top(k, batch=batch, pos=0, direction=direction, absolute=absolute)

    def with_attention(self, model) -> "HeadPathResult":
        """This result with the attention patterns of its heads, for the views.

        Args:
            model: the model the paths were computed on (one more cached forward pass).

        Returns:
            A copy whose ``attention`` maps head labels to ``[batch, query_pos, key_pos]``.

        Raises:
            ValueError: ``model`` is not the model the paths came from
                (:mod:`tl_lenses.attribution.provenance`).
        """
        check_source(self.source, model)
        pairs = [parse_head_label(label) for label in self.heads]
        patterns = head_patterns(model, self.tokens.to(model.cfg.device), pairs,
                                 attention_mask=self.mask)
        return replace(self, attention=dict(zip(self.heads, patterns)))

    def __repr__(self) -> str:
        # The dataclass repr would print the whole values tensor.
        top = self.top(3)
        shown = ", ".join(f"{label}={v:+.3g}" for label, v in top.items())
        return (f"HeadPathResult(values {tuple(self.values.shape)} [head, source, batch, "
                f"src_pos, direction], position {self.position}, directions "
                f"{self.directions}: top paths {shown})")

    def to_html(self, **view) -> str:
        """Head totals, the top paths and (when present) the heads' attention, as HTML."""
        return _view.paths_view(self, True, **view)

    def save_png(self, path, k: int = 20, *, batch: int = 0, direction: int = 0) -> Path:
        """The ``k`` largest paths as bars (PNG, SVG or PDF by the suffix of ``path``)."""
        return _view.top_bars_png(self.flat(), path, k, batch=batch, pos=0,
                                  direction=direction)

    def _view_html(self, full: bool = False, **view) -> str:
        return _view.paths_view(self, full, **view)


def _refuse_saes(model, cache) -> None:
    """Head paths split resid_pre into earlier writers; a spliced SAE breaks that sum."""
    sites = spliced_sites(model.hook_dict)
    if cache is not None:
        sites += spliced_sites(getattr(cache, "cache_dict", cache))
    if sites:
        raise NotImplementedError(
            f"head_path_dla does not support SAEs spliced in (sae-lens) at {sorted(set(sites))}; "
            "use dla(..., saes=[...]) for a latent split, or reset_saes() first"
        )


def _check_supported(model) -> None:
    """Refuse what the value-path decomposition does not cover, naming the feature."""
    for layer in range(model.cfg.n_layers):
        norm = sublayer_norm(model, layer, "attn") or (
            None if model.cfg.attn_only else sublayer_norm(model, layer, "mlp"))
        if norm is not None:
            raise NotImplementedError(
                f"head_path_dla: the model normalises each sublayer's output ({norm.name}: "
                "Gemma-2's norms before and after, OLMo-2's post-norm blocks); paths through "
                "those norms are not decomposed. dla(..., heads=True) handles them."
            )
    unfolded = _unfolded_ln1(model)
    if unfolded is not None:
        how = ("call model.enable_compatibility_mode() with its weight processing (not "
               "no_processing=True; tl_lenses' PROCESSING folds the norms)" if is_bridge(model)
               else "load it with fold_ln=True (tl_lenses' PROCESSING)")
        raise ValueError(
            f"model's ln1 weights are not folded ({unfolded} scales or shifts what it "
            f"normalises); {how} so that ln1 only normalises and the value path is linear"
        )


def _unfolded_ln1(model) -> str | None:
    """The first ``ln1`` with a weight other than 1 or a bias other than 0, else None.

    A HookedTransformer says so in its config (``LN``/``RMS``: fold_ln makes them
    ``LNPre``/``RMSPre``). A Bridge keeps its norm modules either way; its weight
    processing sets their weights to 1 and biases to 0, so the weights themselves say it.
    """
    if not is_bridge(model):
        return "ln1" if model.cfg.normalization_type in ("LN", "RMS") else None
    for layer, block in enumerate(model.blocks):
        ln1 = getattr(block, "ln1", None)
        if ln1 is None:
            continue
        _, weight, bias = norm_params(model, ln1)
        if (weight is not None and not bool((weight == 1).all())) or (
                bias is not None and bool(bias.any())):
            return f"blocks.{layer}.ln1"
    return None


def _check_patterns(model, cache, last: int) -> None:
    """A Bridge whose attention never fires ``hook_pattern`` (HF's fused attention)."""
    missing = [f"blocks.{l}.attn.hook_pattern" for l in range(last + 1)
               if f"blocks.{l}.attn.hook_pattern" not in cache]
    if missing:
        raise NotImplementedError(
            f"head_path_dla needs each head's attention pattern, but {missing[0]} never fires "
            f"on this model ({type(model).__name__} around "
            f"{type(getattr(model, 'original_model', model)).__name__}); use a "
            "HookedTransformer of it, or dla(..., heads=True)"
        )


def parse_heads(model, heads) -> list[tuple[int, int]]:
    """``None`` (every head), or a list of ``(layer, head)`` pairs or ``"L3H5"`` labels."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if heads is None:
        return [(l, h) for l in range(n_layers) for h in range(n_heads)]
    if isinstance(heads, (str, tuple)):
        heads = [heads]
    out = []
    for item in heads:
        if isinstance(item, str):
            parsed = parse_head_label(item)
            if parsed is None:
                raise ValueError(f"heads: unknown head label {item!r}; expected like 'L3H5'")
            item = parsed
        if isinstance(item, tuple) and len(item) == 2 and all(map(is_int, item)):
            item = (as_int(item[0]), as_int(item[1]))  # numpy ints, 0-d tensors; no bools
        if not (isinstance(item, tuple) and len(item) == 2 and all(map(is_int, item))
                and 0 <= item[0] < n_layers and 0 <= item[1] < n_heads):
            raise ValueError(
                f"heads must hold (layer, head) with layer in [0, {n_layers}) and head in "
                f"[0, {n_heads}), or labels like 'L3H5'; got {item!r}"
            )
        out.append((int(item[0]), int(item[1])))
    if not out:
        raise ValueError("heads must name at least one head")
    return out


def path_hooks(model, last_layer: int) -> list[str]:
    """Hook points read for destination heads up to ``last_layer``."""
    names = ["hook_embed", final_resid_name(model)]
    names += ["hook_pos_embed"] if has_pos_embed(model) else []
    names += ["ln_final.hook_scale"] if model.cfg.normalization_type is not None else []
    for layer in range(last_layer + 1):
        names.append(f"blocks.{layer}.attn.hook_pattern")
        if model.cfg.normalization_type is not None:
            names.append(f"blocks.{layer}.ln1.hook_scale")
        names.append(f"blocks.{layer}.attn.hook_z")  # the last layer's: to check the sum
        if layer < last_layer:
            names += [] if model.cfg.attn_only else [f"blocks.{layer}.hook_mlp_out"]
    return names


def head_path_dla(
    model, input, directions: DirectionSpec, *, position: IntLike = -1, heads=None, cache=None,
    padding_side: str | None = None, attention_mask: Tensor | None = None,
) -> HeadPathResult:
    """DLA of every (earlier component, source position) through each head's OV circuit.

    The seed's Figure 5b: with the head's attention pattern, the layer norms' scales and the
    final scale frozen, the head's DLA at the destination splits exactly into paths from
    every earlier writer at every source position (``L2H1 <- L0 MLP @ pos 4``).

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge``.
        input: a string, strings (padded on ``padding_side``), int tokens ``[batch, pos]``
            (with ``attention_mask`` when padded), or a :class:`~tl_lenses.inputs.Batch`;
            the mask goes to the model.
        directions: as in :func:`~tl_lenses.attribution.core.dla`.
        position: the destination token, counted within each prompt (negatives count back
            from each prompt's own end; every prompt must have it).
        heads: None for all, or ``(layer, head)`` pairs / ``"L3H5"`` labels.
        cache: an ``ActivationCache`` of ``input``.
        padding_side: ``"right"`` or ``"left"`` for a list of strings (None: the
            tokenizer's ``padding_side``).
        attention_mask: for int tokens: 1 marks a token, 0 padding.

    Returns:
        A :class:`HeadPathResult`: ``values [head_index, source, batch, src_pos,
        direction]`` in logits; ``head_totals()`` (summed over sources and source
        positions) equals each head's DLA.

    Raises:
        ValueError: naming the argument: unknown heads, a position out of range; paths
            that do not add up to the head's DLA (hooks that edit the residual stream,
            another model's ``cache``: :mod:`tl_lenses.attribution.identity`).

    >>> paths = head_path_dla(model, "hello world", ("o", "a"), heads=["L1H0"])
    >>> heads = dla(model, "hello world", ("o", "a"))
    >>> torch.allclose(paths.head_totals()[0], heads["L1H0"].values[0, :, 0], atol=1e-5)
    True
    """
    check_model(model)
    _check_supported(model)
    require_input(input, cache)
    batch = to_batch(model, input, padding_side=padding_side, attention_mask=attention_mask)
    tokens = batch.tokens
    dirs = logit_directions(model, directions)
    if (value := as_int(position)) is None:
        raise ValueError(f"position must be one int (the destination token), got {position!r}")
    position = value
    selection = batch.select(position, argument="position")
    if not bool(selection.mask.all()):
        raise ValueError(f"position {position} is beyond the end of prompts "
                         f"{(~selection.mask[:, 0]).nonzero()[:, 0].tolist()}")
    dest = selection.columns[:, 0]
    chosen = parse_heads(model, heads)
    last = max(layer for layer, _ in chosen)
    names = path_hooks(model, last)
    _refuse_saes(model, cache)
    cache_given = cache is not None
    if cache is None:
        cache = run_cache(model, batch, names)
        _check_patterns(model, cache, last)
    check_cache(cache, tokens, names)
    if cache_given:
        check_cache_input(model, cache, batch, batch.select(None))
    u, _ = residual_readout(model, dirs)
    s_f = _final_scale(model, cache, selection)[:, 0].to(u.device)
    sources, values = _all_paths(model, cache, chosen, dest, u, s_f, last)
    check_paths(model, cache, chosen, dest, u, s_f, values, cache_given=cache_given)
    heads = [f"L{l}H{h}" for l, h in chosen]
    values = _non_finite_as_nan(values, heads, sources)
    unembed = Unembed.from_model(model)
    resid = selection.gather(cache[final_resid_name(model)])[:, 0].float()
    logits = unembed.normalize(resid) @ dirs.vectors.T.to(resid.device) + dirs.offset
    return HeadPathResult(
        values=values, heads=heads, sources=sources,
        position=selection.positions[0], directions=dirs.labels, tokens=tokens, logits=logits,
        scale=s_f, str_tokens=str_tokens(model, tokens), mask=batch.mask, destinations=dest,
        source=stamp(model),
    )


def _non_finite_as_nan(values: Tensor, heads: list[str], sources: list[str]) -> Tensor:
    """NaN for every non-finite path (an inf is no attribution); one warning naming them."""
    bad = ~values.isfinite().flatten(2).all(2)                        # [head, source]
    if not bool(bad.any()):
        return values
    named = [f"{sources[s]} -> {heads[h]}" for h, s in bad.nonzero().tolist()]
    logger.warning("non-finite head paths (NaN or inf activations) for %s; shown as missing",
                   ", ".join(named[:10]) + (" ..." if len(named) > 10 else ""))
    return values.nan_to_num(nan=float("nan"), posinf=float("nan"), neginf=float("nan"))


def _ov_readout(model, chosen, u: Tensor) -> tuple[Tensor, Tensor]:
    """``(W_V W_O u [n, d_model, k], b_V W_O u [n, k])`` for each chosen head."""
    n_heads, w, bias = model.cfg.n_heads, [], []
    for layer in sorted({l for l, _ in chosen}):
        hs = [h for l, h in chosen if l == layer]
        attn = model.blocks[layer].attn
        W_V = attn.W_V.detach().float()
        b_V = attn.b_V.detach().float() if attn.b_V is not None else torch.zeros(W_V.shape[::2])
        if W_V.shape[0] != n_heads:  # the Bridge keeps GQA weights per key-value group
            W_V = W_V.repeat_interleave(n_heads // W_V.shape[0], 0)
            b_V = b_V.repeat_interleave(n_heads // b_V.shape[0], 0)
        W_Ou = einops.einsum(attn.W_O.detach().float()[hs], u, "n e d, d k -> n e k")
        w.append(einops.einsum(W_V[hs], W_Ou, "n d e, n e k -> n d k"))
        bias.append(einops.einsum(b_V[hs], W_Ou, "n e, n e k -> n k"))
    order = _layer_order(chosen)
    w, bias = torch.cat(w)[order], torch.cat(bias)[order]
    if Unembed.from_model(model).kind == "layernorm":  # ln1 centres: centre the direction
        w = w - w.mean(1, keepdim=True)
    return w, bias


def _layer_order(chosen) -> Tensor:
    """Index that maps heads grouped by layer back to the order of ``chosen``."""
    grouped = sorted(range(len(chosen)), key=lambda i: (chosen[i][0], i))
    return torch.tensor(grouped).argsort()


def _stack(model, cache, name: str, n_layers: int) -> Tensor:
    return torch.stack([cache[name.format(l)].float() for l in range(n_layers)])


def _all_paths(model, cache, chosen, dest, u, s_f, last) -> tuple[list[str], Tensor]:
    """Source labels and ``[head, source, batch, src_pos, direction]`` for every chosen head.

    A few large einsums over all heads and source layers (tiny ops cost more in dispatch
    than in arithmetic); a source at or after a head's layer is masked to 0.
    """
    cfg = model.cfg
    w, bias_term = _ov_readout(model, chosen, u)
    layers = torch.tensor([l for l, _ in chosen])
    rows = torch.arange(len(dest))
    pattern = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][rows, h, dest].float()
                           for l, h in chosen], 1)  # b n s; dest: each prompt's own column
    if cfg.normalization_type is None:
        s1 = torch.ones_like(pattern)
    else:
        s1 = torch.stack([cache[f"blocks.{l}.ln1.hook_scale"][..., 0].float()
                          for l, _ in chosen], 1)
    coef = pattern / s1 / s_f[:, None, None]
    sources = ["embed"] + (["pos_embed"] if has_pos_embed(model) else [])
    parts = [einops.einsum(cache[name].float(), w, "b s d, n d k -> b s n k")[None]
             for name in sources]
    src_layer = [-1] * len(sources)
    if last > 0:
        labels, part = _layer_sources(model, cache, w, last)
        sources += labels
        parts.append(part)
        src_layer += [int(label[1:].split("H")[0].split(" ")[0]) for label in labels]
    projected = torch.cat(parts)  # source b s n k
    values = einops.einsum(projected, coef, "c b s n k, b n s -> n c b s k")
    earlier = torch.tensor(src_layer)[None, :] < layers[:, None]  # n c
    values *= earlier[:, :, None, None, None]
    # b_V is added after ln1, so only the pattern and the final scale weigh it.
    b_V = einops.einsum(pattern / s_f[:, None, None], bias_term, "b n s, n k -> n b s k")
    return sources + ["b_V"], torch.cat([values, b_V[:, None]], 1)


def _layer_sources(model, cache, w: Tensor, last: int) -> tuple[list[str], Tensor]:
    """Heads, b_O and MLP of layers ``< last`` projected onto ``w``: [source, b, s, n, k]."""
    cfg, n_heads = model.cfg, model.cfg.n_heads
    z = _stack(model, cache, "blocks.{}.attn.hook_z", last)  # l b s g e
    W_O = torch.stack([model.blocks[l].attn.W_O.detach().float() for l in range(last)])
    M = einops.einsum(W_O, w, "l g e d, n d k -> l g e n k")
    blocks = [einops.einsum(z, M, "l b s g e, l g e n k -> l g b s n k")]
    labels = [[f"L{l}H{h}" for h in range(n_heads)] for l in range(last)]
    biases = [model.blocks[l].attn.b_O for l in range(last)]
    if any(_present(b) for b in biases):
        b_O = torch.stack([b.detach().float() if b is not None else torch.zeros(cfg.d_model)
                           for b in biases])
        shape = (last, 1, *blocks[0].shape[2:4], *w.shape[::2])
        blocks.append(einops.einsum(b_O, w, "l d, n d k -> l n k")[:, None, None, None]
                      .expand(shape))
        labels = [row + [f"L{l} b_O"] for l, row in enumerate(labels)]
    if not cfg.attn_only:
        mlp = _stack(model, cache, "blocks.{}.hook_mlp_out", last)
        blocks.append(einops.einsum(mlp, w, "l b s d, n d k -> l b s n k")[:, None])
        labels = [row + [f"L{l} MLP"] for l, row in enumerate(labels)]
    stacked = torch.cat(blocks, 1)  # l block b s n k
    return [x for row in labels for x in row], stacked.flatten(0, 1)


__all__ = ["HeadPathResult", "PathLabels", "head_path_dla", "parse_heads"]
