"""HTML tables and PNG figures of the analysis results (viz primitives only, no method code)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from tl_lenses.viz.html import esc, heatmap_html, table_html

if TYPE_CHECKING:
    from tl_lenses.analysis.alignment import AlignmentResult
    from tl_lenses.analysis.causal import CausalResult
    from tl_lenses.analysis.causal_lre import LRECausalityResult
    from tl_lenses.analysis.current_next import CurrentNextResult
    from tl_lenses.analysis.drift import DriftResult
    from tl_lenses.analysis.objectives import ObjectivesResult
    from tl_lenses.analysis.retrained import RetrainedResult

NAMES = {"kl": "KL(final || lens), nats", "ce": "cross-entropy of next token, nats",
         "top1_agreement": "top-1 = final top-1", "top1_accuracy": "top-1 = next token",
         "mse_logits": "MSE of logits", "mse_resid": "MSE of residual",
         "cosine_distance": "1 - cos(residual, final)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return Path(path)


def lines_png(path, labels: Sequence[str], panels: Mapping[str, Mapping[str, Sequence[float]]],
              title: str, *, log: Sequence[str] = ()) -> Path:
    """One panel per entry of ``panels`` (title -> {line label -> values per layer})."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (name, lines) in zip(axes[0], panels.items()):
        for label, values in lines.items():
            ax.plot(range(len(labels)), np.asarray(values, dtype=float), marker=".", label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        step = max(1, len(labels) // 12)
        ax.set_xticks(range(0, len(labels), step), labels[::step], fontsize=7, rotation=45)
        if name in log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def metric_lines_png(path, labels, metrics, keys, title) -> Path:
    """Per-layer lines of ``metrics[lens][key]`` for each key."""
    panels = {NAMES.get(k, k): {lens: m[k].tolist() for lens, m in metrics.items()} for k in keys}
    return lines_png(path, labels, panels, title)


def _metric_heatmap(labels, metrics, key, **kwargs) -> str:
    lenses = list(metrics)
    values = [[float(metrics[lens][key][i]) for lens in lenses] for i in range(len(labels))]
    return heatmap_html(values, labels, lenses, caption=NAMES.get(key, key), **kwargs)


def objectives_html(result: "ObjectivesResult") -> str:
    """Summary table, then KL / CE / top-1 per layer and lens."""
    header, rows = result.summary()
    parts = [f"<p class='note'>{result.n_train_tokens} training tokens per lens (same rows, "
             f"order and steps for every objective); {result.n_eval_tokens} held-out tokens."
             "</p>", table_html(header, rows)]
    for key, cmap in (("kl", "magma_r"), ("ce", "magma_r"), ("top1_agreement", "viridis")):
        parts.append(f"<h3>{esc(NAMES[key])}</h3>" +
                     _metric_heatmap(result.labels, result.metrics, key, cmap=cmap))
    return "\n".join(parts)


def retrained_html(result: "RetrainedResult") -> str:
    """Per-layer CE and top-1 accuracy of each decoder."""
    header, rows = result.table()
    return "\n".join([f"<p class='note'>{result.n_eval_tokens} held-out tokens.</p>",
                      table_html(header, rows)])


def current_next_png(result: "CurrentNextResult", path) -> Path:
    """Probability of each group's token per layer; one panel per lens."""
    panels = {f"{lens}: mean probability": {g: s[f"{g}_prob"].tolist() for g in
                                            ("current", "next", "copy", "novel")}
              for lens, s in result.stats.items()}
    return lines_png(path, result.labels, panels, "Current token vs next token per layer")


def current_next_html(result: "CurrentNextResult") -> str:
    """Per lens: probability and rank tables of the four groups."""
    groups = ("current", "next", "copy", "novel")
    parts = ["<p class='note'>tokens: " + ", ".join(f"{g} {n}" for g, n in result.counts.items())
             + "</p>"]
    for lens, s in result.stats.items():
        layer = result.crossover(lens)
        when = "never" if layer is None else f"from layer {layer}"
        parts.append(f"<h3>{esc(lens)}: the next token beats the input token {esc(when)}</h3>")
        header = ["layer"] + [f"{g} p" for g in groups] + [f"{g} rank" for g in groups]
        rows = [[label] + [_mean_cell(s[f"{g}_prob"][i], result.counts.get(g), ".3f")
                           for g in groups] +
                [_mean_cell(s[f"{g}_rank"][i], result.counts.get(g), ".1f") for g in groups]
                for i, label in enumerate(result.labels)]
        parts.append(table_html(header, rows))
    return "\n".join(parts)


def _mean_cell(value, count: int | None, spec: str) -> str:
    # A group with no tokens has no mean: say so rather than print "nan".
    return "no tokens" if count == 0 else format(float(value), spec)


def _matrix_html(matrix, row_labels, col_labels, caption, cmap="viridis") -> str:
    values = [[float(v) for v in row] for row in matrix]
    text = [["" if v != v else f"{v:.2f}" for v in row] for row in values]
    return heatmap_html(values, row_labels, col_labels, cell_text=text, caption=caption, cmap=cmap)


def drift_html(result: "DriftResult") -> str:
    """CKA, covariance similarity and (with a tuned lens) translator transfer heatmaps."""
    labels = result.labels
    parts = [f"<p class='note'>{result.n_tokens} tokens.</p>",
             "<h3>linear CKA</h3>", _matrix_html(result.cka, labels, labels, "CKA"),
             "<h3>covariance similarity</h3>",
             _matrix_html(result.covariance, labels, labels, "cosine of covariances")]
    if result.transfer_kl is not None:
        inner = labels[:-1]
        parts += ["<h3>translator transfer: KL of decoding layer m (column) with layer l's "
                  "translator (row)</h3>",
                  _matrix_html(result.transfer_kl, inner, inner, "KL, nats", cmap="magma_r"),
                  "<p class='note'>logit lens KL per layer: " +
                  ", ".join(f"{l} {float(v):.2f}" for l, v in zip(inner, result.logit_kl)) +
                  "</p>"]
    return "\n".join(parts)


def drift_png(result: "DriftResult", path) -> Path:
    """The layer x layer matrices side by side."""
    plt = _pyplot()
    mats = [("linear CKA", result.cka, "viridis"),
            ("covariance similarity", result.covariance, "viridis")]
    if result.transfer_kl is not None:
        mats.append(("KL: layer m (x) via translator l (y)", result.transfer_kl, "magma_r"))
    fig, axes = plt.subplots(1, len(mats), figsize=(5 * len(mats), 4.4), squeeze=False)
    for ax, (title, matrix, cmap) in zip(axes[0], mats):
        image = ax.imshow(np.asarray(matrix, dtype=float), cmap=cmap)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def alignment_html(result: "AlignmentResult") -> str:
    """Mean and quartiles of cos(update, -gradient) per sublayer and block."""
    sublayers = result.sublayers
    q1, q2, q3 = (result.quantile(q) for q in (0.25, 0.5, 0.75))
    values = result.mean.T.tolist()
    text = [[f"{values[l][s]:+.2f}" for s in range(len(sublayers))]
            for l in range(len(result.labels))]
    tips = [[f"mean {values[l][s]:+.3f}; quartiles {q1[s, l]:+.2f} {q2[s, l]:+.2f} "
             f"{q3[s, l]:+.2f}" for s in range(len(sublayers))] for l in range(len(values))]
    return (f"<p class='note'>{result.n_tokens} tokens per cell; hover for quartiles.</p>" +
            heatmap_html(values, result.labels, list(sublayers), cell_text=text, tooltips=tips,
                         cmap="RdBu", vmin=-max(abs(result.mean).max().item(), 1e-6),
                         vmax=max(abs(result.mean).max().item(), 1e-6),
                         caption="mean cos(update, -dL/dh)"))


def alignment_png(result: "AlignmentResult", path) -> Path:
    """Mean cosine with the 10-90 % band, per sublayer."""
    sublayers = result.sublayers
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    lo, hi = result.quantile(0.1), result.quantile(0.9)
    x = np.arange(result.mean.shape[1])
    for s, name in enumerate(sublayers):
        ax.plot(x, result.mean[s].numpy(), marker=".", label=name)
        ax.fill_between(x, lo[s].numpy(), hi[s].numpy(), alpha=0.15)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("block")
    ax.set_ylabel("cos(update, -dL/dh)")
    ax.set_title(f"Iterative inference: update vs negative gradient ({result.n_tokens} tokens,"
                 " 10-90 % band)", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def causal_html(result: "CausalResult") -> str:
    """Per lens and layer: mean lens / model effect and their Spearman correlation."""
    parts = []
    for lens in result.effects:
        means = result.means(lens)
        rho_kl, rho_drop = result.correlation(lens, "kl"), result.correlation(lens, "drop")
        header = ["layer", "lens KL", "model KL", "Spearman (KL)", "lens drop p(top)",
                  "model drop p(top)", "Spearman (drop)"]
        rows = [[label, f"{float(means['lens_kl'][i]):.3f}", f"{float(means['model_kl'][i]):.3f}",
                 f"{float(rho_kl[i]):.2f}", f"{float(means['lens_drop'][i]):.3f}",
                 f"{float(means['model_drop'][i]):.3f}", f"{float(rho_drop[i]):.2f}"]
                for i, label in enumerate(result.labels)]
        parts += [f"<h3>{esc(lens)} ({esc(result.intervention)})</h3>", table_html(header, rows)]
    return "\n".join(parts)


def causal_png(result: "CausalResult", path) -> Path:
    """Mean lens and model KL, and their correlation, per layer."""
    kls, rhos = {}, {}
    for lens in result.effects:
        means = result.means(lens)
        kls[f"{lens}: lens"] = means["lens_kl"].tolist()
        kls[f"{lens}: model"] = means["model_kl"].tolist()
        rhos[lens] = result.correlation(lens, "kl").tolist()
    return lines_png(path, result.labels, {"mean KL(before || after), nats": kls,
                                           "Spearman(lens KL, model KL) over tokens": rhos},
                     f"Causal fidelity ({result.intervention})", log=["mean KL(before || after), "
                                                                      "nats"])


def lre_causality_html(result: "LRECausalityResult") -> str:
    """The table and the validation sweep."""
    header, rows = result.table()
    sweep = [[m] + [f"{v:.2f}" for v in values] for m, values in result.validation.items()]
    return "\n".join([
        f"<p class='note'>{esc(result.relation)}, layer {result.layer}: rank chosen on "
        f"{result.n_validation_pairs} validation pairs, scored on {result.n_test_pairs} test "
        "pairs.</p>", table_html(header, rows),
        "<h3>validation causality by rank of the inverse</h3>",
        table_html(["operator"] + [str(r) for r in result.ranks], sweep)])


def lre_causality_png(result: "LRECausalityResult", path) -> Path:
    """Validation causality against the rank, one line per operator."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for method, values in result.validation.items():
        ax.plot(result.ranks, values, marker="o", label=method)
    ax.axvline(result.chosen_rank, color="k", lw=0.6, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank of the pseudoinverse")
    ax.set_ylabel("causality (validation pairs)")
    ax.set_title(f"{result.relation}, layer {result.layer}", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


__all__ = ["lines_png", "metric_lines_png"]
