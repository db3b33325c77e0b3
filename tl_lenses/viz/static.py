r"""Static figures with matplotlib (Agg backend: no display needed), sized for papers.

Every figure is drawn inside :func:`figure_style`: math parsing and TeX are off, so token
text (``$$x^2$$``, ``\``, ``_``, ``^``, ``{``) is drawn literally; SVG keeps text as text and
PDF embeds TrueType fonts (editable in a vector editor). matplotlib's log-axis formatters
write mathtext, so a log axis here needs a plain formatter (see the tuned lens's KL plot).
:func:`save_figure` writes PNG, SVG or PDF by the path's suffix.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Sequence

import numpy as np

FORMATS = (".png", ".svg", ".pdf")
# Paper sizes: 8 pt text at a 6.75 in (two-column) width stays legible when printed.
PAPER_RC = {
    "text.parse_math": False, "text.usetex": False, "svg.fonttype": "none",
    "pdf.fonttype": 42, "ps.fonttype": 42, "font.size": 8, "axes.titlesize": 9,
    "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 7,
    "figure.dpi": 100, "savefig.dpi": 200, "savefig.bbox": "tight",
}


@contextlib.contextmanager
def figure_style():
    """Matplotlib settings for every figure here (Agg, literal text, paper font sizes)."""
    import matplotlib

    matplotlib.use("Agg")
    with matplotlib.rc_context(PAPER_RC):
        yield


def check_figure_path(path) -> Path:
    """``path`` as a Path whose suffix is a format :func:`save_figure` writes.

    Raises:
        ValueError: for another suffix.
    """
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"path must end in one of {FORMATS} (the figure format), got {path}")
    return path


def save_figure(fig, path) -> Path:
    """Write ``fig`` to ``path`` as PNG, SVG or PDF (by suffix) and close it.

    Args:
        fig: a matplotlib figure drawn under :func:`figure_style`.
        path: where to write; its suffix picks the format.

    Returns:
        The path written.
    """
    import matplotlib.pyplot as plt

    path = check_figure_path(path)
    try:
        with figure_style():
            fig.savefig(path, format=path.suffix[1:].lower())
    finally:
        plt.close(fig)
    return path


def figure_png_bytes(fig, dpi: int = 100) -> bytes:
    """``fig`` as PNG bytes (for inline ``<img>`` in HTML views), then closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        with figure_style():
            fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _windows(n_cols: int, max_cols: int) -> list[range]:
    """Balanced column windows of at most ``max_cols`` (a long prompt wraps into panels)."""
    n_panels = -(-n_cols // max_cols)
    width = -(-n_cols // n_panels)
    return [range(start, min(start + width, n_cols)) for start in range(0, n_cols, width)]


def heatmap_figure(
    values, row_labels: Sequence[str], col_labels: Sequence[str], *,
    cell_text: Sequence[Sequence[str]] | None = None, title: str = "", cmap: str = "viridis",
    colorbar_label: str = "", vmin: float | None = None, vmax: float | None = None,
    max_cols: int = 16,
):
    """A heatmap with optional text in each cell, first row at the top.

    Columns beyond ``max_cols`` wrap into further panels below (one shared colour scale
    and colour bar), so a long prompt stays readable at paper width.

    Args:
        values: ``[rows, cols]`` numbers (NaN: grey).
        row_labels: one label per row, top first (drawn literally).
        col_labels: one label per column (drawn literally).
        cell_text: text per cell (drawn literally), or None.
        title: the figure's title.
        cmap: a matplotlib colour map name.
        colorbar_label: the colour bar's label, with units.
        vmin: the low end of the colour scale (default: the data's minimum).
        vmax: the high end of the colour scale (default: the data's maximum).
        max_cols: columns per panel.

    Returns:
        The matplotlib figure (save it with :func:`save_figure`).
    """
    import matplotlib.pyplot as plt

    data = np.asarray(values, dtype=float)
    n_rows, n_cols = data.shape
    finite = data[np.isfinite(data)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    windows = _windows(n_cols, max(1, max_cols))
    per_panel = len(windows[0])
    width = min(max(3.5, 0.5 * per_panel + 1.8), 9.0)
    panel_h = max(1.2, 0.2 * n_rows + 0.9)
    with figure_style():
        fig, axes = plt.subplots(len(windows), 1, figsize=(width, panel_h * len(windows)),
                                 squeeze=False)
        cmap_obj = plt.get_cmap(cmap).with_extremes(bad="#dddddd")
        for ax, cols in zip(axes[:, 0], windows):
            part = data[:, cols.start:cols.stop]
            image = ax.imshow(np.ma.masked_invalid(part), aspect="auto", cmap=cmap_obj,
                              vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks(range(len(cols)), [str(col_labels[c]) for c in cols], rotation=45,
                          ha="right", rotation_mode="anchor")
            ax.set_yticks(range(n_rows), [str(r) for r in row_labels])
            ax.set_xlim(-0.5, per_panel - 0.5)  # equal cell widths in a short last panel
            if cell_text is not None:
                _annotate(ax, image, part, [[row[c] for c in cols] for row in cell_text])
        fig.colorbar(image, ax=axes[:, 0].tolist(), label=colorbar_label, fraction=0.03,
                     pad=0.02)
        if title:
            axes[0, 0].set_title(title)
    return fig


def _annotate(ax, image, part: np.ndarray, text: Sequence[Sequence[str]]) -> None:
    """Each cell's text in black or white, whichever reads on its colour."""
    for i in range(part.shape[0]):
        for j in range(part.shape[1]):
            r, g, b, _ = image.cmap(image.norm(part[i, j]))
            light = not np.isfinite(part[i, j]) or 0.299 * r + 0.587 * g + 0.114 * b > 0.55
            ax.text(j, i, _clip(str(text[i][j])), ha="center", va="center", fontsize=5.5,
                    color="black" if light else "white", clip_on=True)


def _clip(text: str, width: int = 9) -> str:
    return text if len(text) <= width else text[:width - 1] + "\u2026"


def heatmap_png(path, values, row_labels: Sequence[str], col_labels: Sequence[str],
                **kwargs) -> Path:
    """:func:`heatmap_figure` written to ``path`` (PNG, SVG or PDF by suffix)."""
    check_figure_path(path)
    return save_figure(heatmap_figure(values, row_labels, col_labels, **kwargs), path)
