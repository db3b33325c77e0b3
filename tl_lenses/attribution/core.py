"""Direct logit attribution (DLA): a logit split exactly over every residual-stream writer.

Convention: the final norm's scale is frozen at its forward-pass value. With tl_lenses'
processing (``fold_ln``) the final norm only normalises, so at one position

    logit = center(resid_final) / s · u + c

where ``s`` is the scale the forward pass computed (``ln_final.hook_scale``), ``center``
subtracts the mean for LayerNorm (the identity for RMSNorm), ``u`` is the direction (a W_U
column, a difference of two, or any vector read off the norm's output) and ``c`` the constant
part (``b_U``). Holding ``s`` fixed makes the logit linear in ``resid_final``, which is the
sum of what each component wrote: the embeddings, every head's ``z @ W_O``, each attention
bias ``b_O``, each MLP output (or each neuron's ``post * W_out`` row plus ``b_out``). So the
attributions below plus the ``b_U`` term add up to the model's logit (or logit difference)
to float rounding. What the convention leaves out is the norm's own dependence on each
component: an attribution is a component's share *given* ``s``, not the effect of removing
it (that would change ``s`` and every later layer).

Soft-capped models (Gemma-2's ``final_logit_softcapping``): the parts add up to the logit
*before* the cap, ``result.logits``; the model's own capped value is reported beside it as
``result.capped_logits`` (a tanh of a sum does not split into parts).

Norms after a sublayer (Gemma-2's norms before and after attention and MLP, OLMo-2's
post-norm blocks) are handled like the final norm: their scale is frozen at its forward
value (``blocks.{l}.ln1_post.hook_scale``), so each head's and neuron's share passes
through the norm's weight and that scale.

Centering is applied to the direction, not to each component (``(x - mean x) · u ==
x · (u - mean u)``), and neuron attributions project ``W_out`` onto the direction before
multiplying by the activations, so no per-neuron (or per-head) residual vector is ever built.
"""

from __future__ import annotations

import functools
import logging
from typing import Sequence

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from tl_lenses.attribution.directions import (
    DirectionSpec,
    LogitDirections,
    logit_directions,
    residual_readout,
)
from tl_lenses.attribution.identity import check_parts_sum, parts_add_up
from tl_lenses.attribution.norms import SublayerNorm, sublayer_norm
from tl_lenses.attribution.provenance import stamp
from tl_lenses.attribution.result import DLAResult, parse_head_label
from tl_lenses.attribution.sublayers import project_stacked, sublayer_parts
from tl_lenses.cache_checks import PATTERN_HOOK, check_cache_input, has_pos_embed
from tl_lenses.hooks import final_resid_name, flowing_name, run_cache
from tl_lenses.inputs import Selection, to_batch
from tl_lenses.readout.unembed import Unembed
from tl_lenses.sae.latents import site_terms, split_hooks, split_sites
from tl_lenses.token_strings import TokenStrings

logger = logging.getLogger("tl_lenses")


