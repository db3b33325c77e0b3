"""Evaluating lenses per layer on held-out text: KL, cross-entropy, entropy, top-1 agreement.

Every statistic comes from the shared readout (:func:`tl_lenses.readout.engine.read_lens`, float32),
one model forward per batch for all lenses. Per layer and lens: KL(final || lens), the
cross-entropy of the true next token, the lens distribution's entropy, and how often the
lens's top-1 equals the model's final top-1. KL and cross-entropy are also given in bits per
byte of the predicted text (total bits / total UTF-8 bytes), which compares across tokenizers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_lenses.hooks import (
    check_hook_names,
    final_resid_name,
    resid_names,
    run_cache,
    short_label,
)
from tl_lenses.inputs import Batch, to_batch
from tl_lenses.lenses.logit import LogitLens
from tl_lenses.lenses.tuned import view
from tl_lenses.lenses.tuned.lens import TunedLens
from tl_lenses.models import check_model
from tl_lenses.readout.apply import lens_rows, read_own_cache
from tl_lenses.readout.fingerprint import check_each_lens
from tl_lenses.readout.lens import Lens
from tl_lenses.readout.unembed import Unembed
from tl_lenses.viz.notebook import NotebookView


@dataclass
class LayerMetrics:
    """One lens's per-layer means over the held-out tokens (nats unless named ``_bpb``)."""

    lens: str
    hook_names: list[str]
    kl: Float[Tensor, " layer"]
    cross_entropy: Float[Tensor, " layer"]
    entropy: Float[Tensor, " layer"]
    top1_agreement: Float[Tensor, " layer"]
    n_tokens: int
    n_bytes: int

    @property
    def kl_bpb(self) -> Float[Tensor, " layer"]:
        """KL per layer in bits per UTF-8 byte of the predicted text."""
        return self.kl * self.n_tokens / (math.log(2) * self.n_bytes)

    @property
    def cross_entropy_bpb(self) -> Float[Tensor, " layer"]:
        """Cross-entropy per layer in bits per UTF-8 byte."""
        return self.cross_entropy * self.n_tokens / (math.log(2) * self.n_bytes)

    @property
    def mean_kl(self) -> float:
        """Mean over layers of the per-layer KL (the final layer, always 0, excluded)."""
        return float(self.kl[:-1].mean()) if len(self.kl) > 1 else float(self.kl.mean())


@dataclass(repr=False)
class LensEvaluation(NotebookView):
    """Per-layer metrics of several lenses on the same held-out tokens."""

    metrics: dict[str, LayerMetrics]
    labels: list[str] = field(default_factory=list)

    def rows(self) -> list[list]:
        """A table: layer, then KL / CE (nats) / top-1 agreement for each lens."""
        out = []
        for i, label in enumerate(self.labels):
            row = [label]
            for m in self.metrics.values():
                row += [f"{float(m.kl[i]):.3f}", f"{float(m.cross_entropy[i]):.3f}",
                        f"{float(m.top1_agreement[i]):.3f}"]
            out.append(row)
        return out

    def header(self) -> list[str]:
        """Column names of the per-layer table (layer, then KL/CE/top-1 per lens)."""
        head = ["layer"]
        for name in self.metrics:
            head += [f"{name} KL", f"{name} CE", f"{name} top-1"]
        return head

    def save_png(self, path, title: str = "KL(final || lens) per layer on held-out text") -> Path:
        """A line plot of KL per layer, one line per lens."""
        return view.kl_plot_png(self, path, title)

    def to_html(self, title: str = "Lens evaluation on held-out text") -> str:
        """A self-contained HTML page: the KL plot and the per-layer table."""
        return view.evaluation_html(self, title)

    def _view_html(self, full: bool = False, **options) -> str:
        return view.evaluation_fragment(self, full)


