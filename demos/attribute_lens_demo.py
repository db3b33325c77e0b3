"""Attribute lens demo on the embedded SmolLM2-135M-Instruct.

    python demos/attribute_lens_demo.py [--relations country_capital ...] [--layers 4 8 12]
                                        [--n 8] [--out attribute_lens_demo.html]

1. For each relation and layer: estimate the LRE from n subjects, then score faithfulness
   and causality on the held-out subjects the model answers correctly, next to the logit
   lens of s and a least-squares map fitted on the same n pairs (table + one plot per
   relation).
2. The attribute lens (country -> capital) on a prompt that mentions a country but not its
   capital, beside the logit lens of the same prompt.

Everything goes into one self-contained HTML file (plots inlined as PNG data).
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "My cousin moved to Japan last year, and she works at a bank in the"


def png_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img src='data:image/png;base64,{data}' style='max-width:100%'>"


def beta_rank_sweep(model, lre, relation, betas, ranks):
    """Faithfulness/causality over beta (full rank), then causality over rank (beta = 1)."""
    from tl_lenses.lenses.attribute.metrics import collect_states, score

    held_out = [x for x in relation.samples if x not in lre.train]
    train = collect_states(model, lre, lre.train, [lre.layer])
    test = collect_states(model, lre, held_out, [lre.layer])
    rows = []
    for beta in betas:
        rows += score(model, lre.with_beta(beta), train, test, baselines=False)
    for rank in ranks:
        rows += score(model, lre, train, test, rank, baselines=False)
    for row in rows:
        print(f"  capital, beta {row.beta:g}, rank {row.rank}: faithfulness "
              f"{row.faithfulness:.2f}, causality {row.causality:.2f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--relations", nargs="+", default=None,
                        help="starter relation names (default: all)")
    parser.add_argument("--layers", nargs="+", type=int, default=[6, 14])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--lens-layer", type=int, default=6,
                        help="layer of the country -> capital LRE used for the lens")
    parser.add_argument("--betas", nargs="+", type=float, default=[0.5, 1.0, 2.0, 4.0],
                        help="beta sweep for country -> capital at --lens-layer")
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 32, 64, 128, 256],
                        help="rank sweep (causality) for country -> capital at --lens-layer")
    parser.add_argument("--out", default="attribute_lens_demo.html")
    args = parser.parse_args()

    from tl_lenses.models import load_default_model

    report(load_default_model(), Path(args.out), args)


def run(model, out_dir: Path, context: dict | None = None) -> tuple[str, str]:
    """The main demo's short version: country -> capital at layer 6 only (one LRE, n=8)."""
    args = argparse.Namespace(relations=["country_capital"], layers=[6], n=8, lens_layer=6,
                              betas=[1.0], ranks=[32, 128, 576])
    path = Path(out_dir) / "attribute_lens.html"
    rows, tops = report(model, path, args, context)
    lines = "".join(f"<li>{row.method}, layer {row.layer}, beta {row.beta:g}, rank "
                    f"{row.rank or 'full'}: faithfulness "
                    f"{row.faithfulness:.2f}, causality {row.causality:.2f}</li>"
                    for row in rows)
    summary = (f"<p><a href='{path.name}'>country &rarr; capital LRE (n=8, layer 6)</a>; "
               f"held-out subjects the model answers correctly:</p><ul>{lines}</ul>"
               f"<p>Attribute lens on {PROMPT!r}: at ' Japan' the rows read "
               f"{', '.join(repr(t) for t in tops[::5])} (every 5th row).</p>")
    return "Attribute lens (linear relational embeddings)", summary


