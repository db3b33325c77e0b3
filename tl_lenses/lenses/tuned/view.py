"""Views of a lens evaluation: KL per layer as a line plot (figure) and as HTML."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tl_lenses.viz.html import image_html, page, show_text, table_html
from tl_lenses.viz.static import check_figure_path, figure_png_bytes, figure_style, save_figure

if TYPE_CHECKING:  # views import result types for type checkers only (no import cycle)
    from tl_lenses.lenses.tuned.eval import LensEvaluation


def _figure(evaluation: LensEvaluation, title: str):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    with figure_style():
        fig, ax = plt.subplots(figsize=(6.5, 3.0))
        x = range(len(evaluation.labels))
        for name, m in evaluation.metrics.items():
            ax.plot(x, m.kl.tolist(), marker="o", markersize=2.5,
                    label=f"{show_text(name)} (mean {m.mean_kl:.3f} nats)")
        step = max(1, len(evaluation.labels) // 24)  # at most ~24 tick labels at paper width
        ax.set_xticks(list(x)[::step], evaluation.labels[::step], rotation=60, ha="right")
        ax.set_xlabel("layer (hook point)")
        ax.set_ylabel("KL(final || lens) (nats)")
        ax.set_yscale("symlog", linthresh=0.1)
        # The log formatters write mathtext, which figure_style turns off: plain numbers.
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_title(show_text(title))
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def kl_plot_png(evaluation: LensEvaluation, path, title: str) -> Path:
    """KL per layer, one line per lens, log-scaled above 0.1 nats (PNG, SVG or PDF)."""
    check_figure_path(path)
    return save_figure(_figure(evaluation, title), path)


def evaluation_fragment(evaluation: LensEvaluation, full: bool = True) -> str:
    """The KL plot (inline PNG), a summary table and (``full``) the per-layer table."""
    image = figure_png_bytes(_figure(evaluation, "KL(final || lens) per layer"))
    summary = table_html(
        ["lens", "mean KL (nats)", "mean KL (bits/byte)", "mean CE (nats)",
         "mean CE (bits/byte)", "mean top-1 agreement"],
        [[name, f"{m.mean_kl:.4f}", f"{float(m.kl_bpb[:-1].mean()):.4f}",
          f"{float(m.cross_entropy[:-1].mean()):.4f}",
          f"{float(m.cross_entropy_bpb[:-1].mean()):.4f}",
          f"{float(m.top1_agreement[:-1].mean()):.3f}"]
         for name, m in evaluation.metrics.items()],
    )
    any_m = next(iter(evaluation.metrics.values()))
    note = (f"<p class='note'>{any_m.n_tokens} held-out tokens ({any_m.n_bytes} bytes). "
            "Means exclude the final layer. CE: cross-entropy of the true next token."
            f"{'' if full else ' <code>evaluation.show()</code> adds the per-layer table.'}"
            "</p>")
    parts = [image_html(image, "KL(final || lens) per layer"), note, summary]
    if full:
        parts += ["<h2>Per layer (nats)</h2>",
                  table_html(evaluation.header(), evaluation.rows())]
    return "".join(parts)


def evaluation_html(evaluation: LensEvaluation, title: str) -> str:
    """A self-contained page: the KL plot (inline PNG), a summary and the per-layer table."""
    return page(title, evaluation_fragment(evaluation, full=True))