def evaluate_lenses(model, tokens: Int[Tensor, "batch pos"],
                    lenses: Mapping[str, Lens] | None = None, *, batch_size: int = 8,
                    progress: bool = False,
                    attention_mask: Int[Tensor, "batch pos"] | Bool[Tensor, "batch pos"]
                    | None = None) -> LensEvaluation:
    """Per-layer held-out metrics of each lens (default: just the logit lens).

    Rows are the hook points of the first tuned lens among ``lenses`` (else the residual
    stream) plus the final residual. Per row and lens: KL(final || lens) and cross-entropy to
    the next token (nats, and bits per byte), entropy, and top-1 agreement with the final
    layer (Belrose et al. 2023, Table 1's metrics).

    Args:
        model: the model.
        tokens: held-out int token rows ``[batch, pos]``.
        lenses: ``{name: lens}``; default ``{"logit": LogitLens()}``.
        batch_size: rows per forward pass.
        progress: show a progress bar.
        attention_mask: for rows of unequal lengths, 1 marks a token and 0 padding (each
            row's tokens one run at one side); it goes to the model, and the metrics
            average over the cells that have a next token (pads never count).

    Returns:
        A :class:`LensEvaluation` (``metrics[name]``: :class:`LayerMetrics` per row).

    Raises:
        TypeError: ``lenses`` is not a mapping (a list: results are keyed by name), or
            holds something that is not a lens.
        ValueError: a lens that does not cover a row, bad tokens or a bad mask, a
            ``batch_size`` that is not a positive int.

    >>> rows = torch.randint(0, model.cfg.d_vocab, (4, 10), generator=torch.manual_seed(1))
    >>> evaluation = evaluate_lenses(model, rows)
    >>> float(evaluation.metrics["logit"].kl[-1]) < 1e-4   # the final row is the model itself
    True
    """
    check_model(model)
    if lenses is not None and not isinstance(lenses, Mapping):
        # Results are keyed by name; dict() of a list failed as "dictionary update sequence".
        raise TypeError(f"lenses must be a dict name -> lens, e.g. {{'logit': LogitLens(), "
                        f"'tuned': lens}}, got {type(lenses).__name__}")
    check_each_lens(model, lenses)
    lenses = dict(lenses or {"logit": LogitLens()})
    if not lenses or not all(isinstance(l, Lens) for l in lenses.values()):
        raise TypeError("lenses must map names to Lens objects (name + translate)")
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError("tokens must be an int tensor [batch, pos] with pos >= 2")
    _check_batch_size(batch_size)
    if not isinstance(progress, bool):
        raise ValueError(f"progress must be a bool, got {progress!r}")
    full = to_batch(model, tokens, attention_mask=attention_mask, argument="tokens")
    names = _rows(model, lenses)
    sums = {key: _Sums.zeros(len(names)) for key in lenses}
    n_bytes, n_tokens, starts = 0, 0, range(0, tokens.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="evaluating lenses")
    for start in starts:
        rows = slice(start, start + batch_size)
        batch = Batch(full.tokens[rows], full.mask[rows], full.padding_side)
        longest = int(batch.lengths.max())
        if longest < 2:  # no row here has a next token
            continue
        cache = run_cache(model, batch, names)
        for key, lens in lenses.items():
            result = read_own_cache(model, cache, batch, lens, names, k=1, target="next",
                                    positions=list(range(longest - 1)))
            sums[key].add(result)
        n_tokens += int((result.target_ids >= 0).sum())
        predicted = batch.mask[:, 1:] & batch.mask[:, :-1]  # a real token after a real one
        n_bytes += _n_bytes(model, batch.tokens[:, 1:], predicted)
    metrics = {key: s.metrics(getattr(lenses[key], "name", key), names, n_tokens, n_bytes)
               for key, s in sums.items()}
    return LensEvaluation(metrics, [short_label(n) for n in names])


