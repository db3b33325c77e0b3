"""Running a lens: on a prompt, over an ActivationCache, or as hooks in a forward pass."""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tl_lenses._ints import is_int
from tl_lenses.cache_checks import EMBED_HOOK, PATTERN_HOOK, RESID_HOOK, Given, check_cache_input
from tl_lenses.devices import model_device
from tl_lenses.hooks import (
    check_hook_names,
    final_resid_name,
    flowing_name,
    resid_names,
    resolve_layer,
    run_cache,
)
from tl_lenses.inputs import Batch, Selection, to_batch
from tl_lenses.models import check_model
from tl_lenses.readout.engine import read_lens
from tl_lenses.readout.fingerprint import check_lens
from tl_lenses.readout.lens import Lens
from tl_lenses.readout.result import LensResult
from tl_lenses.typing import IntLike

# How the checks of a given cache name it and its input (tl_lenses.cache_checks).
_CACHE = Given(argument="cache", input="tokens", input_mask="the tokens' attention_mask",
               fix="call apply_lens(model, tokens, attention_mask=mask), which runs the model",
               names_hint="")
_COLLECTED = Given(
    argument="the forward pass the collector's hooks saw", input="tokens",
    input_mask="the tokens' attention_mask",
    fix="run the model on these tokens with collector.fwd_hooks() (and attention_mask=mask "
        "when padded), then call result(tokens, attention_mask=mask)", names_hint="")


def lens_rows(model, lens) -> list[str] | None:
    """The rows a lens covers: its ``hook_names`` and the final residual.

    None for a lens that reads any hook point (the logit lens, an attribute lens). A tuned
    lens trained on some layers only translates those; every method that picks default rows
    for it (:func:`apply_lens`, ``evaluate_lenses``) reads these.
    """
    covered = getattr(lens, "hook_names", None)
    if lens is None or covered is None:
        return None
    final = final_resid_name(model)
    return [*(name for name in covered if name != final), final]


def select_hook_names(model, hook_names=None, layers=None, incl_mid: bool = False,
                      lens=None) -> list[str]:
    """Hook names to read: given ones, or the residual stream (optionally some ``layers``).

    ``layers`` index the residual stream as ``resid_names`` lays it out: 0 is the
    embedding (``blocks.0.hook_resid_pre``) and ``n_layers`` the final ``resid_post``.
    With neither, a ``lens`` covering some hook points only reads those
    (:func:`lens_rows`).
    """
    if hook_names is not None and layers is not None:
        raise ValueError("pass hook_names or layers, not both")
    if not isinstance(incl_mid, bool):
        raise ValueError(f"incl_mid must be a bool, got {incl_mid!r}")
    if hook_names is not None and incl_mid:
        raise ValueError("incl_mid adds resid_mid rows to the residual stream; with "
                         "hook_names, name the resid_mid hook points instead")
    if hook_names is not None:
        return check_hook_names(model, hook_names)
    if layers is None:
        covered = None if incl_mid else lens_rows(model, lens)
        return covered or resid_names(model, incl_mid=incl_mid)
    if is_int(layers) or isinstance(layers, str) or not hasattr(layers, "__len__"):
        raise TypeError(f"layers must be a list of ints (for one layer: [{layers!r}]), "
                        f"got {layers!r}")
    if not len(layers):
        raise ValueError("layers must name at least one residual-stream layer")
    return [resolve_layer(model, layer, argument="layers")[1] for layer in layers]


