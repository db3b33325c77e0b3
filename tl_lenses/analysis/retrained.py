"""A retrained decoder per layer: is the next token there, read with the right codebook?

The logit lens reads a layer with the final layer's codebook; the tuned lens learns to
translate the layer towards the *final layer's* distribution (KL to the model's output).
A retrained decoder learns, per layer, to predict the *data*: it minimises the
cross-entropy of the true next token. Here it has the tuned lens's form (an affine
translator ``h + A h + b`` into the model's own frozen final norm and unembedding), so the
three differ only in what they were trained on; keeping the unembedding frozen keeps the
decoder at d_model^2 parameters per layer instead of d_model x d_vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from jaxtyping import Float, Int
from torch import Tensor

from tl_lenses._autograd import needs_autograd
from tl_lenses._ints import as_ints
from tl_lenses.analysis._fit import FitConfig, Translators, evaluate, fit
from tl_lenses.analysis._stream import check_tokens
from tl_lenses.hooks import final_resid_name, resid_names, short_label
from tl_lenses.lenses.logit import LogitLens
from tl_lenses.lenses.tuned.lens import TunedLens
from tl_lenses.readout.fingerprint import check_lens
from tl_lenses.viz.notebook import NotebookView


@dataclass(repr=False)
class RetrainedResult(NotebookView):
    """Held-out metrics per lens (``"logit lens"``, ``"tuned lens"``, ``"retrained"``) and layer.

    ``metrics[lens][metric]``: ``[layer]`` means over held-out tokens, with ``ce`` the
    cross-entropy of the true next token (nats) and ``top1_accuracy`` how often the top-1 is
    the true next token (other metrics: :data:`tl_lenses.analysis._fit.METRICS`).
    """

    hook_names: list[str]
    metrics: dict[str, dict[str, Float[Tensor, " layer"]]]
    losses: list[float] = field(default_factory=list)
    decoder: Translators | None = field(default=None, repr=False)
    tuned: TunedLens | None = field(default=None, repr=False)
    n_eval_tokens: int = 0

    @property
    def labels(self) -> list[str]:
        """Short row labels (``3 pre``)."""
        return [short_label(n) for n in self.hook_names]

    def table(self) -> tuple[list[str], list[list]]:
        """(header, rows): per layer, CE and top-1 accuracy of each lens."""
        header = ["layer"] + [f"{lens} {what}" for lens in self.metrics
                              for what in ("CE", "top-1 acc.")]
        rows = [[label] + [f"{float(m[key][i]):.3f}" for m in self.metrics.values()
                           for key in ("ce", "top1_accuracy")]
                for i, label in enumerate(self.labels)]
        return header, rows

    def to_html(self) -> str:
        """Per-layer table and heatmaps of CE and top-1 accuracy."""
        from tl_lenses.analysis.view import retrained_html

        return retrained_html(self)

    def _view_html(self, full: bool = False, **view) -> str:
        return self.to_html()

    def save_png(self, path) -> Path:
        """Per-layer held-out CE and top-1 accuracy, one line per lens."""
        from tl_lenses.analysis.view import metric_lines_png

        return metric_lines_png(path, self.labels, self.metrics, ("ce", "top1_accuracy"),
                                "Decoders: logit lens, tuned lens, retrained on the data")


@needs_autograd
def retrained_decoders(
    model, train: Int[Tensor, "batch pos"], held_out: Int[Tensor, "_batch _pos"], *,
    tuned: TunedLens | None = None, layers: Sequence[int] | None = None,
    decoder: Translators | None = None, steps: int = 100, lr: float = 1e-3,
    batch_size: int = 8, seed: int = 0, progress: bool = True,
) -> RetrainedResult:
    """Train a next-token decoder per layer on ``train``; compare on ``held_out``.

    Args:
        model: a HookedTransformer or compatibility-mode TransformerBridge.
        train: int token rows ``[batch, pos]``; the targets are their own next tokens.
        held_out: int token rows ``[batch, pos]`` to measure on.
        tuned: the tuned lens to compare with; None trains one here (KL to the final layer)
            with the same budget, rows and order as the decoder.
        layers: residual-stream rows (0 = embedding, ``n_layers`` = final ``resid_post``);
            default all of them.
        decoder: a :class:`Translators` to start from (default: zero, i.e. the logit lens).
        steps: Adam steps (the learning rate decays linearly to 0 over them).
        lr: Adam's initial learning rate.
        batch_size: token rows per step (and per evaluation forward pass).
        seed: the shuffle of the training rows.
        progress: tqdm bars.

    Returns:
        A :class:`RetrainedResult` (the decoder and the tuned lens included).

    Raises:
        ValueError: on malformed tokens or layers, or a ``tuned`` lens not covering them.

    Examples:
        >>> rows = torch.randint(0, model.cfg.d_vocab, (4, 12), generator=torch.manual_seed(0))
        >>> result = retrained_decoders(model, rows, rows[:2], layers=[1, 3], steps=2,
        ...                             progress=False)
        >>> sorted(result.metrics), result.labels
        (['logit lens', 'retrained', 'tuned lens'], ['1 pre', '2 post'])

    Source: the "retrained unembedding" question of the lecture notes; compare Belrose et
    al. 2023, sec. 3 (the tuned lens trained on KL to the final layer, not the data).
    """
    check_tokens(model, train, argument="train")
    check_tokens(model, held_out, argument="held_out")
    check_lens(model, tuned, argument="tuned")
    names = _rows(model, layers)
    inner = [n for n in names if n != final_resid_name(model)]
    config = FitConfig(steps=steps, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    if decoder is None:
        decoder = Translators(names, model.cfg.d_model, name="retrained decoder")
    decoder.to(model.cfg.device)
    losses = fit(model, train, decoder, names, "ce", config)
    if tuned is None and inner:
        tuned = TunedLens.for_model(model, hook_names=inner).to(model.cfg.device)
        fit(model, train, tuned, inner, "kl", config)
    lenses = {"logit lens": LogitLens(), "retrained": decoder}
    if tuned is not None:
        lenses["tuned lens"] = tuned
    metrics = evaluate(model, held_out, lenses, names, batch_size=batch_size, progress=progress)
    return RetrainedResult(names, metrics, losses, decoder, tuned,
                           held_out.shape[0] * (held_out.shape[1] - 1))


def _rows(model, layers) -> list[str]:
    stream = resid_names(model)
    if layers is None:
        return stream
    layers = [layers] if (ints := as_ints(layers)) is None else ints
    bad = [l for l in layers
           if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < len(stream)]
    if bad or not layers:
        raise ValueError(f"layers must be non-empty ints in [0, n_layers={len(stream) - 1}] "
                         f"(n_layers = the final resid_post), got {layers}")
    return [stream[l] for l in sorted(set(layers))]
