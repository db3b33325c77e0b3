"""Running a lens: on a prompt, over an ActivationCache, or as hooks in a forward pass."""

from __future__ import annotations

from typing import Sequence

from jaxtyping import Float
from torch import Tensor

from tl_lenses._ints import is_int
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
            another model.
        TypeError: a ``lens`` that is not a lens (a string, say: load it first).

    >>> result = apply_lens(model, "hello world", k=3)
    >>> result.top_ids.shape == (model.cfg.n_layers + 1, 1, 11, 3)
    True
    """
    check_model(model)
    check_lens(model, lens)
    batch = to_batch(model, input, padding_side=padding_side, attention_mask=attention_mask)
    names = select_hook_names(model, hook_names, layers, incl_mid, lens)
    batch.select(positions)  # fail on bad positions before the forward pass
    cache = run_cache(model, batch, [*names, final_resid_name(model)])
    return apply_lens_to_cache(model, cache, batch, lens, hook_names=names,
                               positions=positions, **readout)


def apply_lens_to_cache(
    model, cache, tokens, lens: Lens | None = None, *, hook_names: Sequence[str] | None = None,
    layers: Sequence[IntLike] | None = None, incl_mid: bool = False, positions=None,
    attention_mask: Tensor | None = None, **readout,
) -> LensResult:
    """Read hook points out of an existing ``ActivationCache`` (or dict) through ``lens``.

    Args:
        model: the model the cache came from.
        cache: an ``ActivationCache`` or a dict holding every read hook point and the final
            ``resid_post``, each ``[batch, pos, d_model]``.
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
        ValueError: the cache lacks a needed hook point or does not match ``tokens``, and
            every error of :func:`apply_lens`.

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
    resids, final_resid = [read[name] for name in names], read[final]
    return read_lens(model, lens, resids, final_resid, names, batch,
                     positions=selection, **readout)


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
    """

    def __init__(self, model, lens: Lens | None = None, *, hook_names=None, layers=None,
                 incl_mid: bool = False, positions=None):
        check_model(model)
        check_lens(model, lens)
        self.model, self.lens = model, lens
        self.hook_names = select_hook_names(model, hook_names, layers, incl_mid, lens)
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

    def fwd_hooks(self) -> list[tuple[str, object]]:
        """``(name, hook)`` pairs for ``run_with_hooks``: the chosen points and the final."""
        hook_dict = self.model.hook_dict
        return [(flowing_name(hook_dict, name), self.hook_for(name))
                for name in dict.fromkeys([*self.hook_names, self.final])]

    def result(self, tokens, **readout) -> LensResult:
        """The readout of what the hooks saw (``tokens``: the input of that forward pass).

        Raises:
            ValueError: before any forward pass ran with :meth:`fwd_hooks`, and every error
                of :func:`apply_lens_to_cache`.
        """
        if not self.store:
            raise ValueError("the collector has seen no forward pass yet: run the model with "
                             "its hooks first, e.g. model.run_with_hooks(tokens, "
                             "fwd_hooks=collector.fwd_hooks()), then call result(tokens)")
        return apply_lens_to_cache(self.model, self.store, tokens, self.lens,
                                   hook_names=self.hook_names, positions=self.positions,
                                   **readout)