def needed_hooks(model, *, heads: bool = True, neurons: bool = False,
                 left_padded: bool = False) -> list[str]:
    """The hook points :func:`dla` reads (a ``names_filter`` for ``run_with_cache``).

    ``left_padded``: also layer 0's attention pattern, which a ``cache=`` of a left-padded
    batch must hold (DLA checks there that it was taken with the attention mask).
    """
    for name, flag in (("heads", heads), ("neurons", neurons), ("left_padded", left_padded)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if left_padded:
        return [*needed_hooks(model, heads=heads, neurons=neurons), PATTERN_HOOK]
    if not heads and not neurons:  # a pure function of the model's shape: built once
        cfg = model.cfg
        return list(_sublayer_hooks(cfg.n_layers, has_pos_embed(model), bool(cfg.attn_only),
                                    cfg.normalization_type is not None))
    names = ["hook_embed", final_resid_name(model)]
    if has_pos_embed(model):
        names.append("hook_pos_embed")
    if model.cfg.normalization_type is not None:
        names.append("ln_final.hook_scale")
    for layer in range(model.cfg.n_layers):
        if heads:
            names += [n.scale_hook for n in [sublayer_norm(model, layer, "attn")] if n]
        if neurons and not model.cfg.attn_only:
            names += [n.scale_hook for n in [sublayer_norm(model, layer, "mlp")] if n]
        names.append(f"blocks.{layer}.attn.hook_z" if heads else f"blocks.{layer}.hook_attn_out")
        if not model.cfg.attn_only:
            names.append(f"blocks.{layer}.mlp.hook_post" if neurons
                         else f"blocks.{layer}.hook_mlp_out")
    return names


@functools.lru_cache(maxsize=64)
def _sublayer_hooks(n_layers: int, pos_embed: bool, attn_only: bool,
                    final_norm: bool) -> tuple[str, ...]:
    """:func:`needed_hooks` with ``heads=False, neurons=False``, in its order."""
    names = ["hook_embed", f"blocks.{n_layers - 1}.hook_resid_post"]
    names += ["hook_pos_embed"] * pos_embed + ["ln_final.hook_scale"] * final_norm
    for layer in range(n_layers):
        names.append(f"blocks.{layer}.hook_attn_out")
        names += [f"blocks.{layer}.hook_mlp_out"] * (not attn_only)
    return tuple(names)


def check_cache(cache, tokens: Tensor, names: Sequence[str]) -> None:
    """Fail unless ``cache`` holds every name, with [batch, pos] matching ``tokens``."""
    keys = getattr(cache, "cache_dict", cache)  # `in` on an ActivationCache scans its keys
    missing = [name for name in names
               if name not in keys and flowing_name(keys, name) not in keys]
    if missing:
        raise ValueError(
            f"cache lacks hook points DLA needs: {missing[:6]}{' ...' if len(missing) > 6 else ''}"
            f"; {_why_missing(keys, names)}"
        )
    shape = tuple(cache["hook_embed"].shape[:2])
    if shape != tuple(tokens.shape):
        raise ValueError(f"cache is for [batch, pos]={shape}, but tokens are {tuple(tokens.shape)}")


def _why_missing(keys, names: Sequence[str]) -> str:
    """The likely cause of a cache's missing hook points, as advice."""
    def block(name):
        parts = name.split(".")
        return int(parts[1]) if parts[0] == "blocks" and parts[1].isdigit() else -1

    held, needed = max(map(block, keys), default=-1), max(map(block, names), default=-1)
    if held < needed:
        return (f"the cache holds blocks 0-{held} but this model has {needed + 1}: a cache "
                "of another model? pass this model's cache, or cache=None")
    return "run run_with_cache without a names_filter that drops them"


def _final_scale(
    model, cache, positions: list[int] | Selection
) -> Float[Tensor, "batch pos"]:
    """The final norm's scale at ``positions`` (ones for a model without a final norm)."""
    at = _gather(positions)
    if model.cfg.normalization_type is None:
        return at(torch.ones(cache["hook_embed"].shape[:2]))
    return at(cache["ln_final.hook_scale"].select(-1, 0)).float()


def _gather(positions: list[int] | Selection):
    """A function taking a [batch, pos, ...] tensor to the selected cells of each prompt."""
    if isinstance(positions, Selection):
        return positions.gather
    index = _position_index(positions)
    return lambda values: values[:, index]


def require_input(input, cache) -> None:
    """Refuse ``input=None``, saying what to pass when a ``cache`` was given.

    DLA reads positions and padding off the tokens, and checks the cache against them, so
    a cache never stands in for its tokens (TL's own tools take the cache alone).
    """
    if input is None and cache is not None:
        raise TypeError("input is required with cache=: pass the tokens (or text) the cache "
                        "was taken on, e.g. dla(model, tokens, directions, cache=cache); DLA "
                        "reads the positions off them and checks the cache against them")


def dla(
    model, input, directions: DirectionSpec, *, positions=-1, heads: bool = True,
    neurons: bool = False, cache=None, saes=(), padding_side: str | None = None,
    attention_mask: Tensor | None = None,
) -> DLAResult:
    """Direct logit attribution: the logit along each direction split over every writer.

    Components, in order: ``embed`` (``pos_embed``), then per layer the heads ``L3H5`` and
    ``L3 b_O`` (or ``L3 attn`` with ``heads=False``), the MLP ``L3 MLP`` (or its neurons
    ``L3N1203`` and ``L3 b_out`` with ``neurons=True``), and last ``b_U`` (the constant part
    of the direction: b_U and the final norm's bias). With the final norm's scale frozen at
    its forward-pass value, ``values.sum(0)`` equals ``result.logits``, the model's own logit
    (difference), to float rounding (the seed's Figure 5 a, c, d).

    SAEs (sae-lens): where one is spliced in at a d_model-wide hook point (``add_sae`` on a
    ``HookedSAETransformer``, or a ``run_with_cache_with_saes`` cache), what flows on from
    there is its output, so the writers before it are replaced by its latents
    ``L1 SAE#123`` (activation x decoder row), ``L1 SAE b_dec`` and ``L1 SAE error`` (with
    ``use_error_term``); without the SAE object (pass it in ``saes``) its output is one part
    ``L1 SAE``. An SAE in ``saes`` that is not spliced in splits the cached value at its hook
    point the same way (error = value - reconstruction). Other sites label as ``L1 mid``,
    ``L1 post``, ``L1 attn``, ``L1 mlp`` + `` SAE#i`` (see :mod:`tl_lenses.sae.latents`).

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge``.
        input: a string, strings (padded on ``padding_side``), int tokens ``[batch, pos]``
            (with ``attention_mask`` when padded), or a :class:`~tl_lenses.inputs.Batch`;
            the mask goes to the model, so each prompt's values equal the prompt's alone.
        directions: a token (string or id), a ``(correct, wrong)`` pair (the logit
            difference), a ``[d_model]`` vector, or a list of these.
        positions: an int (default -1: each prompt's own last token), ints, or None for
            all, counted within each prompt; cells a prompt lacks (pads) are NaN and
            ``result.mask`` False.
        heads: split attention into heads (else one ``L3 attn`` per layer).
        neurons: split MLPs into neurons.
        cache: an ``ActivationCache`` of ``input`` (then ``input`` must be its tokens and
            the model is not run), taken with its attention mask; for a left-padded batch it
            must hold ``blocks.0.attn.hook_pattern``, where that is checked
            (``needed_hooks(model, ..., left_padded=True)``).
        saes: sae-lens SAEs (d_model-wide hook points) to split into latents, spliced in or
            not.
        padding_side: ``"right"`` or ``"left"`` for a list of strings (None: the
            tokenizer's ``padding_side``).
        attention_mask: for int tokens: 1 marks a token, 0 padding.

    Returns:
        A :class:`~tl_lenses.attribution.result.DLAResult`: ``values [component, batch, pos,
        direction]`` in logits, labels, and the model's own ``logits [batch, pos,
        direction]``.

    Raises:
        ValueError: naming the argument: a multi-token answer, positions out of range, a
            cache lacking hook points, an SAE not at a d_model-wide hook point; parts that
            do not add up to the logit (hooks that edit the residual stream, another
            model's ``cache``: :mod:`tl_lenses.attribution.identity`).
        TypeError: an entry of ``saes`` is not an SAE.
        NotImplementedError: an SAE whose output is not latents x W_dec + b_dec (+ error).

    >>> result = dla(model, "hello world", ("o", "a"))
    >>> torch.allclose(result.values.sum(0), result.logits, atol=1e-4)
    True
    """
    # Read once, and first: it checks the model (a walk over its modules, which DLA is cheap
    # enough to notice).
    unembed = Unembed.from_model(model, drop_zero_bias=False)
    if neurons and _is_moe(model):
        raise NotImplementedError(
            "neurons=True: the model's MLPs are mixtures of experts (cfg.num_experts), whose "
            "neurons belong to routed experts; use neurons=False (each layer's MoE output)"
        )
    require_input(input, cache)
    batch = to_batch(model, input, padding_side=padding_side, attention_mask=attention_mask,
                     device=unembed.W_U.device)  # checked by Unembed.from_model
    dirs = logit_directions(model, directions, unembed=unembed)
    selection = batch.select(positions)
    names = needed_hooks(model, heads=heads, neurons=neurons)
    cache_given = cache is not None
    if cache is None:
        cache = run_cache(model, batch, [*names, *split_hooks(model, saes)])
    check_cache(cache, batch.tokens, names)
    if cache_given:
        check_cache_input(model, cache, batch, selection)
    u, const = residual_readout(model, dirs, unembed=unembed)
    keys = getattr(cache, "cache_dict", cache)
    sites = split_sites(model, keys, saes)
    if heads or neurons or sites:
        labels, parts = _component_parts(model, cache, selection, u, heads, neurons, sites)
        values = torch.cat(parts)
    else:  # whole sublayers only: one stack, one projection (same numbers)
        labels, values = sublayer_parts(model, keys, selection, u)
    scale = _final_scale(model, cache, selection).to(u.device)
    values = values.div_(scale.unsqueeze(-1))                 # [batch, pos, 1] broadcasts
    values = torch.cat([values, const.expand(1, *values.shape[1:])])   # the b_U row
    resid = selection.gather(cache[flowing_name(keys, final_resid_name(model))]).float()
    logits = _own_logits(unembed, resid, resid @ u, const)
    capped = _capped_logits(unembed, resid, dirs)
    if not (selection.complete and parts_add_up(values, logits,
                                                dtype=cache["hook_embed"].dtype)):
        # pads, non-finite parts or a failed identity: cell by cell, with their messages,
        # at the tolerance of the coarsest activations read (one may be half precision)
        mask = selection.mask.to(values.device)
        values = _missing_as_nan(values, mask, labels + ["b_U"])
        check_parts_sum(model, values, logits, dtype=_coarsest_dtype(keys, names),
                        cache_given=cache_given)
        if not selection.complete:  # a pad has no logit either: NaN, as its values
            logits, scale, capped = (None if t is None else _pads_as_nan(t, mask)
                                     for t in (logits, scale, capped))
    return DLAResult(
        values=values, labels=[*labels, "b_U"], directions=dirs.labels,
        positions=selection.positions, tokens=batch.tokens, logits=logits, scale=scale,
        str_tokens=TokenStrings(model, batch.tokens), mask=selection.mask,
        columns=selection.columns, capped_logits=capped, source=stamp(model),
        attention_mask=batch.mask,
    )


def _is_moe(model) -> bool:
    return bool(getattr(model.cfg, "num_experts", None))


def _coarsest_dtype(keys, names: Sequence[str]) -> torch.dtype:
    """The float dtype of least precision among the cached activations at ``names``."""
    dtypes = {keys[flowing_name(keys, name)].dtype for name in names}
    floats = [d for d in dtypes if d.is_floating_point] or [torch.float32]
    return max(floats, key=lambda d: torch.finfo(d).eps)


def _pads_as_nan(values: Tensor, mask: Tensor) -> Tensor:
    """``values [batch, pos, ...]`` with NaN where ``mask [batch, pos]`` is False."""
    shape = (*mask.shape, *([1] * (values.dim() - 2)))
    return values.masked_fill(~mask.view(shape), float("nan"))


def _missing_as_nan(values: Tensor, mask: Tensor, labels: list[str]) -> Tensor:
    """Pad cells as NaN; warn once naming the components whose parts are not finite."""
    real = values[:, mask]                                            # [component, n, dir]
    bad = ~real.isfinite().flatten(1).all(1)
    if bool(bad.any()):
        named = [label for label, b in zip(labels, bad.tolist()) if b]
        logger.warning("non-finite DLA parts (NaN or inf activations) for %s; shown as "
                       "missing", ", ".join(named[:10]) + (" ..." if len(named) > 10 else ""))
        values = values.nan_to_num(nan=float("nan"), posinf=float("nan"), neginf=float("nan"))
    if bool(mask.all()):
        return values
    return values.masked_fill(~mask[None, :, :, None], float("nan"))


def _component_parts(model, cache, positions, u, heads, neurons, sites=None):
    """(labels, [n, batch, pos, direction] tensors) for every writer, not yet divided by s.

    ``sites``: ``{hook point: SAE or None}`` whose value is split into SAE terms instead.
    """
    gather = _gather(positions)
    keys = getattr(cache, "cache_dict", cache)
    sites = sites or {}

    def at(name: str) -> Tensor:
        return gather(cache[flowing_name(keys, name)]).float()

    # Whole-sublayer terms are projected together at the end (one kernel call, or one matmul
    # per group, instead of one per component, which dominated a small DLA; the same
    # numbers as sublayer_parts): (index in parts, gathered value).
    pending: list[tuple[int, Tensor]] = []

    def project(name: str) -> None:
        pending.append((len(parts), at(name)))
        return None  # a placeholder in parts, filled by _project_pending

    def through(norm: SublayerNorm | None):
        """(direction, [1, batch, pos, 1] divisor) for a sublayer's raw output."""
        if norm is None:
            return u, 1.0
        return norm.direction(u), gather(cache[norm.scale_hook]).float()[None]

    labels, parts = ["embed"], []
    parts.append(project("hook_embed"))
    if has_pos_embed(model):
        labels.append("pos_embed")
        parts.append(project("hook_pos_embed"))
    shape = (1, *pending[0][1].shape[:-1], u.shape[-1])

    def add_units(unit_labels, terms, bias, bias_label, u_l, divisor) -> None:
        """Per-unit terms (heads or neurons), then the layer's bias when it has one."""
        labels.extend(unit_labels)
        parts.append(terms / divisor)
        if _present(bias):
            labels.append(bias_label)
            parts.append((bias.detach().float() @ u_l).expand(shape) / divisor)

    def split(name: str, *, stream: bool) -> bool:
        """SAE terms for the value at ``name`` (True if an SAE sits there).

        On the residual stream they replace what was written before, which reached the
        logit only through the SAE.
        """
        if name not in sites:
            return False
        if stream:
            labels.clear()
            parts.clear()
            pending.clear()
        sae_labels, terms = site_terms(name, cache, gather, u, sites[name])
        labels.extend(sae_labels)
        parts.append(terms)
        return True

    for layer in range(model.cfg.n_layers):
        block = model.blocks[layer]
        split(f"blocks.{layer}.hook_resid_pre", stream=True)
        if split(f"blocks.{layer}.hook_attn_out", stream=False):
            pass  # an SAE's output replaced the attention output: its terms are in
        elif heads:
            u_l, divisor = through(sublayer_norm(model, layer, "attn"))
            add_units([f"L{layer}H{h}" for h in range(model.cfg.n_heads)],
                      head_terms(at(f"blocks.{layer}.attn.hook_z"), block.attn.W_O, u_l),
                      block.attn.b_O, f"L{layer} b_O", u_l, divisor)
        else:
            labels.append(f"L{layer} attn")
            parts.append(project(f"blocks.{layer}.hook_attn_out"))
        split(f"blocks.{layer}.hook_resid_mid", stream=True)
        if model.cfg.attn_only or split(f"blocks.{layer}.hook_mlp_out", stream=False):
            pass  # no MLP, or an SAE's output replaced it
        elif neurons:
            u_l, divisor = through(sublayer_norm(model, layer, "mlp"))
            add_units(_neuron_labels(layer, model.cfg.d_mlp),
                      neuron_terms(at(f"blocks.{layer}.mlp.hook_post"), block.mlp.W_out, u_l),
                      block.mlp.b_out, f"L{layer} b_out", u_l, divisor)
        else:
            labels.append(f"L{layer} MLP")
            parts.append(project(f"blocks.{layer}.hook_mlp_out"))
        split(f"blocks.{layer}.hook_resid_post", stream=True)
    _project_pending(parts, pending, u)
    return labels, parts


def _project_pending(parts: list, pending: list[tuple[int, Tensor]], u: Tensor) -> None:
    """Fill ``parts[i]`` with ``value @ u`` for every pending ``(i, value)``."""
    if not pending:
        return
    projected = project_stacked([value for _, value in pending], u)   # [n, batch, pos, dir]
    for j, (index, _) in enumerate(pending):
        parts[index] = projected[j:j + 1]


@functools.lru_cache(maxsize=256)
def _neuron_labels(layer: int, d_mlp: int) -> tuple[str, ...]:
    return tuple(f"L{layer}N{i}" for i in range(d_mlp))


def _position_index(pos: list[int]):
    """A slice (a view, no copy) where the positions are contiguous, else the list."""
    if pos == list(range(pos[0], pos[-1] + 1)):
        return slice(pos[0], pos[-1] + 1)
    return pos


def _present(bias: Tensor | None) -> bool:
    """Whether a bias exists and is not all zeros.

    HookedTransformer stores zeros where the Bridge has None; skipping both keeps the
    component labels the same on the two backends.
    """
    return bias is not None and bool(bias.detach().any())


def head_terms(
    z: Float[Tensor, "batch pos head_index d_head"],
    W_O: Float[Tensor, "head_index d_head d_model"],
    u: Float[Tensor, "d_model direction"],
) -> Float[Tensor, "head_index batch pos direction"]:
    """Each head's ``z @ W_O · u``, projecting W_O first (no per-head residual vectors)."""
    W_Ou = einops.einsum(W_O.detach().float(), u, "h e d, d k -> h e k")
    return einops.einsum(z, W_Ou, "b p h e, h e k -> h b p k")


def neuron_terms(
    post: Float[Tensor, "batch pos d_mlp"],
    W_out: Float[Tensor, "d_mlp d_model"],
    u: Float[Tensor, "d_model direction"],
) -> Float[Tensor, "d_mlp batch pos direction"]:
    """Each neuron's ``post * (W_out · u)``: W_out is projected before meeting activations."""
    W_out_u = W_out.detach().float() @ u  # [d_mlp, direction]: the only pass over W_out
    return einops.einsum(post, W_out_u, "b p n, n k -> n b p k")


def _own_logits(
    unembed: Unembed, resid: Float[Tensor, "batch pos d_model"],  # float32
    resid_u: Float[Tensor, "batch pos direction"], const: Float[Tensor, " direction"],
) -> Float[Tensor, "batch pos direction"]:
    """The model's own (pre-cap) value along each direction, from the final residual.

    ``norm(resid) · vector + offset`` with the norm's *own* statistics of ``resid``,
    written as ``resid · u / s(resid) + c`` (:func:`residual_readout` folds the norm's
    weight, bias and centering into ``u`` and ``c``); ``resid_u`` is ``resid · u``. Against
    DLA's parts (divided by the *cached* scale) this checks both that the parts add up to
    the final residual and that the cached scale is the residual's own.
    """
    if unembed.kind == "none":
        return resid_u + const
    if unembed.kind == "layernorm":   # the variance about the mean: LayerNorm's centering
        variance = resid.var(-1, unbiased=False, keepdim=True)
    else:
        variance = resid.square().mean(-1, keepdim=True)
    return torch.addcmul(const, resid_u, variance.add_(unembed.eps).rsqrt_())


def _capped_logits(unembed: Unembed, resid: Tensor, dirs: LogitDirections) -> Tensor | None:
    """A soft-capped model's own capped value per token direction, else None.

    ``cap(z_a) - cap(z_b)`` (NaN for a free vector, which has no capped counterpart).
    """
    if unembed.soft_cap is None:
        return None
    normalized = unembed.normalize(resid)
    pairs = dirs.token_pairs or (None,) * len(dirs)
    capped = torch.full((*normalized.shape[:-1], len(dirs)), float("nan"),
                        device=normalized.device)
    for i, pair in enumerate(pairs):
        if pair is None:
            continue
        ids = [t for t in pair if t >= 0]
        z = normalized @ unembed.W_U[:, ids].detach().float()
        if unembed.b_U is not None:
            z = z + unembed.b_U[ids].detach().float()
        z = unembed.cap(z.detach())
        capped[..., i] = z[..., 0] - (z[..., 1] if len(ids) == 2 else 0.0)
    return capped


__all__ = ["DLAResult", "LogitDirections", "parse_head_label", "logit_directions",
           "residual_readout", "dla", "needed_hooks", "head_terms", "neuron_terms",
           "SublayerNorm", "sublayer_norm"]