def apply_lens(
    model, input, lens: Lens | None = None, *, hook_names: Sequence[str] | None = None,
    layers: Sequence[IntLike] | None = None, incl_mid: bool = False, positions=None,
    padding_side: str | None = None, attention_mask: Tensor | None = None, **readout,
) -> LensResult:
    """Run ``model`` on ``input`` and read every chosen hook point through ``lens``.

    Prompts of unequal lengths are padded and the attention mask goes to the model, so
    each prompt's numbers equal those of the prompt alone; pad cells are left out.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge``.
        input: a string, a list of strings (padded on ``padding_side``), int tokens
            ``[batch, pos]`` (with ``attention_mask`` when padded), or a
            :class:`~tl_lenses.inputs.Batch`.
        lens: a :class:`~tl_lenses.readout.lens.Lens` (``None``: the logit lens).
        hook_names: residual-width hook points to read (default: the residual stream).
        layers: residual-stream rows (0 = embedding, ``n_layers`` = final ``resid_post``).
        incl_mid: with the default rows, add each block's ``resid_mid``.
        positions: positions to read, counted within each prompt (an int, ints, or None
            for all; negatives count back from each prompt's own end: -1 is its last token).
        padding_side: ``"right"`` or ``"left"`` for a list of strings (None: the
            tokenizer's ``padding_side``).
        attention_mask: for int tokens: 1 marks a token, 0 padding (``[batch, pos]``).
        **readout: :func:`~tl_lenses.readout.engine.read_lens`'s ``k``, ``target``,
            ``chunk_size``, ``keep_logits``, ``progress``, ``fused``.

    Returns:
        A :class:`~tl_lenses.readout.result.LensResult`: ``[layer, batch, pos]`` grids of the
        top-k ids, logits and probabilities, entropy and KL(final || lens) in nats, and the
        target's rank, logit and probability; ``mask``/``lengths`` mark the pad cells.

    Raises:
        ValueError: naming the argument: unknown or non-residual hook points, ``hook_names``
            with ``layers`` or ``incl_mid``, out-of-range layers or positions, a bad
            ``k``/``target``/``padding_side``/``attention_mask``, a ``lens`` made for
            another model or without a translator at a chosen hook point (before the
            forward pass).
        TypeError: a ``lens`` that is not a lens (a string, say: load it first).

    >>> result = apply_lens(model, "hello world", k=3)
    >>> result.top_ids.shape == (model.cfg.n_layers + 1, 1, 11, 3)
    True
    """
    check_model(model)
    check_lens(model, lens)
    batch = to_batch(model, input, padding_side=padding_side, attention_mask=attention_mask)
    names = select_hook_names(model, hook_names, layers, incl_mid, lens)
    _check_lens_covers(model, lens, names)
    batch.select(positions)  # fail on bad positions before the forward pass
    cache = run_cache(model, batch, [*names, final_resid_name(model)])
    return read_own_cache(model, cache, batch, lens, names, positions=positions, **readout)


def apply_lens_to_cache(
    model, cache, tokens, lens: Lens | None = None, *, hook_names: Sequence[str] | None = None,
    layers: Sequence[IntLike] | None = None, incl_mid: bool = False, positions=None,
    attention_mask: Tensor | None = None, **readout,
) -> LensResult:
    """Read hook points out of an existing ``ActivationCache`` (or dict) through ``lens``.

    The cache is checked against ``tokens`` first, as DLA checks its ``cache=``
    (:mod:`tl_lenses.cache_checks`; a few tensor ops): at the cells read, the cached
    embedding must be this model's embedding of each token (read at ``hook_embed``, else at
    ``blocks.0.hook_resid_pre`` less the learned position embedding, else not checked); a
    left-padded batch's cache must hold ``blocks.0.attn.hook_pattern`` and show that it was
    taken with the attention mask (no attention from real tokens to pads). Right padding
    needs no pattern (attention is causal).

    Args:
        model: the model the cache came from.
        cache: an ``ActivationCache`` or a dict holding every read hook point and the final
            ``resid_post``, each ``[batch, pos, d_model]``; for a left-padded batch also
            ``blocks.0.attn.hook_pattern`` ``[batch, head_index, pos, pos]``.
        tokens: the int tokens ``[batch, pos]`` the cache was computed on, or their
            :class:`~tl_lenses.inputs.Batch`.
        lens: as in :func:`apply_lens`.
        hook_names: as in :func:`apply_lens`.
        layers: as in :func:`apply_lens`.
        incl_mid: as in :func:`apply_lens`.
        positions: as in :func:`apply_lens`.
        attention_mask: the mask the cached run had, if it was padded (1 token, 0 pad).
        **readout: as in :func:`apply_lens`.

    Returns:
        A :class:`~tl_lenses.readout.result.LensResult`, equal to :func:`apply_lens` on the
        same tokens.

    Raises:
        ValueError: naming ``cache``: it lacks a needed hook point, its ``[batch, pos]`` do
            not match ``tokens``, it is of another width, its embeddings at the cells read
            are not this model's of the tokens (a cache of other tokens or of another
            model), or, for a left-padded batch, it lacks ``blocks.0.attn.hook_pattern`` or
            was taken without the attention mask; and every error of :func:`apply_lens`.

    >>> tokens = model.to_tokens("hello world")
    >>> _, cache = model.run_with_cache(tokens)
    >>> bool((apply_lens_to_cache(model, cache, tokens).top_ids ==
    ...       apply_lens(model, tokens).top_ids).all())
    True
    """
    check_model(model)
    check_lens(model, lens)
    batch = to_batch(model, tokens, attention_mask=attention_mask, argument="tokens")
    names = select_hook_names(model, hook_names, layers, incl_mid, lens)
    return read_own_cache(model, cache, batch, lens, names, positions=positions,
                          given=_CACHE, **readout)


