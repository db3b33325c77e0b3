"""Static PNG figures with matplotlib (Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def heatmap_png(
    path, values, row_labels: Sequence[str], col_labels: Sequence[str], *,
    cell_text: Sequence[Sequence[str]] | None = None, title: str = "", cmap: str = "viridis",
    colorbar_label: str = "", vmin: float | None = None, vmax: float | None = None,
) -> Path:
    """A heatmap with optional text in each cell, first row at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = np.asarray(values, dtype=float)
    n_rows, n_cols = data.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * n_cols + 2), max(3, 0.32 * n_rows + 1.5)))
    image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(n_cols), [str(c) for c in col_labels], rotation=45, ha="right",
                  fontsize=8)
    ax.set_yticks(range(n_rows), [str(r) for r in row_labels], fontsize=8)
    if cell_text is not None:
        for i in range(n_rows):
            for j in range(n_cols):
                r, g, b, _ = image.cmap(image.norm(data[i, j]))
                light = 0.299 * r + 0.587 * g + 0.114 * b > 0.55
                ax.text(j, i, cell_text[i][j], ha="center", va="center", fontsize=6,
                        color="black" if light else "white", clip_on=True)
    fig.colorbar(image, ax=ax, label=colorbar_label, fraction=0.04)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)

