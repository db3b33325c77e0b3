"""``tl-lenses logit-lens "text" --out report.html``: the logit lens grids of one prompt."""

from __future__ import annotations

import argparse
import logging

from tl_lenses.model_args import add_model_arguments
from tl_lenses.readout.view import STATISTICS

logger = logging.getLogger("tl_lenses")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "logit-lens", help="decode every layer and position of a prompt (HTML + PNG)"
    )
    parser.add_argument("text", help="the prompt")
    parser.add_argument("--out", default="logit_lens.html", help="HTML report path")
    parser.add_argument("--png", default=None, help="also write the grid as a PNG")
    parser.add_argument("--statistic", default=None,
                        help=f"colour of the PNG grid (needs --png; default prob): "
                             f"{', '.join(STATISTICS)}")
    parser.add_argument("--k", type=int, default=5, help="top-k tokens per cell")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--target", default=None,
                        help="whose rank and probability each cell reports: 'final' (the "
                             "final layer's top-1, default), 'next' (the true next token) or "
                             "text that is one token")
    target.add_argument("--target-id", type=int, default=None,
                        help="the same, as a token id")
    parser.add_argument("--incl-mid", action="store_true", help="also read resid_mid")
    add_model_arguments(parser)
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                        help="statistics from the C kernel (default: where it builds)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from tl_lenses.lenses.logit import logit_lens
    from tl_lenses.model_args import model_from_args
    from tl_lenses.readout.view import write_report

    # Checked before the model loads: a typo should not cost a model load.
    statistic = "prob" if args.statistic is None else args.statistic
    if statistic not in STATISTICS:
        raise ValueError(f"--statistic must be one of {STATISTICS}, got {statistic!r}")
    if args.statistic is not None and args.png is None:
        raise ValueError("--statistic colours the PNG grid; give --png too (the HTML report "
                         "has its own probability, rank and KL grids)")
    target = args.target_id if args.target_id is not None else (args.target or "final")
    model = model_from_args(args)
    result = logit_lens(model, args.text, k=args.k, target=target,
                        incl_mid=args.incl_mid, progress=True, fused=args.fused)
    path = write_report(args.out, [result], title=f"Logit lens: {args.text!r}")
    print(f"wrote {path}")
    if args.png:
        text = "value" if statistic == "rank" else "top1"
        result.save_png(args.png, statistic=statistic, text=text)
        print(f"wrote {args.png}")
    return 0
