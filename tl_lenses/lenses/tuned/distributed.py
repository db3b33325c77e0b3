"""torch.distributed for lens training: which rank this is, and the few collectives it needs.

``torchrun`` launches the processes and sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``MASTER_ADDR``; :func:`init_distributed` joins the default process group (NCCL when the
model is on a GPU, gloo on CPUs). Training then reads ``torch.distributed``'s default group
through :func:`current_world`; a single process is a world of one, where every collective
is a no-op. Why not ``DistributedDataParallel``: the lens has two parameter tensors whose
gradient is pushed by hand (no ``forward`` for DDP's hooks to wrap), and a step may end
early at the time budget, so one explicit all-reduce per step of the summed gradients is
both what DDP would do and simpler to keep equal across ranks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger("tl_lenses")


@dataclass(frozen=True)
class World:
    """This process's ``rank`` among ``size`` processes (``size == 1``: no process group)."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")      # where the backend's tensors must live

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, the lens file and the logs."""
        return self.rank == 0

    def all_reduce_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over ranks, in place (on the backend's device and back)."""
        if self.size == 1:
            return tensor
        moved = tensor.to(self.device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        if moved is not tensor:
            tensor.copy_(moved)
        return tensor

    def broadcast_(self, tensor: Tensor) -> Tensor:
        """Rank 0's ``tensor`` on every rank, in place."""
        if self.size == 1:
            return tensor
        moved = tensor.to(self.device)
        dist.broadcast(moved, src=0)
        if moved is not tensor:
            tensor.copy_(moved)
        return tensor

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` (so that every rank takes the same decision)."""
        if self.size == 1:
            return value
        return int(self.broadcast_(torch.tensor([value], dtype=torch.long)).item())


def current_world() -> World:
    """The default process group as a :class:`World` (a world of one without a group).

    Raises:
        RuntimeError: ``WORLD_SIZE`` > 1 in the environment (a ``torchrun`` launch) but no
            process group: each rank would silently train alone on all the data.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError("WORLD_SIZE > 1 (launched by torchrun?) but torch.distributed "
                               "is not initialised: call tl_lenses.lenses.tuned."
                               "init_distributed() first")
        return World()
    backend = dist.get_backend()
    device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
              else torch.device("cpu"))
    return World(rank=dist.get_rank(), size=dist.get_world_size(), device=device)


def init_distributed(device: str | torch.device | None = None) -> World:
    """Join the process group ``torchrun`` set up (no-op outside ``torchrun`` or if joined).

    Args:
        device: the model's device on this rank. A CUDA device selects NCCL (and becomes
            the current device); otherwise gloo. ``None``: :func:`local_device`.

    Returns:
        This process's :class:`World`.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        device = rank_device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        logger.info("rank %d of %d joined the %s process group", dist.get_rank(),
                    dist.get_world_size(), backend)
    return current_world()


def rank_device(device: str | torch.device | None) -> torch.device:
    """This rank's device for the model.

    ``None`` is :func:`local_device`; an index-less ``"cuda"`` is ``cuda:LOCAL_RANK`` (one
    GPU per process under ``torchrun``); any other device is kept.
    """
    if device is None:
        return local_device()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (one GPU per process), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def close_distributed() -> None:
    """Leave the process group (if one was joined), so the process exits cleanly."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
