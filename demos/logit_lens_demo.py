"""Logit lens on the embedded model: the seed's two grids for a few prompts."""

from __future__ import annotations

from pathlib import Path

import tl_lenses as tll
from tl_lenses.readout.view import settle_layer, write_report
from tl_lenses.viz.html import esc

PROMPTS = [
    "The capital of France is Paris, and the capital of Germany is",
    # The seed's "copy rare token" figure: a rare word seen once is predicted again later.
    "Scientists study plasma. Other times, when people say plasma, they mean",
]


def run(model, out_dir: Path, context: dict | None = None) -> tuple[str, str]:
    """Write one report (+ PNGs) per prompt; return (title, summary html) for the index."""
    items = []
    for i, prompt in enumerate(PROMPTS):
        result = tll.logit_lens(model, prompt, k=5, target="final", progress=True)
        page = write_report(out_dir / f"logit_lens_{i}.html", [result],
                            title=f"Logit lens: {prompt!r}",
                            intro="Rows: the residual stream before each block (0 pre is the "
                                  "embedding) up to the final resid_post. Hover a cell for its "
                                  "top-5, entropy and KL to the final layer.")
        result.save_png(out_dir / f"logit_lens_{i}.png")
        result.save_png(out_dir / f"logit_lens_{i}_rank.png", statistic="rank", text="value")
        final = result.top_tokens()[-1][-1][0]
        settles = int(settle_layer(result)[-1])
        items.append(f"<li><a href='{page.name}'>{esc(prompt)}</a> &rarr; {esc(repr(final))}, "
                     f"the lens's top-1 from row {esc(result.labels[settles])} on "
                     f"(<a href='logit_lens_{i}.png'>PNG</a>, "
                     f"<a href='logit_lens_{i}_rank.png'>rank PNG</a>)</li>")
    return "Logit lens", "<ul>" + "".join(items) + "</ul>"
