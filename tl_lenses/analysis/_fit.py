"""Small translator trainer shared by the objectives and retrained-decoder analyses.

A translator per hook point ``h -> h + A h + b`` (zero-initialised: a fresh one *is* the logit
lens), trained with Adam against one of several objectives on the same batches, then
decoded through the model's frozen final norm and unembedding. Gradients go through
autograd one layer at a time, so at most one ``[rows, d_vocab]`` graph exists at once.

Objectives (per token, averaged):

* ``"kl"``: KL(final || lens), the tuned lens's (Belrose et al. 2023, eq. 2);
* ``"mse_logits"``: mean squared difference of lens and final logits;
* ``"mse_resid"``: mean squared difference of the translated and the final residual;
* ``"cosine"``: 1 - cos(translated residual, final residual);
* ``"ce"``: cross-entropy of the true next token (the data, not the final layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_lenses._autograd import needs_autograd
from tl_lenses.analysis._stream import batches, cached, check_positive, frozen_unembed
from tl_lenses.hooks import final_resid_name

OBJECTIVES = ("kl", "mse_logits", "mse_resid", "cosine", "ce")
KINDS = ("affine", "bias")


class Translators(nn.Module):
    """One zero-initialised affine (or bias-only) translator per hook point; a :class:`Lens`.

    Unlike :class:`~tl_lenses.lenses.tuned.lens.TunedLens` it may cover the final residual too
    (a decoder retrained at the last layer).
    """

    def __init__(self, hook_names: Sequence[str], d_model: int, *, kind: str = "affine",
                 name: str = "translators"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.hook_names, self.kind, self.name = list(hook_names), kind, name
        if not self.hook_names or len(set(self.hook_names)) != len(self.hook_names):
            raise ValueError(f"hook_names must be distinct and non-empty, got {self.hook_names}")
        self._index = {n: i for i, n in enumerate(self.hook_names)}
        self.bias = nn.Parameter(torch.zeros(len(self.hook_names), d_model))
        self.weight = (nn.Parameter(torch.zeros(len(self.hook_names), d_model, d_model))
                       if kind == "affine" else None)

    def translate(self, resid: Float[Tensor, "*rows d_model"], hook_name: str
                  ) -> Float[Tensor, "*rows d_model"]:
        """``h + A h + b`` with the translator of ``hook_name``."""
        if hook_name not in self._index:
            raise ValueError(f"hook_name {hook_name!r} has no translator; have {self.hook_names}")
        i = self._index[hook_name]
        out = resid + self.bias[i].to(resid.dtype)
        if self.weight is not None:
            out = out + resid @ self.weight[i].to(resid.dtype).T
        return out


def objective_loss(objective: str, translated: Float[Tensor, "rows d_model"],
                   final: Float[Tensor, "rows d_model"], next_ids: Int[Tensor, " rows"],
                   unembed, final_logits: Float[Tensor, "rows d_vocab"] | None = None
                   ) -> Tensor:
    """The mean over rows of ``objective`` (see the module docstring) for one layer."""
    if objective == "mse_resid":
        return (translated - final).pow(2).mean()
    if objective == "cosine":
        return 1 - F.cosine_similarity(translated, final, dim=-1).mean()
    logits = unembed(translated)
    if objective == "ce":
        return F.cross_entropy(logits, next_ids)
    if final_logits is None:
        final_logits = unembed(final)
    if objective == "mse_logits":
        return (logits - final_logits).pow(2).mean()
    if objective == "kl":
        logp = torch.log_softmax(final_logits, dim=-1)
        return (logp.exp() * (logp - torch.log_softmax(logits, dim=-1))).sum(-1).mean()
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


@dataclass
class FitConfig:
    """Budget of :func:`fit`: the same for every objective compared."""

    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0
    progress: bool = True


@needs_autograd
def fit(model, tokens: Int[Tensor, "batch pos"], lens: nn.Module, hook_names: Sequence[str],
        objective: str, config: FitConfig) -> list[float]:
    """Train ``lens``'s translators at ``hook_names`` on ``objective``; the per-step mean loss.

    Adam with the learning rate decayed linearly to 0; batches drawn by a seeded shuffle,
    so two objectives trained with the same config see the same rows in the same order.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    check_positive(steps=config.steps, batch_size=config.batch_size)
    unembed = frozen_unembed(model)
    optimizer = torch.optim.Adam(lens.parameters(), lr=config.lr)
    final_name = final_resid_name(model)
    names = list(dict.fromkeys([*hook_names, final_name]))
    losses, steps = [], range(config.steps)
    if config.progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"fitting ({objective})", unit="step")
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.zeros(0, dtype=torch.long)
    for step in steps:
        if len(order) < config.batch_size:
            order = torch.cat([order, torch.randperm(tokens.shape[0], generator=generator)])
        rows, order = order[:config.batch_size], order[config.batch_size:]
        batch = tokens[rows].to(model.cfg.device)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * (1 - step / config.steps)
        optimizer.zero_grad(set_to_none=True)
        losses.append(_step(batch, names, hook_names, final_name, model, lens, objective,
                            unembed))
        optimizer.step()
    return losses


