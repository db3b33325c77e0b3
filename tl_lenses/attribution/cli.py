"""``tl-lenses dla "prompt" --answer " Mary" --wrong " John" --out report.html``."""

from __future__ import annotations

import logging

from tl_lenses.model_args import add_model_arguments

logger = logging.getLogger("tl_lenses")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "dla", help="direct logit attribution to heads, MLPs, neurons and head paths (HTML)"
    )
    parser.add_argument("text", help="the prompt")
    parser.add_argument("--answer", required=True, help="the token to explain (one token)")
    parser.add_argument("--wrong", default=None,
                        help="attribute the logit difference answer - wrong (one token)")
    parser.add_argument("--position", type=int, default=-1, help="token position (default -1)")
    parser.add_argument("--out", default="dla.html", help="HTML report path")
    parser.add_argument("--png", default=None, help="also write the layer x head heatmap PNG")
    parser.add_argument("--bars-png", default=None, help="also write the top-k bar chart PNG")
    parser.add_argument("--k", type=int, default=20, help="components in the top-k views")
    parser.add_argument("--neurons", action="store_true",
                        help="split MLPs into single neurons (L7N1203)")
    parser.add_argument("--paths", type=int, default=3,
                        help="trace source -> head paths for this many top heads (0: none)")
    add_model_arguments(parser)
    # The library's argument names, as the user typed them (tl_lenses.cli.as_flags).
    parser.set_defaults(func=run, flag_names={
        "answer": "--answer", "directions": "--answer", "wrong": "--wrong",
        "positions": "--position", "position": "--position", "k": "--k", "input": "the text"})


def run(args) -> int:
    from tl_lenses.attribution.core import dla, needed_hooks
    from tl_lenses.attribution.paths import head_path_dla, path_hooks
    from tl_lenses.attribution.view import write_report
    from tl_lenses.hooks import run_cache
    from tl_lenses.inputs import to_tokens
    from tl_lenses.model_args import model_from_args

    if args.k < 1 or args.paths < 0:
        raise ValueError("--k must be >= 1 and --paths >= 0")
    model = model_from_args(args)
    direction = (args.answer, args.wrong) if args.wrong is not None else args.answer
    tokens = to_tokens(model, args.text, argument="text")
    names = {*needed_hooks(model, heads=True, neurons=args.neurons),
             *needed_hooks(model, heads=True, neurons=False),
             *path_hooks(model, model.cfg.n_layers - 1)}
    cache = run_cache(model, tokens, sorted(names))
    result = dla(model, tokens, direction, positions=args.position, neurons=args.neurons,
                 cache=cache)
    by_position = dla(model, tokens, direction, positions=None, neurons=args.neurons,
                      cache=cache)
    paths = None
    if args.paths:
        top = result.heads().top(args.paths)
        paths = head_path_dla(model, tokens, direction, position=args.position,
                              heads=list(top.labels), cache=cache)
    path = write_report(args.out, result, by_position=by_position, paths=paths, k=args.k,
                        title=f"Direct logit attribution: {args.text!r}")
    print(f"wrote {path}")
    print(f"{result.directions[0]}: model {float(result.logits[0, -1, 0]):+.4f} = sum of parts "
          f"{float(result.total()[0, -1, 0]):+.4f}")
    for label, value in result.top(min(args.k, 10)).items():
        print(f"  {label:>12} {value:+.4f}")
    if args.png:
        print(f"wrote {result.save_png(args.png, 'heads')}")
    if args.bars_png:
        print(f"wrote {result.save_png(args.bars_png, 'top', k=args.k)}")
    return 0
