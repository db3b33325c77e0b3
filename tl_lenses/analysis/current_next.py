"""Current token vs next token: when does a layer stop showing its input and start its output?

Per layer and lens (logit lens, and a tuned lens when given), averaged over text: the
probability, the geometric-mean rank and the top-1 rate of (a) the input token at the
position itself, (b) the true next token. The seed's "copy rare token" view splits (b):
positions whose next token is *rare* (not among the ``common`` most frequent ids of the
text) and already appeared earlier in the row (a copy the model can make), against rare
next tokens that did not (novel). Where the copy curve rises above the novel one is where
the model has fetched the earlier occurrence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_lenses.analysis._stream import (
    batches,
    cached,
    check_lenses,
    check_positive,
    check_tokens,
    frozen_unembed,
)
from tl_lenses.hooks import resid_names, short_label
from tl_lenses.lenses.logit import LogitLens
from tl_lenses.readout.lens import Lens
from tl_lenses.viz.notebook import NotebookView

GROUPS = ("current", "next", "copy", "novel")
STATS = ("prob", "rank", "top1")


@dataclass(repr=False)
class CurrentNextResult(NotebookView):
    """``stats[lens][f"{group}_{stat}"]``: a ``[layer]`` tensor of means over tokens.

    Groups (:data:`GROUPS`): ``current`` (the input token), ``next`` (the true next token),
    ``copy`` / ``novel`` (rare next tokens that did / did not occur earlier in the row).
    Stats (:data:`STATS`): ``prob`` (mean probability), ``rank`` (geometric mean of the
    rank, 1 = top), ``top1`` (fraction ranked first). ``counts[group]``: tokens averaged.
    """

    hook_names: list[str]
    stats: dict[str, dict[str, Float[Tensor, " layer"]]]
    counts: dict[str, int]

    @property
    def labels(self) -> list[str]:
        """Short row labels (``3 pre``)."""
        return [short_label(n) for n in self.hook_names]

    def crossover(self, lens: str) -> str | None:
        """The first layer where the next token is likelier than the input token."""
        s = self.stats[lens]
        above = (s["next_prob"] > s["current_prob"]).nonzero()
        return self.labels[int(above[0])] if len(above) else None

    def to_html(self) -> str:
        """Line-free heatmap tables of each group's probability and rank per layer."""
        from tl_lenses.analysis.view import current_next_html

        return current_next_html(self)

    def _view_html(self, full: bool = False, **view) -> str:
        return self.to_html()

    def save_png(self, path) -> Path:
        """Probability of the current / next / copy / novel token per layer, per lens."""
        from tl_lenses.analysis.view import current_next_png

        return current_next_png(self, path)


