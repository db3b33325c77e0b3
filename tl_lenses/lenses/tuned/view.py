"""Views of a lens evaluation: KL per layer as a line plot (PNG) and as an HTML page."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from tl_lenses.viz.html import page, table_html


def _figure(evaluation, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = range(len(evaluation.labels))
    for name, m in evaluation.metrics.items():
        ax.plot(x, m.kl.tolist(), marker="o", markersize=3,
                label=f"{name} (mean {m.mean_kl:.3f})")
    ax.set_xticks(list(x), evaluation.labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("KL(final || lens), nats")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig, plt


def kl_plot_png(evaluation, path, title: str) -> Path:
    """KL per layer, one line per lens, log-scaled above 0.1 nats."""
    fig, plt = _figure(evaluation, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def evaluation_html(evaluation, title: str) -> str:
    """A self-contained page: the KL plot (inline PNG), a summary and the per-layer table."""
    fig, plt = _figure(evaluation, "KL(final || lens) per layer")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    image = base64.b64encode(buffer.getvalue()).decode()
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
            "Means exclude the final layer. CE: cross-entropy of the true next token.</p>")
    return page(title, f"<img src='data:image/png;base64,{image}'>", note, summary,
                "<h2>Per layer (nats)</h2>",
                table_html(evaluation.header(), evaluation.rows()))
