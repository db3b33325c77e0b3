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
