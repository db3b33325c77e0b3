"""Views of patchscope results: layer x layer heatmaps and tables of generations (HTML, figures).

Rows are source layers l (last at the top, as in the lens grids), columns target layers l*.
A cell shows the decoded top-1 token (or a number) and is coloured by a value: the top-1
probability of a sweep, or the success rate of attribute extraction. Figures are PNG, SVG
or PDF by the path's suffix, with token text drawn literally.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tl_lenses.viz.html import esc, heatmap_html, show_text, show_token, table_html
from tl_lenses.viz.static import heatmap_png

if TYPE_CHECKING:  # views import result types for type checkers only (no import cycle)
    from tl_lenses.patchscopes.core import PatchscopeResult
    from tl_lenses.patchscopes.presets import (
        AttributeResult,
        GenerationTable,
        TokenIdentityResult,
    )
    from tl_lenses.patchscopes.sweep import SweepResult


def patchscope_html(result: PatchscopeResult, k: int = 5) -> str:
    """One patched run: where h was read and written, the top-k next tokens, the generation."""
    probs = result.logits.float().softmax(-1).topk(k)
    tops = [f"{show_token(t)} ({p:.3f})" for t, p in
            zip(result.top_tokens(k), probs.values.tolist())]
    rows = [["source", f"l={result.source_layer}, i={result.source_position}",
             result.source_hook],
            ["target", f"l*={result.target_layer}, i*={result.target_position}",
             result.target_hook],
            ["top next tokens", ", ".join(tops), ""]]
    if result.generated_ids.numel():
        rows.append(["generation", show_text(result.generated_text), ""])
    return "<h2>Patchscope</h2>" + table_html(["", "", "hook"], rows)


def sweep_cells(sweep: SweepResult, source_index: int = 0, source_position: int | None = None):
    """(values, cell_text, tooltips, row_labels, col_labels) for a sweep, last layer on top."""
    tokens = [show_token(t) for t in sweep.top_tokens()]
    probs = sweep.top_probs[:, 0].tolist()
    texts = sweep.generations() if sweep.generated_ids.shape[1] else tokens
    grid, rows, cols = sweep.layer_grid(list(range(len(sweep))), source_index=source_index,
                                        source_position=source_position)
    grid, rows = grid[::-1], rows[::-1]

    def pick(seq, empty):
        return [[empty if c is None else seq[c] for c in row] for row in grid]

    tips = [[None if c is None else f"l={rows[i]} -> l*={cols[j]}: {show_token(texts[c])} "
             f"(p top-1 = {probs[c]:.3f})" for j, c in enumerate(r)] for i, r in enumerate(grid)]
    return (pick(probs, float("nan")), pick(tokens, ""), [[t or "" for t in r] for r in tips],
            [f"l={r}" for r in rows], [f"l*={c}" for c in cols])


def sweep_html(sweep: SweepResult, *, source_index: int = 0, source_position: int | None = None,
               title: str = "Patchscope: source layer x target layer") -> str:
    """The layer x layer heatmap of a sweep as an HTML section (top-1 token in each cell)."""
    values, text, tips, rows, cols = sweep_cells(sweep, source_index, source_position)
    return f"<h2>{esc(title)}</h2>" + heatmap_html(
        values, rows, cols, cell_text=text, tooltips=tips, vmin=0.0, vmax=1.0,
        caption="probability of the top-1 token;")


def _sweep_panels(sweep: SweepResult) -> list[tuple[int, int]]:
    """Each (source_index, source_position) the sweep covers, in order."""
    pairs = zip(sweep.source_index.tolist(), sweep.source_position.tolist())
    return list(dict.fromkeys(pairs))


def sweep_view(sweep: SweepResult, full: bool = False, *, source_index: int | None = None,
               source_position: int | None = None) -> str:
    """Inline: the first (source, position) grid and a note; ``full``: every grid."""
    panels = _sweep_panels(sweep)
    if source_index is not None:
        panels = [p for p in panels if p[0] == source_index
                  and (source_position is None or p[1] == source_position)]
    shown = panels if full else panels[:1]
    note = (f"<p class='note'>{len(sweep)} cases; {len(panels)} source (prompt, position) "
            f"grid(s)"
            f"{'' if full or len(panels) < 2 else '; <code>sweep.show()</code> shows all'}"
            f".</p>")
    return note + "".join(
        sweep_html(sweep, source_index=i, source_position=p,
                   title=f"source prompt {i}, position {p}: l x l*") for i, p in shown)


def sweep_png(sweep: SweepResult, path, *, source_index: int = 0,
              source_position: int | None = None, title: str = "Patchscope") -> Path:
    """The sweep's layer x layer grid as a figure (PNG, SVG or PDF by suffix)."""
    values, text, _, rows, cols = sweep_cells(sweep, source_index, source_position)
    return heatmap_png(path, values, rows, cols, cell_text=text, title=show_text(title),
                       vmin=0.0, vmax=1.0, colorbar_label="top-1 probability",
                       max_cols=max(16, len(cols)))