def read_own_cache(model, cache, batch: Batch, lens: Lens | None, names: Sequence[str], *,
                   positions=None, given: Given | None = None, **readout) -> LensResult:
    """:func:`apply_lens_to_cache` on checked arguments, for a cache tl_lenses took itself.

    ``given``: how to name a cache the user gave, which is then checked against ``batch``
    (:func:`~tl_lenses.cache_checks.check_cache_input`); None for tl_lenses' own
    ``run_cache`` of ``batch`` (nothing to check).
    """
    final = final_resid_name(model)
    # Where sae-lens spliced an SAE in, the row reads what flows on: its hook_sae_output.
    keys = {name: flowing_name(cache, name) for name in [*names, final]}
    missing = [name for name, key in keys.items() if key not in cache]
    if missing:
        raise ValueError(
            f"cache lacks hook points the lens needs: {sorted(set(missing))}; run "
            "run_with_cache without a names_filter that drops them"
        )
    selection = batch.select(positions)
    # One gather per hook point: the final residual read as a row stays the same tensor,
    # so the readout reuses its logits. (The readout moves residuals to the model's device.)
    read = {name: _at_positions(cache[keys[name]], selection, batch, name)
            for name in {*names, final}}
    if given is not None:  # after the shapes are known to match the tokens
        check_cache_input(model, cache, batch, selection, given=given)
    resids, final_resid = [read[name] for name in names], read[final]
    return read_lens(model, lens, resids, final_resid, names, batch,
                     positions=selection, **readout)


def _check_lens_covers(model, lens: Lens | None, hook_names: Sequence[str]) -> None:
    """Raise the lens's own error now for a hook point it cannot read (no translator).

    Each name is translated once on an empty residual ``[0, d_model]`` on the readout's
    device, so a :class:`~tl_lenses.lenses.tuned.TunedLens` without a translator there
    fails before a forward pass is paid for, with the message the readout would give.
    """
    if lens is None:
        return
    device = model_device(model)  # the readout's (checked by the caller's check_model)
    probe = torch.zeros(0, model.cfg.d_model, device=device, dtype=model.cfg.dtype)
    with torch.inference_mode():
        for name in hook_names:
            lens.translate(probe, name)


def _at_positions(resid: Tensor, selection: Selection, batch: Batch, name: str) -> Tensor:
    if resid.shape[:2] != batch.tokens.shape:
        raise ValueError(
            f"cache[{name!r}] has shape {tuple(resid.shape)}, which does not match tokens "
            f"{tuple(batch.tokens.shape)}"
        )
    if selection.positions == list(range(batch.tokens.shape[1])) and not batch.padded:
        return resid  # every column as it is: no copy
    return selection.gather(resid)


