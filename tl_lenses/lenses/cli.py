"""``tl-lenses logit-lens "text" --out report.html``: the logit lens grids of one prompt."""

from __future__ import annotations

import argparse
import logging

from tl_lenses.model_args import add_model_arguments

logger = logging.getLogger("tl_lenses")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "logit-lens", help="decode every layer and position of a prompt (HTML + PNG)"
    )
    parser.add_argument("text", help="the prompt")
    parser.add_argument("--out", default="logit_lens.html", help="HTML report path")
    parser.add_argument("--png", default=None, help="also write the grid as a PNG")
    parser.add_argument("--statistic", default="prob",
                        help="colour of the PNG grid: logit, prob, rank, entropy, kl")
    parser.add_argument("--k", type=int, default=5, help="top-k tokens per cell")
    parser.add_argument("--target", default="final",
                        help="'final' (final top-1), 'next' (true next token) or one token")
    parser.add_argument("--incl-mid", action="store_true", help="also read resid_mid")
    add_model_arguments(parser)
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                        help="statistics from the C kernel (default: where it builds)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from tl_lenses.lenses.logit import logit_lens
    from tl_lenses.model_args import model_from_args
    from tl_lenses.readout.result import STATISTICS
    from tl_lenses.readout.view import write_report

    if args.statistic not in STATISTICS:
        raise ValueError(f"--statistic must be one of {STATISTICS}, got {args.statistic!r}")
    model = model_from_args(args)
    result = logit_lens(model, args.text, k=args.k, target=args.target,
                        incl_mid=args.incl_mid, progress=True, fused=args.fused)
    path = write_report(args.out, [result], title=f"Logit lens: {args.text!r}")
    print(f"wrote {path}")
    if args.png:
        text = "value" if args.statistic == "rank" else "top1"
        result.save_png(args.png, statistic=args.statistic, text=text)
        print(f"wrote {args.png}")
    return 0
