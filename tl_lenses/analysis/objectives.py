"""Why KL? Tuned lenses trained with different objectives on the same data and budget.

The seed's question: the tuned lens minimises KL(final || lens); why not the mean squared
error of the logits, of the translated residual against the final residual, or a cosine?
:func:`compare_objectives` trains a bias-only and an affine lens with each objective (same
rows, same order, same steps and learning rate), then measures every lens per layer on
held-out text with every distance, and how each distance ranks the layers (Spearman's rank
correlation across layers). Objectives: :data:`tl_lenses.analysis._fit.OBJECTIVES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_lenses._autograd import needs_autograd
from tl_lenses.analysis._fit import METRICS, OBJECTIVES, FitConfig, evaluate, fit
from tl_lenses.analysis._stream import check_tokens, spearman
from tl_lenses.hooks import resid_names, short_label
from tl_lenses.lenses.logit import LogitLens
from tl_lenses.lenses.tuned.lens import TunedLens
from tl_lenses.viz.notebook import NotebookView

DEFAULT_OBJECTIVES = ("kl", "mse_logits", "mse_resid", "cosine")


@dataclass(repr=False)
class ObjectivesResult(NotebookView):
    """Held-out metrics per lens (``"objective / kind"``, plus ``"logit lens"``) and layer.

    ``metrics[lens][metric]`` is a ``[layer]`` tensor of means over held-out tokens
    (metrics: :data:`tl_lenses.analysis._fit.METRICS`); ``rank_correlation[lens]`` is the
    ``[metric, metric]`` Spearman correlation across layers of those metrics; ``losses`` the
    training curve of each lens (its own objective, mean over layers).
    """

    hook_names: list[str]
    metrics: dict[str, dict[str, Float[Tensor, " layer"]]]
    rank_correlation: dict[str, Float[Tensor, "metric metric"]]
    losses: dict[str, list[float]] = field(default_factory=dict)
    n_train_tokens: int = 0
    n_eval_tokens: int = 0
    lenses: dict[str, TunedLens] = field(default_factory=dict, repr=False)

    @property
    def labels(self) -> list[str]:
        """Short row labels (``3 pre``)."""
        return [short_label(n) for n in self.hook_names]

    def summary(self) -> tuple[list[str], list[list]]:
        """(header, rows): per lens, mean over layers of KL, CE, top-1, and Spearman vs KL."""
        header = ["lens", "KL (nats)", "CE (nats)", "top-1 agreement",
                  "Spearman(layer ranking: own objective, KL)"]
        own = {"kl": "kl", "mse_logits": "mse_logits", "mse_resid": "mse_resid",
               "cosine": "cosine_distance"}
        rows = []
        for lens, m in self.metrics.items():
            objective = lens.split(" / ")[0]
            rho = self.rank_correlation[lens][METRICS.index(own.get(objective, "kl")),
                                              METRICS.index("kl")]
            rows.append([lens, f"{m['kl'].mean():.3f}", f"{m['ce'].mean():.3f}",
                         f"{m['top1_agreement'].mean():.3f}", f"{float(rho):.2f}"])
        return header, rows

    def to_html(self) -> str:
        """Summary table, per-layer KL / CE / top-1 heatmaps, Spearman matrices."""
        from tl_lenses.analysis.view import objectives_html

        return objectives_html(self)

    def _view_html(self, full: bool = False, **view) -> str:
        return self.to_html()

    def save_png(self, path) -> Path:
        """Per-layer held-out KL, CE and top-1 agreement, one line per lens."""
        from tl_lenses.analysis.view import metric_lines_png

        return metric_lines_png(path, self.labels, self.metrics,
                                ("kl", "ce", "top1_agreement"),
                                "Lenses trained with each objective (held-out)")


@needs_autograd
def compare_objectives(
    model, train: Int[Tensor, "batch pos"], held_out: Int[Tensor, "_batch _pos"], *,
    objectives: Sequence[str] = DEFAULT_OBJECTIVES, kinds: Sequence[str] = ("bias", "affine"),
    layers: Sequence[int] | None = None, steps: int = 100, lr: float = 1e-3,
    batch_size: int = 8, seed: int = 0, progress: bool = True,
) -> ObjectivesResult:
    """Train a lens per (objective, kind) on ``train``; evaluate all on ``held_out``.

    Args:
        model: a HookedTransformer or compatibility-mode TransformerBridge.
        train: int token rows ``[batch, pos]`` to train on (streamed ``batch_size`` rows a step).
        held_out: int token rows ``[batch, pos]`` to measure on.
        objectives: names from ``("kl", "mse_logits", "mse_resid", "cosine", "ce")``.
        kinds: ``"bias"`` (``h + b``) and/or ``"affine"`` (``h + A h + b``) translators.
        layers: block indices whose ``resid_pre`` get a translator (default: all).
        steps: Adam steps per lens (the learning rate decays linearly to 0 over them).
        lr: Adam's initial learning rate.
        batch_size: token rows per step (and per evaluation forward pass).
        seed: the shuffle of the training rows (the same for every lens).
        progress: tqdm bars.

    Returns:
        An :class:`ObjectivesResult` (the trained lenses in ``.lenses``).

    Raises:
        ValueError: on an unknown objective or kind, or malformed tokens.

    Examples:
        >>> rows = torch.randint(0, model.cfg.d_vocab, (4, 12), generator=torch.manual_seed(0))
        >>> result = compare_objectives(model, rows, rows[:2], objectives=("kl", "cosine"),
        ...                             kinds=("bias",), steps=2, progress=False)
        >>> sorted(result.metrics), result.metrics["kl / bias"]["kl"].shape
        (['cosine / bias', 'kl / bias', 'logit lens'], torch.Size([3]))

    Source: the objectives question in the lecture notes; KL is the tuned lens's loss
    (Belrose et al. 2023, "Eliciting Latent Predictions...", eq. 2).
    """
    check_tokens(model, train, argument="train")
    check_tokens(model, held_out, argument="held_out")
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives:
        raise ValueError(f"objectives must be non-empty names from {OBJECTIVES}, got {objectives}")
    config = FitConfig(steps=steps, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    lenses, losses = {}, {}
    for kind in kinds:
        for objective in objectives:
            lens = TunedLens.for_model(model, layers=layers, kind=kind).to(model.cfg.device)
            losses[f"{objective} / {kind}"] = fit(model, train, lens, lens.hook_names,
                                                   objective, config)
            lenses[f"{objective} / {kind}"] = lens
    hook_names = next(iter(lenses.values())).hook_names if lenses else resid_names(model)[:-1]
    metrics = evaluate(model, held_out, {"logit lens": LogitLens(), **lenses}, hook_names,
                       batch_size=batch_size, progress=progress)
    correlation = {key: rank_correlations(m) for key, m in metrics.items()}
    return ObjectivesResult(list(hook_names), metrics, correlation, losses,
                            steps * batch_size * (train.shape[1] - 1),
                            held_out.shape[0] * (held_out.shape[1] - 1), lenses)


def rank_correlations(metrics: dict[str, Tensor]) -> Float[Tensor, "metric metric"]:
    """Spearman correlation across layers between every two metrics (``METRICS`` order).

    Agreement metrics are turned into distances (1 - agreement) so that every entry compares
    two rankings of "how far the layer is from the output".
    """
    series = [metrics[m] if not m.startswith("top1") else 1 - metrics[m] for m in METRICS]
    n = len(series)
    out = torch.ones(n, n)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = spearman(series[i], series[j])
    return out
