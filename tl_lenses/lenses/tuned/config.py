"""Settings and result of tuned-lens training (:func:`.train.train_tuned_lens`)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, replace

import torch

from tl_lenses import devices
from tl_lenses.lenses.tuned.lens import TunedLens
from tl_lenses.viz.brief import brief_repr

# The tuned-lens library's SGD lr: lr_scale 1 times (1 - momentum 0.9). The optimizer takes
# 0.1 as it is; the (1 - momentum) factor is already in it (applying it again gave 0.01).
REFERENCE_LR = 0.1


@dataclass
class TrainConfig:
    """Settings of :func:`train_tuned_lens`; ``None`` fields take the recipe's default.

    ``steps`` counts KL steps only: ``steps=0`` with the fast recipe trains the
    least-squares lens alone (the warm start, no KL refinement). ``ls_tokens`` is what the
    fast recipe's warm start reads at most, rounded up to whole batches and never more
    than one pass over the data: a tensor's rows are each read at most once (the rows of
    one shuffled epoch, in whole batches), a stream is read until ``ls_tokens`` or its
    end. ``ls_tokens=0`` skips the warm start (KL from the identity, as the reference
    recipe, which ignores ``ls_tokens``); with ``steps=0`` too the lens stays the identity
    (the logit lens). ``lens_device``: where the lens, its optimizer and the KL targets
    live (default: the model's device; for a model spread over several devices, the one
    holding the unembedding).
    """

    recipe: str = "fast"                # "fast" or "reference"
    steps: int | None = None            # KL steps (reference 250, fast 30)
    time_budget: float | None = None    # seconds for the whole call; lr decays over it
    batch_size: int | None = None       # rows per step, over all processes (8; 32 on a GPU)
    micro_batch_size: int | None = None  # rows per forward pass (None: a rank's share)
    lr: float | None = None             # reference 0.1 (SGD), fast 1e-4 (Adam)
    momentum: float = 0.9
    weight_decay: float = 1e-3
    clip: float = 1.0
    bf16: bool | None = None            # reference False, fast True where bf16 is fast
    ls_tokens: int = 32768              # fast: most tokens the least-squares warm start
    #                                     reads (whole batches, at most one pass)
    ls_time_fraction: float = 0.5       # ...at most this share of time_budget
    ridge: float = 1e-2                 # ridge towards the identity, relative to E[x x^T]
    max_chunk_elements: int | None = None  # bounds [layers x tokens x d_vocab] per matmul
    #                                        (1e8; 4e8 on a GPU)
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 20
    progress: bool = True
    lens_device: str | None = None      # None: the model's (spread: the unembedding's)

    def resolved(self, device: torch.device | str = "cpu") -> "TrainConfig":
        """A copy with the recipe's defaults filled in (ValueError for bad settings).

        ``device`` is the lens's (recorded as ``lens_device``). Batch and matmul sizes
        depend on it (larger on a GPU); so does the fast
        recipe's ``bf16``: only where the device has fast bf16 matmuls
        (:func:`tl_lenses.devices.fast_bf16`), since emulated ones ran ~60x slower than
        float32 on an AVX2-only CPU.
        """
        if self.recipe not in ("fast", "reference"):
            raise ValueError(f"recipe must be 'fast' or 'reference', got {self.recipe!r}")
        for name in ("batch_size", "micro_batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time_budget must be > 0 seconds, got {self.time_budget!r}")
        fast = self.recipe == "fast"
        gpu = torch.device(device).type != "cpu"
        return replace(
            self, steps=self.steps if self.steps is not None else (30 if fast else 250),
            lr=self.lr if self.lr is not None else (1e-4 if fast else REFERENCE_LR),
            bf16=self.bf16 if self.bf16 is not None else fast and devices.fast_bf16(device),
            batch_size=self.batch_size if self.batch_size is not None else (32 if gpu else 8),
            max_chunk_elements=self.max_chunk_elements if self.max_chunk_elements is not None
            else (400_000_000 if gpu else 100_000_000),
            lens_device=str(torch.device(device)),
        )


def with_overrides(config: TrainConfig | None, overrides: dict) -> TrainConfig:
    """``config`` (default: ``TrainConfig()``) with ``overrides`` as field values.

    Raises:
        ValueError: naming each override that is no field (with the closest field), where
            ``dataclasses.replace`` would raise a TypeError about ``__init__``.
    """
    known = [f.name for f in fields(TrainConfig)]
    unknown = [name for name in overrides if name not in known]
    if unknown:
        close = {name: difflib.get_close_matches(name, known, n=1) for name in unknown}
        hints = "".join(f"; {name!r}: did you mean {match[0]!r}?"
                        for name, match in close.items() if match)
        raise ValueError(f"unknown training option(s) {unknown}{hints}; the options are "
                         f"TrainConfig's fields: {known}")
    return replace(config or TrainConfig(), **overrides)


@dataclass
class TrainResult:
    """The trained lens, its history (per-step mean KL over layers, nats) and what was done.

    ``stop_reason`` is ``"steps"`` (all steps done), ``"time_budget"`` (the clock ended it,
    possibly with a last step on fewer rows than a batch) or ``"data"`` (a stream ran out).
    ``kl_skipped`` is True when not even one KL micro-batch fitted in the budget after the
    warm start. Token counts are over all processes. ``floor_seconds`` is the shortest this
    call could have been: the time to its first row of work (set-up and one row's forward
    pass, the smallest piece) plus one least-squares solve (fast recipe); a ``time_budget``
    below it cannot be kept (a warning says so).

    ``warm_start_stop`` says why the fast recipe's warm start ended: ``"ls_tokens"`` (it
    read ``ls_tokens``, rounded up to whole batches), ``"data"`` (the data held fewer: a
    tensor's rows were each read once, or a stream ended), ``"time_budget"``, or
    ``"none"`` (no warm start: the reference recipe or ``ls_tokens=0``).
    ``lens_device`` is the device the lens was trained on.
    """

    lens: TunedLens
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    tokens_seen: int = 0                 # KL-phase tokens
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    warm_start_tokens: int = 0
    stop_reason: str = "steps"
    kl_skipped: bool = False
    warm_start_stop: str = "none"
    micro_batches: int = 0               # KL forward passes on each process
    world_size: int = 1
    floor_seconds: float = 0.0
    warm_start_seconds: float = 0.0      # clock time when the warm start (and solve) ended
    lens_device: str = "cpu"

    __repr__ = brief_repr  # one line: tensors by shape, lists by length


def _optimizer(lens: TunedLens, cfg: TrainConfig):
    if cfg.recipe == "reference":
        return torch.optim.SGD(lens.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(lens.parameters(), lr=cfg.lr)