class LensCollector:
    """Hook functions that collect a lens readout during a normal forward pass.

    >>> collector = LensCollector(model, hook_names=["blocks.1.hook_attn_out"])  # doctest: +SKIP
    >>> model.run_with_hooks(tokens, fwd_hooks=collector.fwd_hooks())            # doctest: +SKIP
    >>> collector.result(tokens, k=5)                                            # doctest: +SKIP

    The hooks keep the d_model-wide residuals of the chosen hook points, whole (``[batch,
    pos, d_model]``: which columns ``positions`` picks depends on each prompt's padding,
    known only from the tokens given to ``result``), never logits, and return None, so the
    forward pass is unchanged; the readout happens in ``result``, once the final residual
    (needed for KL and the final top-1) has been seen, at the chosen positions only.

    What the hooks saw is checked against the ``tokens`` (and ``attention_mask``) given to
    ``result`` as :func:`apply_lens_to_cache` checks a cache: two more hooks keep the token
    embeddings (``hook_embed``, unless ``blocks.0.hook_resid_pre`` is collected anyway) and
    layer 0's attention of the last query (``[batch, head_index, 1, pos]``), so other tokens
    and a left-padded run without its mask are refused. Not checked: a masked run read
    without its ``attention_mask`` (its pad cells are then read as tokens), tokens that
    differ only outside the positions read, and hooks of the user's that edit the run
    elsewhere (the lens then reads the edited run, as intended).

    Raises:
        ValueError: at construction: a lens without a translator at a chosen hook point, and
            :func:`apply_lens`'s errors on ``hook_names``/``layers``/``incl_mid``/``lens``.
    """

    def __init__(self, model, lens: Lens | None = None, *, hook_names=None, layers=None,
                 incl_mid: bool = False, positions=None):
        check_model(model)
        check_lens(model, lens)
        self.model, self.lens = model, lens
        self.hook_names = select_hook_names(model, hook_names, layers, incl_mid, lens)
        _check_lens_covers(model, lens, self.hook_names)  # before a forward pass is paid for
        self.positions = positions
        self.final = final_resid_name(model)
        self.store: dict[str, Float[Tensor, "batch pos d_model"]] = {}

    def hook_for(self, name: str):
        """A plain ``(tensor, hook)`` hook function that keeps the residual under ``name``.

        Keyed by the requested name, not ``hook.name``: on a TransformerBridge the legacy
        names are aliases and the hook reports its canonical name.
        """

        def hook(resid: Float[Tensor, "batch pos d_model"], hook) -> None:
            self.store[name] = resid.detach().clone()

        return hook

    def _keep_last_query(self, pattern: Float[Tensor, "batch head_index pos src_pos"],
                         hook) -> None:
        # The last query is a real token of every left-padded prompt: enough to see a run
        # that attended to its pads, at 1/pos of the pattern's memory.
        self.store[PATTERN_HOOK] = pattern[:, :, -1:].detach().clone()

    def fwd_hooks(self) -> list[tuple[str, object]]:
        """``(name, hook)`` pairs for ``run_with_hooks``: the chosen points and the final.

        Plus the two that ``result`` checks the tokens against: the token embeddings
        (unless ``blocks.0.hook_resid_pre`` is read) and layer 0's attention pattern.
        """
        hook_dict = self.model.hook_dict
        pairs = [(flowing_name(hook_dict, name), self.hook_for(name))
                 for name in dict.fromkeys([*self.hook_names, self.final])]
        if RESID_HOOK not in self.hook_names and EMBED_HOOK in hook_dict:
            pairs.append((EMBED_HOOK, self.hook_for(EMBED_HOOK)))
        if PATTERN_HOOK in hook_dict:
            pairs.append((PATTERN_HOOK, self._keep_last_query))
        return pairs

    def result(self, tokens, *, attention_mask: Tensor | None = None, **readout) -> LensResult:
        """The readout of what the hooks saw (``tokens``: the input of that forward pass).

        Args:
            tokens: the int tokens ``[batch, pos]`` (or their
                :class:`~tl_lenses.inputs.Batch`) of the forward pass the hooks saw.
            attention_mask: the mask that forward pass had, if it was padded.
            **readout: as in :func:`apply_lens`.

        Raises:
            ValueError: before any forward pass ran with :meth:`fwd_hooks`; naming the
                forward pass the hooks saw: it was of other tokens, or of a left-padded batch
                without its attention mask; and every error of :func:`apply_lens_to_cache`.
        """
        if not self.store:
            raise ValueError("the collector has seen no forward pass yet: run the model with "
                             "its hooks first, e.g. model.run_with_hooks(tokens, "
                             "fwd_hooks=collector.fwd_hooks()), then call result(tokens)")
        check_lens(self.model, self.lens)
        batch = to_batch(self.model, tokens, attention_mask=attention_mask, argument="tokens")
        return read_own_cache(self.model, self.store, batch, self.lens, self.hook_names,
                              positions=self.positions, given=_COLLECTED, **readout)
