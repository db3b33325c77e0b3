"""Iterative inference: does each sublayer's update point down the gradient of the loss?

If a transformer refines its guess layer by layer (Belrose et al. 2023, sec. 4.2 and
Fig. 19; Jastrzebski et al. 2018 for ResNets), each residual update should resemble a
gradient descent step on the final loss: the update ``delta`` written at a point and the
negative gradient ``-dL/dh`` of the final next-token loss with respect to the residual the
sublayer reads should have a positive cosine.

Per block ``l`` and token: ``attn`` compares ``hook_attn_out`` with the gradient at
``hook_resid_pre``; ``mlp`` compares ``hook_mlp_out`` with the gradient at ``hook_resid_mid``;
``both`` compares their sum (``resid_post - resid_pre``) with the gradient at
``hook_resid_pre``. ``L`` is the summed cross-entropy of the true next tokens of the row (the
training loss), so the gradient at a position includes its effect on later positions
through attention. The last position (no next token, zero gradient) is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from tl_lenses._autograd import needs_autograd
from tl_lenses.analysis._stream import batches, check_positive, check_tokens
from tl_lenses.hooks import no_resid_mid
from tl_lenses.viz.notebook import NotebookView

SUBLAYERS = ("attn", "mlp", "both")


@dataclass(repr=False)
class AlignmentResult(NotebookView):
    """Cosine(update, -gradient) per sublayer (:data:`SUBLAYERS`) and block, over tokens.

    ``mean[s, l]``: mean cosine; ``histogram[s, l, i]``: token counts in ``bins`` equal bins
    over [-1, 1]; ``n_tokens``: tokens per cell.
    """

    mean: Float[Tensor, "sublayer layer"]
    histogram: Float[Tensor, "sublayer layer bin"]
    n_tokens: int

    @property
    def sublayers(self) -> tuple[str, ...]:
        """The rows of ``mean``: :data:`SUBLAYERS`."""
        return SUBLAYERS

    @property
    def labels(self) -> list[str]:
        """Short row labels (``3 pre``)."""
        return [str(l) for l in range(self.mean.shape[1])]

    @property
    def edges(self) -> Tensor:
        """The histogram's bin edges over [-1, 1]."""
        return torch.linspace(-1, 1, self.histogram.shape[-1] + 1)

    def quantile(self, q: float) -> Float[Tensor, "sublayer layer"]:
        """The ``q`` quantile of each cell's distribution, read off the histogram."""
        if not 0 <= q <= 1:
            raise ValueError(f"q must be in [0, 1], got {q!r}")
        cdf = self.histogram.cumsum(-1) / self.histogram.sum(-1, keepdim=True).clamp_min(1)
        index = (cdf < q).sum(-1).clamp(max=self.histogram.shape[-1] - 1)
        width = 2 / self.histogram.shape[-1]
        return -1 + (index + 0.5) * width

    def to_html(self) -> str:
        """Mean and quartiles per sublayer and block as a heatmap table."""
        from tl_lenses.analysis.view import alignment_html

        return alignment_html(self)

    def _view_html(self, full: bool = False, **view) -> str:
        return self.to_html()

    def save_png(self, path) -> Path:
        """Mean cosine with the 10-90 % band per sublayer, by block."""
        from tl_lenses.analysis.view import alignment_png

        return alignment_png(self, path)