class KLEvaluator:
    """Held-out KL per layer for many lenses on the same tokens, with one model forward.

    For comparing many snapshots of a training run (benchmarks): the residuals and the
    final distribution are computed once; each :meth:`kl` call costs only the unembedding
    matmuls. ``bf16=True`` runs those in bfloat16 (about 1e-3 nats of rounding noise).

    Rows of unequal lengths come with ``attention_mask`` (1 marks a token, 0 padding; each
    row's tokens one run at one side): the mask goes to the model, and only real tokens are
    kept, so pads never count and each prompt's KL equals that prompt's alone.

    Raises:
        ValueError: bad tokens, a bad mask or ``batch_size``, ``hook_names`` that are not
            residual-width hook points.
    """

    def __init__(self, model, tokens: Int[Tensor, "batch pos"], hook_names=None, *,
                 bf16: bool = False, batch_size: int = 8,
                 attention_mask: Int[Tensor, "batch pos"] | Bool[Tensor, "batch pos"]
                 | None = None):
        check_model(model)
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            raise ValueError("tokens must be an int tensor [batch, pos]")
        _check_batch_size(batch_size)
        if not isinstance(bf16, bool):
            raise ValueError(f"bf16 must be a bool, got {bf16!r}")
        full = to_batch(model, tokens, attention_mask=attention_mask, argument="tokens")
        self.hook_names = check_hook_names(
            model, resid_names(model)[:-1] if hook_names is None else hook_names)
        self.final = final_resid_name(model)
        self.unembed = Unembed.from_model(model)
        self.W = self.unembed.W_U.detach().to(torch.bfloat16 if bf16 else torch.float32)
        wanted = sorted(set(self.hook_names) | {self.final})
        resids, finals = [], []
        with torch.no_grad():
            for start in range(0, tokens.shape[0], batch_size):
                rows = slice(start, start + batch_size)
                batch = Batch(full.tokens[rows], full.mask[rows], full.padding_side)
                cache = run_cache(model, batch, wanted)
                real = batch.mask.to(cache[self.final].device)  # pads are dropped here
                resids.append(torch.stack([cache[n][real].float() for n in self.hook_names]))
                finals.append(cache[self.final][real])
            self.resids = torch.cat(resids, dim=1)
            logp = torch.log_softmax(self.unembed(torch.cat(finals).float()), dim=-1)
        self.final_logp, self.final_p = logp, logp.exp()
        # The prompt of each kept token, for per-prompt means.
        self.prompt_of = torch.arange(len(full.tokens)).repeat_interleave(full.lengths.cpu())
        self.n_prompts = len(full.tokens)

    def kl(self, lens: Lens) -> Float[Tensor, " layer"]:
        """Mean KL(final || lens) over the real tokens, per hook point (in nats)."""
        return torch.stack([per_token.mean() for per_token in self._per_token(lens)])

    def kl_per_prompt(self, lens: Lens) -> Float[Tensor, "layer batch"]:
        """Mean KL(final || lens) over each prompt's own tokens, per hook point (nats)."""
        out = []
        for per_token in self._per_token(lens):
            index = self.prompt_of.to(per_token.device)
            sums = per_token.new_zeros(self.n_prompts).index_add_(0, index, per_token)
            counts = torch.bincount(index, minlength=self.n_prompts).to(per_token.dtype)
            out.append(sums / counts)
        return torch.stack(out)

    def _per_token(self, lens: Lens) -> list[Tensor]:
        out = []
        with torch.no_grad():
            for resid, name in zip(self.resids, self.hook_names):
                normed = self.unembed.normalize(lens.translate(resid, name))
                logits = torch.matmul(normed.to(self.W.dtype), self.W).float()
                if self.unembed.b_U is not None:
                    logits += self.unembed.b_U.float()
                logq = torch.log_softmax(logits, dim=-1)
                out.append((self.final_p * (self.final_logp - logq)).sum(-1))
        return out


def _check_batch_size(batch_size) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _rows(model, lenses) -> list[str]:
    tuned = [l for l in lenses.values() if isinstance(l, TunedLens)]
    return lens_rows(model, tuned[0]) if tuned else resid_names(model)


@dataclass
class _Sums:
    kl: Tensor
    ce: Tensor
    entropy: Tensor
    agree: Tensor

    @classmethod
    def zeros(cls, n: int) -> "_Sums":
        return cls(*(torch.zeros(n, dtype=torch.float64) for _ in range(4)))

    def add(self, result) -> None:
        # Only cells with a next token count (pads and each row's last token have none).
        valid = result.target_ids >= 0

        def total(values: Tensor) -> Tensor:
            return torch.where(valid, values.double(), 0.0).sum((1, 2)).cpu()

        final_top = result.top_ids[-1, ..., 0]
        self.kl += total(result.kl_to_final)
        # CE = lse - z_target, with lse = z_top - log p_top (p_top >= 1/d_vocab: no underflow)
        lse = result.top_logits[..., 0].double() - result.top_probs[..., 0].double().log()
        self.ce += total(lse - result.target_logit.double())
        self.entropy += total(result.entropy)
        self.agree += total((result.top_ids[..., 0] == final_top).double())

    def metrics(self, lens, names, n_tokens, n_bytes) -> LayerMetrics:
        mean = lambda t: (t / n_tokens).float()  # noqa: E731
        return LayerMetrics(lens, list(names), mean(self.kl), mean(self.ce), mean(self.entropy),
                            mean(self.agree), n_tokens, max(1, n_bytes))


def _n_bytes(model, tokens: Tensor, mask: Tensor) -> int:
    """UTF-8 bytes of the predicted text (tokens as a count when there is no tokenizer)."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return int(mask.sum())
    return sum(len(tokenizer.decode(row[keep].tolist()).encode("utf-8"))
               for row, keep in zip(tokens.cpu(), mask.cpu()))
