"""Training a tuned lens: the reference recipe and a faster default one.

Both minimise, for every covered layer, KL(final distribution || lens distribution) over
text, with the model frozen; one forward pass of the model per batch serves all layers.

``recipe="reference"`` is the tuned-lens library's: SGD with Nesterov momentum 0.9, lr 0.1
(effective lr 1 after the (1 - momentum) scaling), weight decay 1e-3, linear decay to 0,
gradient clipping at norm 1, the KL summed over layers; float32 unembedding matmuls by default
(the library autocasts its lens to bfloat16: ``bf16=True`` matches it).

``recipe="fast"`` (default) first solves for each layer, in closed form, the affine map whose
output points where the final residual points (:mod:`.least_squares`), then refines it with a
short Adam KL phase with bfloat16 unembedding matmuls. See ``docs/tuned_lens.md``.

The KL gradient is taken by hand (:mod:`.kl`). On CUDA the softmax, the KL and that gradient
are one compiled function (:func:`tl_lenses.devices.compiled`: two passes over the bf16
logits instead of six eager float32 ones), the default batch is larger (32 rows) and so are
the matmuls (up to ``4e8`` logits each), and the per-step losses stay on the GPU until the
end, so the GPU never waits for the host.

Each step's global batch is cut into micro-batches whose gradients add up (sums, divided by
the step's token count at the end). Under ``torch.distributed`` each rank takes its share
of every global batch and one all-reduce per step adds the ranks' sums, so N processes make
the same steps as one. With a ``time_budget`` the micro-batches are sized to the clock
(:mod:`.budget`), so the call returns within the budget whatever one step costs.
"""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Int
from torch import Tensor

from tl_lenses import devices
from tl_lenses._autograd import needs_autograd
from tl_lenses.lenses.tuned.budget import Clock
from tl_lenses.lenses.tuned.checks import check_training
from tl_lenses.lenses.tuned.config import (
    REFERENCE_LR,
    TrainConfig,
    TrainResult,
    _optimizer,
    with_overrides,
)
from tl_lenses.lenses.tuned.distributed import current_world
from tl_lenses.lenses.tuned.kl import kl_backward, residuals
from tl_lenses.lenses.tuned.least_squares import Moments
from tl_lenses.lenses.tuned.lens import TunedLens
from tl_lenses.lenses.tuned.loop import Trainer
from tl_lenses.models import check_model
from tl_lenses.readout.unembed import Unembed
from tl_lenses.streams import TensorRows, TokenStream

__all__ = ["TrainConfig", "TrainResult", "train_tuned_lens", "Moments", "kl_backward",
           "residuals", "REFERENCE_LR", "_optimizer", "Unembed"]


@needs_autograd
def train_tuned_lens(model, tokens: Int[Tensor, "batch pos"] | TokenStream | TensorRows,
                     lens: TunedLens | None = None, *, config: TrainConfig | None = None,
                     callback: Callable[[int, float, TunedLens], None] | None = None,
                     resume: bool = False, **overrides) -> TrainResult:
    """Train a tuned lens on ``tokens`` (Belrose et al. 2023: minimise KL(final || lens)).

    ``recipe="fast"`` (default): a closed-form least-squares warm start from accumulated
    second moments, then Adam KL steps with bf16 unembedding matmuls. ``"reference"``: the
    published recipe (SGD with Nesterov momentum 0.9, lr 0.1 x (1 - momentum), weight decay,
    linear decay, clipping). The model is frozen; its weights never change.

    ``time_budget`` covers the whole call (warm start, solves and checkpoint writes
    included): work is cut into micro-batches sized to the clock, and the KL phase is
    skipped when not one micro-batch of it fits (``TrainResult.kl_skipped``). Under
    ``torchrun`` (after :func:`~tl_lenses.lenses.tuned.distributed.init_distributed`) each
    rank runs the model on its share of every global batch and the ranks' gradients and
    least-squares moments are summed, so N processes train the lens one process does.

    The warm start reads at most ``ls_tokens`` (whole batches) and at most one pass over
    the data; ``steps`` counts KL steps (``steps=0``: the least-squares lens alone). The
    model may be spread over several devices of this process (TL's ``n_devices``, a
    Bridge's ``device_map``): the lens then lives on the unembedding's device (or
    ``lens_device``) and each layer's residual is moved there.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge``, on one device or spread
            over several (:func:`tl_lenses.devices.lens_device`).
        tokens: int token rows ``[batch, pos]`` (e.g. ``token_split(...).train``; shuffled
            per epoch, seeded, never runs out) or a :class:`~tl_lenses.streams.TokenStream`
            (read in order; training stops when it ends). Every rank passes the same data.
        lens: the lens to train (default: a fresh full-affine :class:`TunedLens`).
        config: a :class:`TrainConfig`.
        callback: ``callback(step, seconds, lens)`` after the warm start's batches (step 0)
            and after every step, on every rank; its own time is not counted.
        resume: continue from the checkpoint in ``checkpoint_dir`` (lens, optimizer,
            schedule, RNG and data position: the result equals an uninterrupted run).
        **overrides: :class:`TrainConfig` fields (``recipe``, ``steps``, ``time_budget``
            in seconds, ``batch_size`` in rows over all processes, ``micro_batch_size``,
            ``lr``, ``seed``, ``ls_tokens``, ``lens_device``, ...).

    Returns:
        A :class:`TrainResult`: the lens, the per-step mean KL over layers (nats), steps,
        tokens seen, seconds, and what was done (warm-start tokens, micro-batches, whether
        the KL phase was skipped, why training stopped).

    Raises:
        ValueError: naming the argument: tokens that are not int ``[batch, pos]`` ids of the
            vocabulary, an unknown ``recipe`` or config field, ``batch_size`` not a multiple
            of the number of processes, a checkpoint for another lens or recipe, a
            ``lens_device`` that is no usable device, a spread model with offloaded
            (meta) weights.
        TypeError: ``lens`` is not a :class:`TunedLens`.
        RuntimeError: launched by ``torchrun`` without a process group.

    >>> rows = torch.randint(0, model.cfg.d_vocab, (16, 12), generator=torch.manual_seed(0))
    >>> result = train_tuned_lens(model, rows, steps=2, batch_size=8, progress=False)
    >>> result.steps, len(result.losses) > 0
    (2, True)
    """
    clock = Clock()                      # the budget covers everything from here
    check_model(model, spread=True)
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig or None, got {type(config).__name__}")
    cfg = with_overrides(config, overrides)
    device = devices.lens_device(model, cfg.lens_device)
    cfg = cfg.resolved(device)
    # Every argument is checked before anything is built or moved (nothing is mutated).
    check_training(model, tokens, lens, cfg, callback=callback, resume=resume)
    clock.budget = cfg.time_budget
    source = _source(model, tokens, cfg.seed)
    world = current_world()
    lens = lens if lens is not None else TunedLens.for_model(model)
    lens.to(device)
    for param in lens.parameters():      # every rank starts from rank 0's lens
        with torch.no_grad():
            world.broadcast_(param.data)
    torch.manual_seed(cfg.seed)
    trainer = Trainer(model, lens, source, cfg, callback, world, clock)
    if not (resume and trainer.load()):
        if cfg.recipe == "fast" and cfg.ls_tokens > 0:
            trainer.warm_start()
    trainer.run()
    trainer.warn_if_over()
    return trainer.result()


def _source(model, tokens, seed: int):
    """The rows to train on (``tokens`` was checked by :func:`check_training`)."""
    if isinstance(tokens, (TokenStream, TensorRows)):
        return tokens
    return TensorRows(tokens, seed)
