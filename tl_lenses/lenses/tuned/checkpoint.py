"""Training checkpoints: lens, optimizer, schedule position, RNG and data position in one file.

Written by rank 0 only (``torch.save`` to a temporary name, then an atomic rename, so an
interrupted write never leaves a half file under the real name); read by every rank on
resume, so the folder must be on storage that all ranks see.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(folder: str | Path, state: dict) -> Path:
    """Write ``state`` to ``folder/checkpoint.pt`` atomically; return the path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp, path = folder / (CHECKPOINT + ".tmp"), folder / CHECKPOINT
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(folder: str | Path | None) -> dict | None:
    """The state in ``folder/checkpoint.pt``, or ``None`` when there is none.

    Raises:
        ValueError: the file is corrupt or truncated.
    """
    path = Path(folder or ".") / CHECKPOINT
    if folder is None or not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"checkpoint {path} is corrupt or truncated: {error}") from None


def trainer_state(trainer) -> dict:
    """What a resumed run needs of a :class:`~.loop.Trainer`.

    Lens, optimizer, step, losses, clock, data position, RNG, and what the warm start did.
    """
    return {
        "lens": trainer.lens.state_dict(), "optimizer": trainer.optimizer.state_dict(),
        "step": trainer.step, "tokens_seen": trainer.tokens_seen,
        "losses": trainer.loss_values(), "elapsed": trainer.clock.elapsed(),
        "hook_names": trainer.lens.hook_names, "recipe": trainer.cfg.recipe,
        "batch_rows": trainer.batch_rows, "data": trainer.source.state_dict(),
        "rng": torch.get_rng_state(), "warm_start_tokens": trainer.warm_tokens,
        "warm_start_stop": trainer.warm_stop}


def restore_trainer(trainer, state: dict) -> None:
    """Put a :func:`trainer_state` back (ValueError for another lens, recipe or batch)."""
    folder = trainer.cfg.checkpoint_dir
    if state["hook_names"] != trainer.lens.hook_names or state["recipe"] != trainer.cfg.recipe:
        raise ValueError(f"checkpoint in {folder} is for another lens or recipe")
    if state["batch_rows"] != trainer.batch_rows:
        raise ValueError(f"checkpoint in {folder} has batches of {state['batch_rows']} rows, "
                         f"not {trainer.batch_rows}")
    trainer.lens.load_state_dict(state["lens"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.step, trainer.tokens_seen = state["step"], state["tokens_seen"]
    trainer.losses, trainer.clock.offset = list(state["losses"]), state["elapsed"]
    trainer.source.load_state_dict(state["data"])
    trainer.warm_tokens = state["warm_start_tokens"]
    trainer.warm_stop = state.get("warm_start_stop",        # older checkpoints lack it
                                  "ls_tokens" if trainer.warm_tokens else "none")
    torch.set_rng_state(state["rng"])
