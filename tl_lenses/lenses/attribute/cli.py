"""``tl-lenses attribute-lens "text" --relation country_capital``: one LRE on every layer."""

from __future__ import annotations

import logging

from tl_lenses.model_args import add_model_arguments

logger = logging.getLogger("tl_lenses")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "attribute-lens",
        help="estimate a linear relational embedding and read a prompt through it (HTML + PNG)",
    )
    parser.add_argument("text", help="the prompt to read (e.g. one that mentions a country)")
    parser.add_argument("--relation", default="country_capital",
                        help="a starter relation name or a relation .json file (LRE format)")
    parser.add_argument("--layer", type=int, default=8,
                        help="layer of s: blocks.{layer}.hook_resid_pre (0 = embeddings)")
    parser.add_argument("--n", type=int, default=8, help="training subjects for the Jacobian")
    parser.add_argument("--beta", type=float, default=1.0, help="scale on W s")
    parser.add_argument("--rank", type=int, default=None, help="truncate W to this rank")
    parser.add_argument("--seed", type=int, default=0, help="which subjects train the LRE")
    parser.add_argument("--k", type=int, default=5, help="top-k tokens per cell")
    parser.add_argument("--metrics", action="store_true",
                        help="also score faithfulness and causality against the baselines")
    parser.add_argument("--out", default="attribute_lens.html", help="HTML report path")
    parser.add_argument("--png", default=None,
                        help="also write the attribute-lens grid (and *_logit.png) as PNG")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from tl_lenses.lenses.attribute.lens import attribute_lens
    from tl_lenses.lenses.attribute.lre import estimate_lre
    from tl_lenses.lenses.attribute.metrics import collect_states, score
    from tl_lenses.lenses.attribute.relations import get_relation
    from tl_lenses.lenses.attribute.view import attribute_lens_page, scores_table_html
    from tl_lenses.lenses.logit import logit_lens
    from tl_lenses.model_args import model_from_args

    relation = get_relation(args.relation)
    model = model_from_args(args)
    lre = estimate_lre(model, relation, args.layer, n=args.n, beta=args.beta, rank=args.rank,
                       seed=args.seed, progress=True)
    ours = attribute_lens(model, args.text, lre, k=args.k)
    html = attribute_lens_page(ours, logit_lens(model, args.text, k=args.k), lre,
                               prompt=args.text)
    if args.metrics:
        logger.info("scoring held-out subjects ...")
        held_out = [x for x in relation.samples if x not in lre.train]
        rows = score(model, lre, collect_states(model, lre, lre.train, [lre.layer]),
                     collect_states(model, lre, held_out, [lre.layer]), rank=args.rank)
        html = html.replace("</body>", "<h2>faithfulness and causality</h2>"
                            + scores_table_html(rows) + "</body>")
        for row in rows:
            print(f"{row.method:>14}: faithfulness {row.faithfulness:.2f}, causality "
                  f"{row.causality:.2f} ({row.n_test} held-out subjects the model "
                  "gets right)")
    Path(args.out).write_text(html, encoding="utf-8")
    print(f"wrote {args.out}")
    if args.png:
        ours.save_png(args.png, "prob", title=f"attribute lens: {relation.name}")
        print(f"wrote {args.png}")
    return 0