@needs_autograd
def gradient_alignment(model, tokens: Int[Tensor, "batch pos"], *, bins: int = 100,
                       batch_size: int = 4, progress: bool = True) -> AlignmentResult:
    """Cosine between each sublayer's update and the negative loss gradient, per block.

    Args:
        model: a HookedTransformer or compatibility-mode TransformerBridge with sequential
            attention and MLP (``resid_mid`` exists).
        tokens: int token rows ``[batch, pos]`` (pos >= 2), ``batch_size`` rows per backward.
        bins: histogram bins over [-1, 1].
        batch_size: rows per forward and backward pass.
        progress: a tqdm bar.

    Returns:
        An :class:`AlignmentResult`.

    Raises:
        ValueError: on malformed tokens or arguments.
        NotImplementedError: for parallel attention/MLP or attention-only blocks (no
            ``resid_mid``).

    Examples:
        >>> rows = torch.randint(0, model.cfg.d_vocab, (4, 12), generator=torch.manual_seed(0))
        >>> result = gradient_alignment(model, rows, progress=False)
        >>> result.mean.shape == (3, model.cfg.n_layers), result.n_tokens   # 4 rows x 11
        (True, 44)
        >>> bool(((result.mean >= -1) & (result.mean <= 1)).all())
        True

    Source: Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the
    Tuned Lens", sec. 4.2 / Fig. 19 (iterative inference).
    """
    check_tokens(model, tokens)
    check_positive(bins=bins)
    if (why := no_resid_mid(model)) is not None:  # attention-only: was a KeyError
        raise NotImplementedError(f"gradient_alignment needs sequential attention and MLP "
                                  f"(resid_mid); this model has none: {why}")
    n_layers = model.cfg.n_layers
    sums = torch.zeros(len(SUBLAYERS), n_layers, dtype=torch.float64)
    hist = torch.zeros(len(SUBLAYERS), n_layers, bins, dtype=torch.float64)
    count = 0
    for batch in batches(model, tokens, batch_size, desc="gradient alignment",
                         progress=progress):
        cosines = batch_cosines(model, batch)                        # [sub, layer, rows]
        sums += cosines.double().sum(-1).cpu()
        for s in range(len(SUBLAYERS)):
            for l in range(n_layers):
                hist[s, l] += torch.histc(cosines[s, l].double().cpu(), bins, -1, 1)
        count += cosines.shape[-1]
    return AlignmentResult((sums / count).float(), hist.float(), count)


def batch_cosines(model, tokens: Int[Tensor, "batch pos"]
                  ) -> Float[Tensor, "sublayer layer rows"]:
    """Cosines for one batch (positions but the last, flattened into rows)."""
    acts, grads = _activations_and_gradients(model, tokens)
    n_layers = model.cfg.n_layers
    out = []
    for l in range(n_layers):
        attn, mlp = acts[f"blocks.{l}.hook_attn_out"], acts[f"blocks.{l}.hook_mlp_out"]
        pre, mid = grads[f"blocks.{l}.hook_resid_pre"], grads[f"blocks.{l}.hook_resid_mid"]
        out.append(torch.stack([_cos(attn, -pre), _cos(mlp, -mid), _cos(attn + mlp, -pre)]))
    return torch.stack(out, dim=1)


def _cos(update: Tensor, direction: Tensor) -> Tensor:
    rows = lambda t: t[:, :-1].reshape(-1, t.shape[-1]).double()  # noqa: E731
    return F.cosine_similarity(rows(update), rows(direction), dim=-1, eps=1e-30)


def _activations_and_gradients(model, tokens):
    """Sublayer outputs (detached) and dL/d(resid) at every resid_pre and resid_mid.

    The embedding (block 0's ``resid_pre``) is swapped for a leaf so that every later
    residual is in the graph whether or not the model's weights require gradients; the
    weights themselves get no gradient.
    """
    n_layers = model.cfg.n_layers
    points: dict[str, Tensor] = {}
    updates: dict[str, Tensor] = {}

    # Keyed by the name asked for: a Bridge's hook.name may be its own alias of it.
    def leaf(name):
        def hook(resid, hook):
            points[name] = resid.detach().float().requires_grad_(True)
            return points[name].to(resid.dtype)
        return hook

    def keep_point(name):
        def hook(resid, hook):
            points[name] = resid
        return hook

    def keep_update(name):
        def hook(act, hook):
            updates[name] = act.detach().float()
        return hook

    pre = [f"blocks.{l}.hook_resid_pre" for l in range(n_layers)]
    mid = [f"blocks.{l}.hook_resid_mid" for l in range(n_layers)]
    outs = [f"blocks.{l}.hook_{kind}_out" for l in range(n_layers) for kind in ("attn", "mlp")]
    hooks = [(pre[0], leaf(pre[0]))] + [(n, keep_point(n)) for n in pre[1:] + mid]
    hooks += [(n, keep_update(n)) for n in outs]
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                               tokens[:, 1:].flatten(), reduction="sum")
        names = list(points)
        grads = torch.autograd.grad(loss, [points[n] for n in names], allow_unused=True)
    missing = [n for n, g in zip(names, grads) if g is None]
    if missing:
        raise NotImplementedError(f"the loss does not depend on the hook points {missing} "
                                  "of this model (their hooks are not on the forward path)")
    return updates, {n: g.float() for n, g in zip(names, grads)}