def attribute_html(result: AttributeResult, title: str = "Attribute extraction") -> str:
    """Success rate per (l, l*), last source layer on top."""
    values = result.success.flip(0).tolist()
    return f"<h2>{esc(title)}</h2>" + heatmap_html(
        values, [f"l={l}" for l in result.source_layers[::-1]],
        [f"l*={l}" for l in result.target_layers], vmin=0.0, vmax=1.0,
        cell_text=[[f"{v:.2f}" for v in row] for row in values],
        caption="share of samples whose object appears in the generation;")


def attribute_png(result: AttributeResult, path, title: str = "Attribute extraction") -> Path:
    """Success rate per (l, l*) as a figure (PNG, SVG or PDF by suffix)."""
    values = result.success.flip(0).tolist()
    return heatmap_png(path, values, [f"l={l}" for l in result.source_layers[::-1]],
                       [f"l*={l}" for l in result.target_layers], title=show_text(title),
                       vmin=0.0, vmax=1.0, colorbar_label="success rate (share of samples)",
                       cell_text=[[f"{v:.2f}" for v in row] for row in values],
                       max_cols=max(16, len(result.target_layers)))


def generation_table_html(table: GenerationTable, title: str | None = None) -> str:
    """The paper's Diana table: one generation per source layer."""
    heading = title or (f"Entity description of {show_token(table.source_token)} in "
                        f"{show_text(table.source_prompt)!r}")
    note = f"<p class='note'>target prompt: {esc(show_text(table.target_prompt))}</p>"
    rows = [[layer, show_text(text)] for layer, text in table.rows()]
    return f"<h2>{esc(heading)}</h2>{note}" + table_html(["layer", "generation"], rows)


def token_identity_html(result: TokenIdentityResult, title: str = "Token identity") -> str:
    """Per-layer Precision@1 / surprisal table, and the patched top-1 per layer x position."""
    header = ["layer", "patchscope P@1", "patchscope surprisal"]
    for name in result.lens_top1:
        header += [f"{name} P@1", f"{name} surprisal"]
    decoded = result.decode(result.patched_top1)
    match = (result.patched_top1 == result.final_top1).float().flip(0).tolist()
    grid = heatmap_html(
        match, [f"l={l}" for l in result.layers[::-1]],
        [show_token(t) for t in result.str_tokens],
        cell_text=[[show_token(t) for t in row] for row in decoded[::-1]],
        tooltips=[[f"surprisal {s:.2f} nats" for s in row]
                  for row in result.surprisal.flip(0).tolist()],
        vmin=0.0, vmax=1.0, caption="1 = patched top-1 equals the model's final top-1;")
    final = ", ".join(show_token(t) for t in result.decode(result.final_top1))
    return (f"<h2>{esc(title)}</h2><p class='note'>final top-1 per position: {esc(final)}</p>"
            + table_html(header, result.summary_rows())
            + "<h2>Patched top-1 per source layer and position</h2>" + grid)


def token_identity_png(result: TokenIdentityResult, path, title: str = "Token identity") -> Path:
    """Patched top-1 per layer x position, coloured by agreement (PNG, SVG or PDF)."""
    decoded = result.decode(result.patched_top1)
    match = (result.patched_top1 == result.final_top1).float().flip(0).tolist()
    return heatmap_png(path, match, [f"l={l}" for l in result.layers[::-1]],
                       [show_token(t) for t in result.str_tokens], title=show_text(title),
                       vmin=0.0, vmax=1.0, cell_text=[[show_token(t) for t in r]
                                                      for r in decoded[::-1]],
                       colorbar_label="patched top-1 = final top-1 (1 yes, 0 no)")