def _step(batch, names, hook_names, final_name, model, lens, objective, unembed) -> float:
    """Accumulate the gradient of the summed per-layer loss, one layer's graph at a time."""
    acts = cached(model, batch, names)
    final = _rows(acts[final_name])
    next_ids = batch[:, 1:].reshape(-1)
    final_logits = None
    if objective in ("kl", "mse_logits"):
        with torch.no_grad():
            final_logits = unembed(final)
    total = 0.0
    for name in hook_names:
        loss = objective_loss(objective, lens.translate(_rows(acts[name]), name), final,
                              next_ids, unembed, final_logits)
        loss.backward()
        total += loss.item()
    return total / len(hook_names)


def _rows(act: Tensor) -> Tensor:
    """``[batch, pos, d]`` -> ``[batch * (pos - 1), d]``: the positions that have a next token."""
    return act[:, :-1].reshape(-1, act.shape[-1])


METRICS = ("kl", "ce", "top1_agreement", "top1_accuracy", "mse_logits", "mse_resid",
           "cosine_distance")


def evaluate(model, tokens: Int[Tensor, "batch pos"], lenses: dict, hook_names: Sequence[str],
             *, batch_size: int = 8, chunk: int = 256, progress: bool = True
             ) -> dict[str, dict[str, Float[Tensor, " layer"]]]:
    """Per lens, per metric (:data:`METRICS`), per hook point: means over held-out tokens.

    ``kl``: KL(final || lens) in nats; ``ce``: cross-entropy of the true next token (nats);
    ``top1_agreement``: lens top-1 == the model's final top-1; ``top1_accuracy``: lens top-1 ==
    the true next token; ``mse_logits``, ``mse_resid``, ``cosine_distance`` as the objectives.
    """
    unembed = frozen_unembed(model)
    final_name = final_resid_name(model)
    names = list(dict.fromkeys([*hook_names, final_name]))
    sums = {key: torch.zeros(len(METRICS), len(hook_names), dtype=torch.float64)
            for key in lenses}
    count = 0
    for batch in batches(model, tokens, batch_size, desc="evaluating", progress=progress):
        acts = cached(model, batch, names)
        final, next_ids = _rows(acts[final_name]), batch[:, 1:].reshape(-1)
        count += len(final)
        for start in range(0, len(final), chunk):
            span = slice(start, start + chunk)
            with torch.no_grad():
                _add_chunk(sums, lenses, hook_names, acts, final[span], next_ids[span], span,
                           unembed)
    return {key: {metric: (s[i] / count).float() for i, metric in enumerate(METRICS)}
            for key, s in sums.items()}


def _add_chunk(sums, lenses, hook_names, acts, final, next_ids, span, unembed) -> None:
    final_logits = unembed(final)
    final_logp = torch.log_softmax(final_logits, dim=-1)
    final_top = final_logits.argmax(-1)
    for key, lens in lenses.items():
        for j, name in enumerate(hook_names):
            translated = lens.translate(_rows(acts[name])[span], name)
            logits = unembed(translated)
            logq = torch.log_softmax(logits, dim=-1)
            top = logits.argmax(-1)
            values = (
                (final_logp.exp() * (final_logp - logq)).sum(-1),
                -logq.gather(-1, next_ids[:, None])[:, 0],
                (top == final_top).double(),
                (top == next_ids).double(),
                (logits - final_logits).pow(2).mean(-1),
                (translated - final).pow(2).mean(-1),
                1 - F.cosine_similarity(translated, final, dim=-1),
            )
            sums[key][:, j] += torch.stack([v.double().sum() for v in values]).cpu()