def current_vs_next(
    model, tokens: Int[Tensor, "batch pos"], lenses: Mapping[str, Lens] | None = None, *,
    common: int = 100, batch_size: int = 8, chunk: int = 256, progress: bool = True,
) -> CurrentNextResult:
    """Rank and probability of the input and the next token per layer, averaged over text.

    Args:
        model: a HookedTransformer or compatibility-mode TransformerBridge.
        tokens: int token rows ``[batch, pos]`` (pos >= 2), streamed ``batch_size`` rows at a time.
        lenses: name -> lens; default the logit lens only. A lens must cover every
            ``resid_pre`` (a tuned lens does; the final ``resid_post`` passes through).
        common: how many of the text's most frequent ids count as common (not rare).
        batch_size: rows of ``tokens`` per forward pass.
        chunk: positions per unembedding matmul (bounds the ``[chunk, d_vocab]`` buffers).
        progress: a tqdm bar.

    Returns:
        A :class:`CurrentNextResult` over the residual stream (``n_layers + 1`` rows).

    Raises:
        ValueError: on malformed tokens or arguments.

    Examples:
        >>> rows = torch.randint(0, model.cfg.d_vocab, (4, 12), generator=torch.manual_seed(0))
        >>> result = current_vs_next(model, rows, progress=False)
        >>> result.labels, result.stats["logit lens"]["next_prob"].shape
        (['0 pre', '1 pre', '2 pre', '2 post'], torch.Size([4]))

    Source: the lecture notes' "current vs next token" and "copy rare token" grids
    (nostalgebraist 2020's logit lens; Belrose et al. 2023, sec. 2).
    """
    check_tokens(model, tokens)
    check_positive(common=common, chunk=chunk)
    lenses = check_lenses(model, lenses, {"logit lens": LogitLens()})
    names = resid_names(model)
    rare = ~common_ids(tokens, common, model.cfg.d_vocab)
    unembed = frozen_unembed(model)
    sums = {key: torch.zeros(len(GROUPS), len(STATS), len(names), dtype=torch.float64)
            for key in lenses}
    counts = torch.zeros(len(GROUPS), dtype=torch.float64)
    for batch in batches(model, tokens, batch_size, desc="current vs next", progress=progress):
        acts = cached(model, batch, names)
        ids, masks = _targets(batch, rare.to(batch.device))
        counts += torch.stack([m.sum() for m in masks]).double().cpu()
        for start in range(0, ids.shape[1], chunk):
            span = slice(start, start + chunk)
            for key, lens in lenses.items():
                for j, name in enumerate(names):
                    resid = acts[name][:, :-1].reshape(-1, acts[name].shape[-1])[span]
                    with torch.no_grad():
                        logits = unembed(lens.translate(resid, name))
                    _accumulate(sums[key][:, :, j], logits, ids[:, span],
                                [m[span] for m in masks])
    stats = {key: {f"{g}_{s}": _mean(sums[key][gi, si], counts[gi], s)
                   for gi, g in enumerate(GROUPS) for si, s in enumerate(STATS)}
             for key in lenses}
    return CurrentNextResult(names, stats, {g: int(c) for g, c in zip(GROUPS, counts)})


def common_ids(tokens: Int[Tensor, "batch pos"], common: int, d_vocab: int
               ) -> Bool[Tensor, " d_vocab"]:
    """Which ids are among the ``common`` most frequent in ``tokens``."""
    counts = torch.bincount(tokens.reshape(-1).cpu(), minlength=d_vocab)
    out = torch.zeros(d_vocab, dtype=torch.bool)
    top = torch.topk(counts, min(common, d_vocab)).indices
    out[top[counts[top] > 0]] = True
    return out


def seen_before(tokens: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """``[b, p]``: whether ``tokens[b, p + 1]`` occurs in ``tokens[b, :p + 1]``.

    False at the last position (there is no next token).
    """
    same = tokens[:, None, :] == tokens[:, :, None]             # [b, i, j]: t_i == t_j
    earlier = torch.tril(torch.ones_like(same[0]), diagonal=-1)  # j < i
    out = torch.zeros_like(tokens, dtype=torch.bool)
    out[:, :-1] = (same & earlier).any(-1)[:, 1:]
    return out


def _targets(batch, rare):
    """Ids ``[2, rows]`` (current, next) and the four group masks over the rows."""
    current, nxt = batch[:, :-1].reshape(-1), batch[:, 1:].reshape(-1)
    copied = seen_before(batch)[:, :-1].reshape(-1)
    is_rare = rare[nxt]
    every = torch.ones_like(current, dtype=torch.bool)
    return torch.stack([current, nxt]), [every, every, is_rare & copied, is_rare & ~copied]


def _accumulate(sums, logits, ids, masks) -> None:
    """Add prob, log rank and top-1 of the current and next ids, per group, into ``sums``."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    for g, mask in enumerate(masks):
        target = ids[0 if g == 0 else 1]
        chosen = logits.gather(-1, target[:, None])
        rank = (logits > chosen).sum(-1) + 1
        values = (logp.gather(-1, target[:, None])[:, 0].exp(), rank.double().log(),
                  (rank == 1).double())
        for s, value in enumerate(values):
            sums[g, s] += value[mask].sum().cpu()


def _mean(total: Tensor, count: Tensor, stat: str) -> Tensor:
    mean = total / count if count > 0 else torch.full_like(total, float("nan"))
    return (mean.exp() if stat == "rank" else mean).float()
