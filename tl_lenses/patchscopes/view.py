"""Views of patchscope results: layer x layer heatmaps and tables of generations (HTML, PNG).

Rows are source layers l (last at the top, as in the lens grids), columns target layers l*.
A cell shows the decoded top-1 token (or a number) and is coloured by a value: the top-1
probability of a sweep, or the success rate of attribute extraction.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tl_lenses.viz.html import esc, heatmap_html, show_token, table_html
from tl_lenses.viz.static import heatmap_png

if TYPE_CHECKING:
    from tl_lenses.patchscopes.presets import AttributeResult, GenerationTable, TokenIdentityResult
    from tl_lenses.patchscopes.sweep import SweepResult


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

    tips = [[None if c is None else f"l={rows[i]} -> l*={cols[j]}: {texts[c]!r} "
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


def sweep_png(sweep: SweepResult, path, *, source_index: int = 0,
              source_position: int | None = None, title: str = "Patchscope") -> Path:
    """The layer x layer heatmap of a sweep as a PNG; returns ``Path(path)``."""
    values, text, _, rows, cols = sweep_cells(sweep, source_index, source_position)
    return heatmap_png(path, values, rows, cols, cell_text=text, title=title, vmin=0.0,
                       vmax=1.0, colorbar_label="top-1 probability")


def attribute_html(result: AttributeResult, title: str = "Attribute extraction") -> str:
    """Success rate per (l, l*), last source layer on top."""
    values = result.success.flip(0).tolist()
    return f"<h2>{esc(title)}</h2>" + heatmap_html(
        values, [f"l={l}" for l in result.source_layers[::-1]],
        [f"l*={l}" for l in result.target_layers], vmin=0.0, vmax=1.0,
        cell_text=[[f"{v:.2f}" for v in row] for row in values],
        caption="share of samples whose object appears in the generation;")


def attribute_png(result: AttributeResult, path, title: str = "Attribute extraction") -> Path:
    """Attribute-extraction success per (l, l*) as a PNG; returns ``Path(path)``."""
    values = result.success.flip(0).tolist()
    return heatmap_png(path, values, [f"l={l}" for l in result.source_layers[::-1]],
                       [f"l*={l}" for l in result.target_layers], title=title, vmin=0.0,
                       vmax=1.0, colorbar_label="success rate",
                       cell_text=[[f"{v:.2f}" for v in row] for row in values])


def generation_table_html(table: GenerationTable, title: str | None = None) -> str:
    """The paper's Diana table: one generation per source layer."""
    heading = title or (f"Entity description of {show_token(table.source_token)} in "
                        f"{table.source_prompt!r}")
    note = f"<p class='note'>target prompt: {esc(table.target_prompt)}</p>"
    return (f"<h2>{esc(heading)}</h2>{note}"
            + table_html(["layer", "generation"], table.rows()))


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
    """Token-identity matches per layer and position as a PNG; returns ``Path(path)``."""
    decoded = result.decode(result.patched_top1)
    match = (result.patched_top1 == result.final_top1).float().flip(0).tolist()
    return heatmap_png(path, match, [f"l={l}" for l in result.layers[::-1]],
                       [show_token(t) for t in result.str_tokens], title=title, vmin=0.0,
                       vmax=1.0, cell_text=[[show_token(t) for t in r] for r in decoded[::-1]],
                       colorbar_label="matches final top-1")
