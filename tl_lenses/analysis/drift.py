"""Representational drift: how similar are the residual bases of different layers?

Three layer x layer matrices over text:

* **linear CKA** (Kornblith et al. 2019) of the residuals of every two layers: do the
  layers arrange the tokens the same way (up to rotation and scale)? Streamed as minibatch
  CKA (Nguyen et al. 2021): the biased HSIC of each minibatch of ``cka_rows`` tokens is
  summed over minibatches before normalising, so memory is ``layers x cka_rows^2``.
* **covariance similarity**: the cosine (Frobenius inner product, normalised) of the two
  layers' residual covariance matrices: do the same *directions* carry the variance?
* **translator transfer** (with a tuned lens): held-out KL(final || lens) when layer ``m``'s
  residual is decoded with layer ``l``'s translator, for ``|m - l| <= max_offset``: how well
  does a translator serve the layers near it?

Position 0 is left out by default: its residual is an outlier (an attention sink) in many
models and would dominate every second moment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_lenses.analysis._stream import batches, cached, check_positive, check_tokens, frozen_unembed
from tl_lenses.hooks import resid_names, short_label
from tl_lenses.lenses.tuned.lens import TunedLens
from tl_lenses.readout.fingerprint import check_lens
from tl_lenses.viz.notebook import NotebookView


@dataclass(repr=False)
class DriftResult(NotebookView):
    """Layer x layer similarities of the residual stream (``n_layers + 1`` rows).

    ``cka`` and ``covariance``: ``[layer, layer]``, symmetric, 1 on the diagonal.
    ``transfer_kl[l, m]``: mean KL (nats) of decoding layer m with layer l's translator
    (NaN outside the band, and without a tuned lens); ``logit_kl[m]``: the logit lens's.
    ``translator_cosine[l, m]``: cosine of the flattened weights ``A_l``, ``A_m``.
    """

    hook_names: list[str]
    cka: Float[Tensor, "layer layer"]
    covariance: Float[Tensor, "layer layer"]
    transfer_kl: Float[Tensor, "layer layer"] | None = None
    logit_kl: Float[Tensor, " layer"] | None = None
    translator_cosine: Float[Tensor, "layer layer"] | None = None
    n_tokens: int = 0
    transfer_names: list[str] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        """Short row labels (``3 pre``)."""
        return [short_label(n) for n in self.hook_names]

    def to_html(self) -> str:
        """The heatmaps as HTML tables."""
        from tl_lenses.analysis.view import drift_html

        return drift_html(self)

    def _view_html(self, full: bool = False, **view) -> str:
        return self.to_html()

    def save_png(self, path) -> Path:
        """CKA, covariance similarity and translator transfer side by side."""
        from tl_lenses.analysis.view import drift_png

        return drift_png(self, path)


def linear_cka(x: Float[Tensor, "rows d_x"], y: Float[Tensor, "rows d_y"]) -> float:
    """Linear CKA of two representations of the same rows (Kornblith et al. 2019, eq. 5).

    ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` of the column-centred matrices: 1 for
    ``y = c x Q`` with ``Q`` orthogonal, ``c != 0``.

    Args:
        x: one representation, ``[rows, d_x]`` (any units).
        y: the other, ``[rows, d_y]``, row ``i`` the same input as ``x``'s row ``i``.

    Returns:
        The CKA in [0, 1] (float64 arithmetic).

    Raises:
        ValueError: unless ``x`` and ``y`` are 2-D with the same number (>= 2) of rows.

    Examples:
        >>> x = torch.randn(50, 8, generator=torch.manual_seed(0))
        >>> q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.manual_seed(1)))
        >>> round(linear_cka(x, 3 * x @ q), 6)          # invariant to rotation and scale
        1.0

    Source: Kornblith et al. 2019, "Similarity of Neural Network Representations
    Revisited", eq. 5 (linear kernel).
    """
    if x.dim() != 2 or y.dim() != 2 or len(x) != len(y) or len(x) < 2:
        raise ValueError(f"x and y must be [rows, d] with the same rows (>= 2), got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return float((y.T @ x).pow(2).sum() / ((x.T @ x).norm() * (y.T @ y).norm()))


def residual_drift(
    model, tokens: Int[Tensor, "batch pos"], *, tuned: TunedLens | None = None,
    max_offset: int | None = 3, drop_first: bool = True, cka_rows: int = 512,
    batch_size: int = 8, progress: bool = True,
) -> DriftResult:
    """CKA, covariance similarity and (with ``tuned``) translator transfer between layers.

    Args:
        model: a HookedTransformer or compatibility-mode TransformerBridge.
        tokens: int token rows ``[batch, pos]``, streamed ``batch_size`` rows at a time.
        tuned: a tuned lens covering the ``resid_pre`` points; without it, no transfer.
        max_offset: translator transfer for ``|m - l| <= max_offset`` (None: every pair).
        drop_first: leave position 0 out (see the module docstring).
        cka_rows: tokens per CKA minibatch, >= 2 (memory ``layers x cka_rows^2`` floats).
        batch_size: rows of ``tokens`` per forward pass.
        progress: a tqdm bar.

    Returns:
        A :class:`DriftResult`.

    Raises:
        ValueError: on malformed tokens or arguments, or a lens not covering the layers.

    Examples:
        >>> rows = torch.randint(0, model.cfg.d_vocab, (4, 12), generator=torch.manual_seed(0))
        >>> result = residual_drift(model, rows, progress=False)
        >>> result.cka.shape, torch.allclose(result.cka.diagonal(), torch.ones(4))
        (torch.Size([4, 4]), True)

    Source: Kornblith et al. 2019 (linear CKA), Nguyen et al. 2021 (minibatch CKA); the
    drift question of the lecture notes; Belrose et al. 2023, sec. 4.1 (translator transfer).
    """
    check_tokens(model, tokens, min_pos=3 if drop_first else 2, scores_next=False)
    check_positive(cka_rows=cka_rows)
    check_lens(model, tuned, argument="tuned")
    if cka_rows < 2:
        # One row centred is zero: every HSIC, and so every CKA, would be 0 / 0.
        raise ValueError(f"cka_rows must be >= 2 (tokens per CKA minibatch), got {cka_rows}")
    if max_offset is not None and (isinstance(max_offset, bool) or not isinstance(max_offset, int)
                                   or max_offset < 0):
        raise ValueError(f"max_offset must be None or an int >= 0, got {max_offset!r}")
    names = resid_names(model)
    d, n = model.cfg.d_model, len(names)
    hsic = torch.zeros(n, n, dtype=torch.float64)
    moments = _Moments(n, d)
    transfer = _Transfer(model, tuned, names, max_offset) if tuned is not None else None
    for batch in batches(model, tokens, batch_size, desc="drift", progress=progress):
        acts = cached(model, batch, names)
        stack = torch.stack([acts[name][:, int(drop_first):] for name in names])
        flat = stack.reshape(n, -1, d).double()
        for start in range(0, flat.shape[1], cka_rows):
            hsic += minibatch_hsic(flat[:, start:start + cka_rows]).cpu()
        moments.add(flat.cpu())
        if transfer is not None:
            transfer.add(acts, int(drop_first))
    scale = hsic.diagonal().sqrt()
    result = DriftResult(names, (hsic / scale[:, None] / scale[None, :]).float(),
                         moments.similarity().float(), n_tokens=moments.count)
    if transfer is not None:
        result.transfer_kl, result.logit_kl = transfer.means()
        result.translator_cosine = translator_cosine(tuned, names)
        result.transfer_names = list(tuned.hook_names)
    return result


def minibatch_hsic(acts: Float[Tensor, "layer rows d_model"]) -> Float[Tensor, "layer layer"]:
    """Biased HSIC of linear kernels between every two layers on one minibatch (unscaled).

    ``tr(K_l H K_m H)`` = ``<X_l X_l^T, X_m X_m^T>`` for column-centred ``X``.
    """
    centred = acts - acts.mean(1, keepdim=True)
    grams = torch.bmm(centred, centred.transpose(1, 2)).flatten(1)      # [layer, rows^2]
    return grams @ grams.T


class _Moments:
    """Running first and second moments of each layer's residual (float64, on the CPU)."""

    def __init__(self, n: int, d: int):
        self.sum = torch.zeros(n, d, dtype=torch.float64)
        self.outer = torch.zeros(n, d, d, dtype=torch.float64)
        self.count = 0

    def add(self, flat: Tensor) -> None:
        self.sum += flat.sum(1)
        self.outer += torch.bmm(flat.transpose(1, 2), flat)
        self.count += flat.shape[1]

    def similarity(self) -> Tensor:
        mean = self.sum / self.count
        cov = (self.outer / self.count - mean[:, :, None] * mean[:, None, :]).flatten(1)
        cov = cov / cov.norm(dim=1, keepdim=True)
        return cov @ cov.T


class _Transfer:
    """Sums of KL(final || decode(T_l(h_m))) for the (translator, layer) pairs in the band."""

    def __init__(self, model, tuned: TunedLens, names, max_offset):
        self.unembed, self.tuned, self.names = frozen_unembed(model), tuned, names
        self.inner = names[:-1]
        missing = [name for name in self.inner if name not in tuned.hook_names]
        if missing:
            raise ValueError(f"tuned must cover every resid_pre; it lacks {missing}")
        n = len(self.inner)
        self.pairs = [(l, m) for l in range(n) for m in range(n)
                      if max_offset is None or abs(m - l) <= max_offset]
        self.kl = torch.zeros(n, n, dtype=torch.float64)
        self.logit = torch.zeros(n, dtype=torch.float64)
        self.count = 0

    def add(self, acts, first: int, chunk: int = 256) -> None:
        flat = {name: acts[name][:, first:].reshape(-1, acts[name].shape[-1])
                for name in self.names}
        with torch.no_grad():
            for start in range(0, len(flat[self.names[-1]]), chunk):
                self._add_rows({k: v[start:start + chunk] for k, v in flat.items()})

    def _add_rows(self, rows) -> None:
        final = torch.log_softmax(self.unembed(rows[self.names[-1]]), dim=-1)
        p = final.exp()
        kl = lambda h: (p * (final - torch.log_softmax(self.unembed(h), -1))).sum()  # noqa
        for m, name in enumerate(self.inner):
            self.logit[m] += kl(rows[name]).item()
        for l, m in self.pairs:
            self.kl[l, m] += kl(self.tuned.translate(rows[self.inner[m]],
                                                     self.inner[l])).item()
        self.count += len(final)

    def means(self) -> tuple[Tensor, Tensor]:
        out = torch.full_like(self.kl, float("nan"))
        for l, m in self.pairs:
            out[l, m] = self.kl[l, m] / self.count
        return out.float(), (self.logit / self.count).float()


def translator_cosine(tuned: TunedLens, names) -> Float[Tensor, "layer layer"]:
    """Cosine similarity of the flattened translators (``[A_l, b_l]``) of every two layers."""
    index = [tuned.index(name) for name in names[:-1]]
    flat = tuned.bias[index].detach().double()
    if tuned.weight is not None:
        flat = torch.cat([tuned.weight[index].detach().double().flatten(1), flat], dim=1)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (flat @ flat.T).float()