def report(model, out: Path, args, context: dict | None = None):
    """Estimate, score and draw; write ``out``. Returns (score rows, lens top-1 at Japan).

    Puts the country -> capital LRE in ``context["lre_country_capital"]`` (the analyses'
    LRE-causality page reuses it instead of estimating it again).
    """
    from tl_lenses.lenses.attribute.lens import attribute_lens
    from tl_lenses.lenses.attribute.lre import estimate_lre
    from tl_lenses.lenses.attribute.metrics import sweep
    from tl_lenses.lenses.attribute.relations import multi_token_objects, starter_relations
    from tl_lenses.lenses.attribute.view import attribute_lens_page, scores_table_html, sweep_png
    from tl_lenses.lenses.logit import logit_lens
    from tl_lenses.readout.view import side_by_side
    from tl_lenses.viz.html import esc, page

    relations = starter_relations()
    names = args.relations or list(relations)
    rows, plots, notes, lres = [], [], [], {}
    tmp = Path(tempfile.mkdtemp())
    for name in names:
        relation = relations[name]
        start = time.perf_counter()
        result = sweep(model, relation, args.layers, n=args.n, progress=True)
        rows += result.rows
        lres.update({(name, lre.layer): lre for lre in result.lres})
        print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        for row in result.rows:
            print(f"  {row.method:>14} layer {row.layer:>2}: faithfulness "
                  f"{row.faithfulness:.2f}, causality {row.causality:.2f} "
                  f"({row.n_test} held-out correct, {row.n_pairs} pairs)", flush=True)
        plot = sweep_png(tmp / f"{name}.png", result.rows, x="layer", title=relation.name)
        plots.append(f"<h3>{esc(relation.name)}</h3>{png_tag(plot)}")
        multi = multi_token_objects(model, relation)
        if multi:
            notes.append(f"{esc(relation.name)}: {len(multi)} objects are several tokens and "
                         f"are scored by their first token ({esc(', '.join(multi[:8]))}"
                         f"{', ...' if len(multi) > 8 else ''})")

    capital = lres.get(("country_capital", args.lens_layer)) or estimate_lre(
        model, relations["country_capital"], args.lens_layer, n=args.n)
    if context is not None:
        context["lre_country_capital"] = capital
    knobs = beta_rank_sweep(model, capital, relations["country_capital"], args.betas,
                            args.ranks)
    by_beta = knobs[:len(args.betas)]                  # full rank, each beta
    by_rank = knobs[len(args.betas):]                  # beta = 1, each rank
    knob_plots = [png_tag(sweep_png(tmp / f"capital_{x}.png", subset, x=x,
                                    title=f"country -> capital, layer {capital.layer}"))
                  for x, subset in (("beta", by_beta), ("rank", by_rank))]
    ours = attribute_lens(model, PROMPT, capital)
    lens_html = attribute_lens_page(ours, logit_lens(model, PROMPT), capital, prompt=PROMPT)
    body = lens_html.split("<body>", 1)[1].rsplit("</body>", 1)[0]
    sections = [
        "<p class='note'>Faithfulness: share of held-out subjects (that the model itself "
        "answers correctly) whose decoded LRE(s) has the object's first token on top. "
        "Causality: share of subject pairs whose answer flips to the other object after "
        "adding pinv(W)(LRE(s') - LRE(s)) at layer l on the subject's last token. "
        "identity = logit lens of s (edit: patch s'), least squares = affine map fitted "
        f"on the same n={args.n} (s, z) pairs.</p>",
        scores_table_html(rows),
        "<p class='note'>" + "<br>".join(notes) + "</p>",
        side_by_side(*plots[:2]), side_by_side(*plots[2:4]), side_by_side(*plots[4:]),
        f"<h2>beta and rank: country -> capital at layer {capital.layer}</h2>",
        scores_table_html(knobs), side_by_side(*knob_plots),
        f"<h2>attribute lens on {esc(PROMPT)!s}</h2>", body,
    ]
    out.write_text(page("Attribute lens (SmolLM2-135M-Instruct)", *sections), encoding="utf-8")
    japan = ours.str_tokens[0].index(" Japan")
    tops = ours.top_tokens(0)
    at_japan = [tops[layer][japan][0] for layer in range(len(tops))]
    print("attribute lens at ' Japan', layers 0..30:", at_japan)
    print(f"wrote {out}")
    return rows + knobs, at_japan


if __name__ == "__main__":
    main()
