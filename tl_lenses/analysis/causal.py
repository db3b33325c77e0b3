"""Are a lens's readings causal? Intervene where the lens reads and compare with the model.

For a layer ``l`` and a lens (logit or tuned), take one position per row and change the
residual ``h`` there along the directions the lens reads:

* ``"top-token"``: project out the direction the lens's top-1 logit reads,
  ``d = T^T C (w * W_U[:, t])`` (``T`` the translator's linear part, ``w`` the final norm's
  scale, ``C`` its centring for LayerNorm), i.e. ``h' = h - (h . d^) d^``;
* ``"resample"``: resample-ablate the rank-``rank`` subspace the lens decodes most strongly
  (top right-singular vectors of ``W_U^T diag(w) C T``): ``h' = h - P h + P h_other``, with
  ``h_other`` the same layer's residual at another row's position.

The lens predicts the effect as KL(lens(h) || lens(h')); the model's own effect is
KL(output || output after patching ``h'`` in at layer ``l``), at the same position. A
causally faithful lens has both large together: per layer we report their means and the
Spearman correlation over tokens, plus the drop in the probability of the lens's top-1
token under the lens and under the model (Belrose et al. 2023, sec. 5, "causal fidelity").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_lenses._ints import as_ints
from tl_lenses.analysis._stream import (
    batches,
    cached,
    check_lenses,
    check_positive,
    check_tokens,
    frozen_unembed,
    spearman,
)
from tl_lenses.hooks import final_resid_name, resid_names, short_label
from tl_lenses.lenses.logit import LogitLens
from tl_lenses.readout.lens import Lens
from tl_lenses.viz.notebook import NotebookView

INTERVENTIONS = ("top-token", "resample")
EFFECTS = ("lens_kl", "model_kl", "lens_drop", "model_drop")


@dataclass(repr=False)
class CausalResult(NotebookView):
    """Per lens and layer: the effects of the intervention on the lens and on the model.

    ``effects[lens][name]`` is ``[layer, rows]`` (one sampled position per text row), with
    names :data:`EFFECTS`: KL(before || after) of the lens's and of the model's output
    distribution (nats), and the drop in the probability of the lens's top-1 token.
    """

    hook_names: list[str]
    intervention: str
    effects: dict[str, dict[str, Float[Tensor, "layer rows"]]]
    rank: int | None = None

    @property
    def labels(self) -> list[str]:
        """Short row labels (``3 pre``)."""
        return [short_label(n) for n in self.hook_names]

    def correlation(self, lens: str, what: str = "kl") -> Float[Tensor, " layer"]:
        """Spearman over tokens, per layer, of the lens's and the model's effect."""
        e = self.effects[lens]
        return torch.tensor([spearman(a, b) for a, b in
                             zip(e[f"lens_{what}"], e[f"model_{what}"])])

    def means(self, lens: str) -> dict[str, Float[Tensor, " layer"]]:
        """Mean over tokens of each effect, per layer."""
        return {name: value.mean(-1) for name, value in self.effects[lens].items()}

    def to_html(self) -> str:
        """Per-layer table: mean effects and correlations for each lens."""
        from tl_lenses.analysis.view import causal_html

        return causal_html(self)

    def _view_html(self, full: bool = False, **view) -> str:
        return self.to_html()

    def save_png(self, path) -> Path:
        """Mean lens vs model effect and their correlation per layer."""
        from tl_lenses.analysis.view import causal_png

        return causal_png(self, path)


def causal_fidelity(
    model, tokens: Int[Tensor, "batch pos"], lenses: Mapping[str, Lens] | None = None, *,
    intervention: str = "top-token", rank: int = 8, layers: Sequence[int] | None = None,
    batch_size: int = 8, seed: int = 0, progress: bool = True,
) -> CausalResult:
    """Compare the change a lens predicts with the model's change, per layer.

    Args:
        model: a HookedTransformer or compatibility-mode TransformerBridge.
        tokens: int token rows ``[batch, pos]`` (pos >= 2); one position per row is sampled
            (seeded) from positions 1..pos-1, ``batch_size`` rows per forward pass.
        lenses: name -> lens covering the chosen ``resid_pre`` points (default: the logit
            lens); translators must be affine (a :class:`TunedLens` or the logit lens).
        intervention: ``"top-token"`` or ``"resample"`` (see the module docstring).
        rank: dimension of the resampled subspace (``"resample"`` only).
        layers: block indices whose ``resid_pre`` is intervened on (default all).
        batch_size: rows per forward pass.
        seed: seeds the sampled positions.
        progress: a tqdm bar.

    Returns:
        A :class:`CausalResult` (rows = sampled tokens).

    Raises:
        ValueError: on malformed tokens or arguments.

    Examples:
        >>> rows = torch.randint(0, model.cfg.d_vocab, (4, 12), generator=torch.manual_seed(0))
        >>> result = causal_fidelity(model, rows, progress=False)
        >>> sorted(result.effects), result.labels
        (['logit lens'], ['0 pre', '1 pre', '2 pre'])

    Source: Belrose et al. 2023, sec. 5 (causal basis extraction and causal fidelity);
    the "causal or statistical artifact?" question of the lecture notes.
    """
    check_tokens(model, tokens)
    if intervention not in INTERVENTIONS:
        raise ValueError(f"intervention must be one of {INTERVENTIONS}, got {intervention!r}")
    check_positive(rank=rank, batch_size=batch_size)
    if rank > model.cfg.d_model:
        raise ValueError(f"rank must be <= d_model={model.cfg.d_model}, got {rank}")
    lenses = check_lenses(model, lenses, {"logit lens": LogitLens()})
    names = _layer_names(model, layers)
    unembed = frozen_unembed(model)
    reads = {key: [_read_map(lens, name, model.cfg.d_model) for name in names]
             for key, lens in lenses.items()}
    subspaces = None
    if intervention == "resample":
        subspaces = {key: [_subspace(m, unembed, rank) for m in maps]
                     for key, maps in reads.items()}
    generator = torch.Generator().manual_seed(seed)
    collected = {key: {e: [[] for _ in names] for e in EFFECTS} for key in lenses}
    for batch in batches(model, tokens, batch_size, desc="causal fidelity", progress=progress):
        positions = torch.randint(1, batch.shape[1], (batch.shape[0],), generator=generator)
        acts = cached(model, batch, names + [final_resid_name(model)])
        rows = torch.arange(len(batch))
        clean = unembed(acts[final_resid_name(model)][rows, positions])
        for key, lens in lenses.items():
            for j, name in enumerate(names):
                h = acts[name][rows, positions]
                edited = _edit(h, lens, name, reads[key][j], unembed, intervention,
                               None if subspaces is None else subspaces[key][j])
                effects = _effects(model, lens, name, unembed, batch, positions, h, edited,
                                   clean)
                for e, value in zip(EFFECTS, effects):
                    collected[key][e][j].append(value.cpu())
    effects = {key: {e: torch.stack([torch.cat(v) for v in per_layer]).float()
                     for e, per_layer in d.items()} for key, d in collected.items()}
    return CausalResult(names, intervention, effects,
                        rank if intervention == "resample" else None)


def _layer_names(model, layers) -> list[str]:
    n = model.cfg.n_layers
    layers = list(range(n)) if layers is None else (
        [layers] if (ints := as_ints(layers)) is None else ints)
    bad = [l for l in layers if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < n]
    if bad or not layers:
        raise ValueError(f"layers must be non-empty block indices in [0, {n}), got {layers}")
    return [resid_names(model)[l] for l in layers]


def _read_map(lens: Lens, name: str, d_model: int) -> Float[Tensor, "d_model d_model"]:
    """The linear part ``T`` of the lens's translator at ``name`` (``T h`` = translate - bias)."""
    with torch.no_grad():
        eye = torch.eye(d_model)
        weight = getattr(lens, "weight", None)
        device = weight.device if weight is not None else eye.device
        eye = eye.to(device)
        zero = torch.zeros(1, d_model, device=device)
        out = lens.translate(eye, name) - lens.translate(zero, name)     # rows: T e_i
    return out.T.float()


