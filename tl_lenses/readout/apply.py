"""Running a lens: on a prompt, over an ActivationCache, or as hooks in a forward pass."""

from __future__ import annotations

from typing import Sequence

from jaxtyping import Float
from torch import Tensor

from tl_lenses.hooks import (
    check_hook_names,
    final_resid_name,
    flowing_name,
    resid_names,
    resolve_layer,
    resolve_positions,
    run_cache,
)
from tl_lenses.inputs import to_tokens
from tl_lenses.models import check_model
from tl_lenses.readout.engine import read_lens
from tl_lenses.readout.lens import Lens
from tl_lenses.readout.result import LensResult


def select_hook_names(model, hook_names=None, layers=None, incl_mid: bool = False) -> list[str]:
    """Hook names to read: given ones, or the residual stream (optionally some ``layers``).

    ``layers`` index the residual stream as ``resid_names`` lays it out: 0 is the
    embedding (``blocks.0.hook_resid_pre``) and ``n_layers`` the final ``resid_post``.
    """
    if hook_names is not None and layers is not None:
        raise ValueError("pass hook_names or layers, not both")
    if hook_names is not None:
        return check_hook_names(model, hook_names)
    if layers is None:
        return resid_names(model, incl_mid=incl_mid)
    if not len(layers):
        raise ValueError("layers must name at least one residual-stream layer")
    return [resolve_layer(model, layer, argument="layers")[1] for layer in layers]


def apply_lens(
    model, input, lens: Lens | None = None, *, hook_names: Sequence[str] | None = None,
    layers: Sequence[int] | None = None, incl_mid: bool = False, positions=None, **readout,
) -> LensResult:
    """Run ``model`` on ``input`` and read every chosen hook point through ``lens``.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge``.
        input: a string, a list of strings, or int tokens ``[batch, pos]``.
        lens: a :class:`~tl_lenses.readout.lens.Lens` (``None``: the logit lens).
        hook_names: residual-width hook points to read (default: the residual stream).
        layers: residual-stream rows (0 = embedding, ``n_layers`` = final ``resid_post``).
        incl_mid: with the default rows, add each block's ``resid_mid``.
        positions: columns to read (an int, ints, or None for all; negatives count back).
        **readout: :func:`~tl_lenses.readout.engine.read_lens`'s ``k``, ``target``,
            ``chunk_size``, ``keep_logits``, ``progress``, ``fused``.

    Returns:
        A :class:`~tl_lenses.readout.result.LensResult`: ``[layer, batch, pos]`` grids of the
        top-k ids, logits and probabilities, entropy and KL(final || lens) in nats, and the
        target's rank, logit and probability.

    Raises:
        ValueError: naming the argument: unknown or non-residual hook points, ``hook_names``
            with ``layers``, out-of-range layers or positions, a bad ``k``/``target``.

    >>> result = apply_lens(model, "hello world", k=3)
    >>> result.top_ids.shape == (model.cfg.n_layers + 1, 1, 11, 3)
    True
    """
    check_model(model)
    tokens = to_tokens(model, input)
    names = select_hook_names(model, hook_names, layers, incl_mid)
    cache = run_cache(model, tokens, [*names, final_resid_name(model)])
    return apply_lens_to_cache(model, cache, tokens, lens, hook_names=names,
                               positions=positions, **readout)


def apply_lens_to_cache(
    model, cache, tokens, lens: Lens | None = None, *, hook_names: Sequence[str] | None = None,
    layers: Sequence[int] | None = None, incl_mid: bool = False, positions=None, **readout,
) -> LensResult:
    """Read hook points out of an existing ``ActivationCache`` (or dict) through ``lens``.

    Args:
        model: the model the cache came from.
        cache: an ``ActivationCache`` or a dict holding every read hook point and the final
            ``resid_post``, each ``[batch, pos, d_model]``.
        tokens: the int tokens ``[batch, pos]`` the cache was computed on.
        lens: as in :func:`apply_lens`.
        hook_names: as in :func:`apply_lens`.
        layers: as in :func:`apply_lens`.
        incl_mid: as in :func:`apply_lens`.
        positions: as in :func:`apply_lens`.
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
    tokens = to_tokens(model, tokens, argument="tokens")
    names = select_hook_names(model, hook_names, layers, incl_mid)
    final = final_resid_name(model)
    # Where sae-lens spliced an SAE in, the row reads what flows on: its hook_sae_output.
    keys = {name: flowing_name(cache, name) for name in [*names, final]}
    missing = [name for name, key in keys.items() if key not in cache]
    if missing:
        raise ValueError(
            f"cache lacks hook points the lens needs: {sorted(set(missing))}; run "
            "run_with_cache without a names_filter that drops them"
        )
    pos = resolve_positions(tokens.shape[1], positions)
    resids = [_at_positions(cache[keys[name]], pos, tokens, name) for name in names]
    final_resid = _at_positions(cache[keys[final]], pos, tokens, final)
    return read_lens(model, lens, resids, final_resid, names, tokens,
                     positions=pos, **readout)


def _at_positions(resid: Tensor, positions: list[int], tokens: Tensor, name: str) -> Tensor:
    if resid.shape[:2] != tokens.shape:
        raise ValueError(
            f"cache[{name!r}] has shape {tuple(resid.shape)}, which does not match tokens "
            f"{tuple(tokens.shape)}"
        )
    # A cache may sit on another device (run_with_cache(device=...)): read on the model's.
    resid = resid.to(tokens.device)
    return resid if len(positions) == tokens.shape[1] else resid[:, positions]


class LensCollector:
    """Hook functions that collect a lens readout during a normal forward pass.

    >>> collector = LensCollector(model, hook_names=["blocks.1.hook_attn_out"])  # doctest: +SKIP
    >>> model.run_with_hooks(tokens, fwd_hooks=collector.fwd_hooks())            # doctest: +SKIP
    >>> collector.result(tokens, k=5)                                            # doctest: +SKIP

    The hooks keep only the d_model-wide residuals at the chosen positions (never logits)
    and return None, so the forward pass is unchanged; the readout happens in ``result``,
    once the final residual (needed for KL and the final top-1) has been seen.
    """

    def __init__(self, model, lens: Lens | None = None, *, hook_names=None, layers=None,
                 incl_mid: bool = False, positions=None):
        check_model(model)
        self.model, self.lens = model, lens
        self.hook_names = select_hook_names(model, hook_names, layers, incl_mid)
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
        """The readout of what the hooks saw (``tokens``: the input of that forward pass)."""
        return apply_lens_to_cache(self.model, self.store, tokens, self.lens,
                                   hook_names=self.hook_names, positions=self.positions,
                                   **readout)
