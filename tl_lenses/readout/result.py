"""LensResult: what a lens read off every (layer, position), as named tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_lenses.hooks import short_label
from tl_lenses.inputs import decode_each
from tl_lenses.readout import view
from tl_lenses.readout.view import STATISTICS
from tl_lenses.viz.notebook import NotebookView


@dataclass(repr=False)
class LensResult(NotebookView):
    """A lens readout over hook points (``layer``) and token positions.

    ``top_*`` hold the k best tokens of each decoded distribution; ``target_*`` the rank
    (1 = top), logit and probability of the chosen target token at each (layer, position),
    where ``target_ids`` is -1 for positions without a target (ranks -1, values NaN there).
    ``kl_to_final`` is KL(model's final distribution || lens distribution), in nats.
    ``logits`` is kept only when asked for (it is ``layer x batch x pos x d_vocab``).

    Positions count within each prompt: ``columns[b, i]`` is the token of ``tokens`` that
    prompt ``b`` read for ``positions[i]`` (for -1, each prompt's own last token), and
    ``mask[b, i]`` is False where prompt ``b`` has no such token (padding). Masked cells,
    and cells whose logits were not finite, have top-k ids and ranks -1 and NaN values.
    ``lengths`` holds each prompt's number of tokens.
    """

    lens: str
    hook_names: list[str]
    tokens: Int[Tensor, "batch _"]
    positions: list[int]
    str_tokens: list[list[str]]
    top_ids: Int[Tensor, "layer batch pos k"]
    top_logits: Float[Tensor, "layer batch pos k"]
    top_probs: Float[Tensor, "layer batch pos k"]
    entropy: Float[Tensor, "layer batch pos"]
    kl_to_final: Float[Tensor, "layer batch pos"]
    target: str | None = None
    target_ids: Int[Tensor, "batch pos"] | None = None
    target_rank: Int[Tensor, "layer batch pos"] | None = None
    target_logit: Float[Tensor, "layer batch pos"] | None = None
    target_prob: Float[Tensor, "layer batch pos"] | None = None
    logits: Float[Tensor, "layer batch pos d_vocab"] | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)
    mask: Bool[Tensor, "batch pos"] | None = None
    columns: Int[Tensor, "batch pos"] | None = None
    lengths: Int[Tensor, " batch"] | None = None

    def __post_init__(self):
        # Results built without padding information: every prompt reads every position.
        batch, n_pos = self.entropy.shape[1:]
        device = self.entropy.device
        if self.columns is None:
            self.columns = torch.tensor(self.positions, device=device).expand(batch, n_pos)
        if self.mask is None:
            self.mask = torch.ones(batch, n_pos, dtype=torch.bool, device=device)
        if self.lengths is None:
            self.lengths = torch.full((batch,), self.tokens.shape[1], device=device)

    def str_tokens_at(self, batch: int = 0) -> list[str]:
        """The token each position read for prompt ``batch`` ("" where it has none)."""
        tokens = self.str_tokens[batch]
        return [tokens[c] if m else "" for c, m in
                zip(self.columns[batch].tolist(), self.mask[batch].tolist())]

    @property
    def labels(self) -> list[str]:
        """Short row labels (``0 pre``, ``12 mid``, ``29 post``)."""
        return [short_label(name) for name in self.hook_names]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(layers, batch, positions)."""
        return tuple(self.entropy.shape)

    def statistic(self, name: str) -> Float[Tensor, "layer batch pos"]:
        """One per-cell statistic by name: logit and prob of the top-1, target rank, ...

        ``logit``/``prob`` are the top-1 token's; ``rank``, ``target_prob`` and
        ``target_logit`` need a target.
        """
        if name not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {name!r}")
        if name == "logit":
            return self.top_logits[..., 0]
        if name == "prob":
            return self.top_probs[..., 0]
        if name in ("entropy", "kl"):
            return self.entropy if name == "entropy" else self.kl_to_final
        if self.target_rank is None:
            raise ValueError(f"statistic {name!r} needs a target; pass target= to the lens")
        if name == "rank":  # -1 marks "no target here": shown as NaN, not as a rank
            rank = self.target_rank.float()
            return torch.where(self.target_rank < 0, torch.nan, rank)
        return self.target_prob if name == "target_prob" else self.target_logit

    def decode(self, ids) -> list[str]:
        """Token ids as strings, with the model's tokenizer when there is one."""
        return decode_each(self.tokenizer, ids)

    def top_tokens(self, batch: int = 0) -> list[list[list[str]]]:
        """The top-k tokens as strings, ``[layer][pos][k]``, for one prompt."""
        flat = self.decode(self.top_ids[:, batch].reshape(-1))
        n_layer, n_pos, k = self.top_ids[:, batch].shape
        return [[flat[(l * n_pos + p) * k:(l * n_pos + p + 1) * k] for p in range(n_pos)]
                for l in range(n_layer)]

    def to_html(self, statistic: str = "prob", batch: int = 0, **kwargs) -> str:
        """A self-contained HTML grid: top-1 token per cell, coloured by ``statistic``."""
        return view.grid_html(self, statistic=statistic, batch=batch, **kwargs)

    def save_png(self, path, statistic: str = "prob", batch: int = 0, **kwargs) -> Path:
        """A static PNG of the same grid (matplotlib); returns ``Path(path)``."""
        return view.grid_png(self, path, statistic=statistic, batch=batch, **kwargs)

    def _view_html(self, full: bool = False, **options) -> str:
        return view.notebook_view(self, full, **options)

    def cpu(self) -> "LensResult":
        """A copy with every tensor on the CPU."""
        moved = {name: (value.cpu() if isinstance(value, Tensor) else value)
                 for name, value in self.__dict__.items()}
        return LensResult(**moved)


def empty_like_cells(n_layer: int, batch: int, n_pos: int, *, k: int, target: bool,
                     d_vocab: int | None, device) -> dict[str, Tensor | None]:
    """Zeroed result tensors for a readout of this size (filled chunk by chunk)."""
    cells = (n_layer, batch * n_pos)
    out = dict(
        top_ids=torch.empty(*cells, k, dtype=torch.long, device=device),
        top_logits=torch.empty(*cells, k, device=device),
        top_probs=torch.empty(*cells, k, device=device),
        entropy=torch.empty(*cells, device=device),
        kl_to_final=torch.empty(*cells, device=device),
        target_rank=torch.full(cells, -1, dtype=torch.long, device=device) if target else None,
        target_logit=torch.full(cells, float("nan"), device=device) if target else None,
        target_prob=torch.full(cells, float("nan"), device=device) if target else None,
        logits=torch.empty(*cells, d_vocab, device=device) if d_vocab else None,
    )
    return out