def _decoder_rows(unembed, T: Tensor) -> Tensor:
    """``W_U^T diag(w) C T``: logits as a linear function of ``h`` (norm's scale aside)."""
    W = unembed.W_U.float()
    if unembed.weight is not None:
        W = W * unembed.weight.float()[:, None]
    if unembed.kind == "layernorm":
        W = W - W.mean(0, keepdim=True)
    return W.T @ T.to(W.device)                                          # [d_vocab, d_model]


def _subspace(T, unembed, rank: int) -> Float[Tensor, "d_model rank"]:
    """Orthonormal top-``rank`` right-singular vectors of the lens's decoding map."""
    M = _decoder_rows(unembed, T).double()
    _, vectors = torch.linalg.eigh(M.T @ M)                              # ascending
    return vectors[:, -rank:].float()


def _edit(h, lens, name, T, unembed, intervention, subspace):
    """The residuals after the intervention (one per row)."""
    if intervention == "resample":
        other = torch.roll(h, 1, dims=0)
        P = subspace.to(h.device)
        return h - (h @ P) @ P.T + (other @ P) @ P.T
    with torch.no_grad():
        top = unembed(lens.translate(h, name)).argmax(-1)
    M = _decoder_rows(unembed, T)                                       # [d_vocab, d_model]
    d = M[top]
    d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return h - (h * d).sum(-1, keepdim=True) * d


def _effects(model, lens, name, unembed, batch, positions, h, edited, clean):
    """(lens KL, model KL, lens drop, model drop) per row for one layer."""
    with torch.no_grad():
        before = torch.log_softmax(unembed(lens.translate(h, name)), -1)
        after = torch.log_softmax(unembed(lens.translate(edited, name)), -1)
        top = before.argmax(-1, keepdim=True)
        patched = torch.log_softmax(_patched_output(model, name, unembed, batch, positions,
                                                    edited), -1)
        clean = torch.log_softmax(clean, -1)
    kl = lambda p, q: (p.exp() * (p - q)).sum(-1)  # noqa: E731
    drop = lambda p, q: (p.gather(-1, top) .exp() - q.gather(-1, top).exp())[:, 0]  # noqa
    return kl(before, after), kl(clean, patched), drop(before, after), drop(clean, patched)


def _patched_output(model, name, unembed, batch, positions, edited):
    """The model's output logits at ``positions`` with ``edited`` written in at ``name``."""
    rows = torch.arange(len(batch))
    stop = int(positions.max()) + 1                    # later positions cannot matter
    seen = {}

    def write(resid, hook):
        resid = resid.clone()
        resid[rows, positions] = edited.to(resid.dtype)
        return resid

    def keep(resid, hook):
        seen["final"] = resid[rows, positions].float()

    hooks = [(name, write), (final_resid_name(model), keep)]
    with torch.no_grad():
        model.run_with_hooks(batch[:, :stop], fwd_hooks=hooks, return_type=None)
    return unembed(seen["final"])
