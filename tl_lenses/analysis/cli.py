"""``tl-lenses analyze {objectives,retrained,current-next,drift,alignment,causal} ...``.

Each analysis reads the user's text (``--text`` files, folders or globs; or ``--generate N``
rows sampled from the model), packs it into ``--seq-len`` rows with a seeded train /
held-out split, runs on ``--rows`` held-out rows (and trains on the train rows where the
analysis trains), and writes an HTML report (``--out``) and a PNG (``--png``).
"""

from __future__ import annotations

import argparse
import logging
import math

from tl_lenses.model_args import add_model_arguments

logger = logging.getLogger("tl_lenses")
ANALYSES = ("objectives", "retrained", "current-next", "drift", "alignment", "causal")


def add_parser(subparsers) -> None:
    """Register ``analyze`` and its six sub-subcommands."""
    analyze = subparsers.add_parser("analyze", help="the lecture notes' open questions")
    inner = analyze.add_subparsers(dest="analysis", required=True)
    for name in ANALYSES:
        parser = inner.add_parser(name, help=RUNNERS[name].__doc__.splitlines()[0])
        _common(parser)
        if name in ("objectives", "retrained"):
            parser.add_argument("--steps", type=_positive, default=100, help="Adam steps per lens")
            parser.add_argument("--lr", type=_positive_float, default=1e-3)
            parser.add_argument("--layers", type=_int_list, default=None,
                                help="comma-separated layers")
        if name in ("current-next", "drift", "causal"):
            parser.add_argument("--tuned", default=None, help="a tuned lens folder to add")
        if name == "objectives":
            parser.add_argument("--objectives", default="kl,mse_logits,mse_resid,cosine")
            parser.add_argument("--kinds", default="bias,affine")
        if name == "causal":
            parser.add_argument("--intervention", default="top-token",
                                choices=["top-token", "resample"])
            parser.add_argument("--rank", type=_positive, default=None,
                                help="resampled subspace (--intervention resample; default 8)")
            parser.add_argument("--layers", type=_int_list, default=None,
                                help="comma-separated blocks")
            parser.add_argument("--relation", default=None,
                                help="also score an LRE of this relation (a starter name such "
                                     "as country_capital, or a relation .json file) at a "
                                     "held-out rank")
            parser.add_argument("--lre-layer", type=int, default=None,
                                help="the LRE's layer (with --relation; default 6, or the "
                                     "middle layer of a model with 6 layers or fewer)")
            parser.add_argument("--ranks", type=_int_list, default=None,
                                help="comma-separated candidate ranks of the inverse (with "
                                     "--relation; default 2,4,...,256 up to d_model)")
            parser.add_argument("--own-answers", action="store_true",
                                help="score the LRE against the model's own answers (for "
                                     "models that do not know the relation)")
        # The library's argument names, as the user typed them (tl_lenses.cli.as_flags).
        parser.set_defaults(func=RUNNERS[name], flag_names={
            "batch_size": "--batch-size", "layers": "--layers", "steps": "--steps",
            "lr": "--lr", "rank": "--rank", "relation": "--relation", "layer": "--lre-layer"})


def _common(parser) -> None:
    parser.add_argument("--text", nargs="+", default=None, help="text files, folders or globs")
    parser.add_argument("--generate", type=_positive, default=None,
                        help="instead of --text: sample this many rows from the model")
    parser.add_argument("--seq-len", type=_positive, default=64)
    parser.add_argument("--max-tokens", type=_positive, default=200_000, help="cap on the corpus")
    parser.add_argument("--rows", type=_positive, default=16, help="held-out rows analysed")
    parser.add_argument("--batch-size", type=_positive, default=8)
    parser.add_argument("--seed", type=int, default=0)
    add_model_arguments(parser)
    parser.add_argument("--out", default="analysis.html", help="HTML report path")
    parser.add_argument("--png", default=None, help="also write the figure as a PNG")


def _model(args):
    from tl_lenses.model_args import model_from_args

    return model_from_args(args)


def _split(model, args):
    from tl_lenses.data import token_split

    if (args.text is None) == (args.generate is None):
        raise ValueError("pass --text PATH... or --generate N (one of them)")
    if args.rows < 1:
        raise ValueError(f"--rows must be >= 1, got {args.rows}")
    split = token_split(model, paths=args.text, generate=args.generate, seq_len=args.seq_len,
                        held_out=0.1, seed=args.seed, max_tokens=args.max_tokens)
    return split.train, split.held_out[: args.rows]


def _positive(text: str) -> int:
    """An argparse type: an int >= 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    """An argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    """An argparse type: comma-separated ints (layer indices are checked by the analysis)."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _lenses(model, args) -> dict:
    from tl_lenses.lenses.logit import LogitLens

    lenses = {"logit lens": LogitLens()}
    if getattr(args, "tuned", None):
        from tl_lenses.lenses.tuned.io import load_tuned_lens

        lenses["tuned lens"] = load_tuned_lens(args.tuned, model)
    return lenses


def _write(result, args, title: str, extra: str = "") -> int:
    from tl_lenses.viz.html import page

    with open(args.out, "w", encoding="utf-8") as file:
        file.write(page(title, result.to_html() + extra))
    print(f"wrote {args.out}")
    if args.png:
        print(f"wrote {result.save_png(args.png)}")
    return 0


def run_objectives(args) -> int:
    """Why KL? lenses trained with KL, MSE (logits, residual) and cosine objectives."""
    from tl_lenses.analysis.objectives import compare_objectives

    model = _model(args)
    train, held = _split(model, args)
    result = compare_objectives(model, train, held, objectives=args.objectives.split(","),
                                kinds=args.kinds.split(","), layers=args.layers,
                                steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                seed=args.seed)
    for row in result.summary()[1]:
        print("  ".join(row))
    return _write(result, args, "Lens objectives")


def run_retrained(args) -> int:
    """A decoder per layer retrained on the next token, vs the tuned and logit lenses."""
    from tl_lenses.analysis.retrained import retrained_decoders

    model = _model(args)
    train, held = _split(model, args)
    result = retrained_decoders(model, train, held, layers=args.layers, steps=args.steps,
                                lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    return _write(result, args, "Retrained decoders")


def run_current_next(args) -> int:
    """Rank and probability of the input token and of the next token per layer."""
    from tl_lenses.analysis.current_next import current_vs_next

    model = _model(args)
    _, held = _split(model, args)
    result = current_vs_next(model, held, _lenses(model, args), batch_size=args.batch_size)
    return _write(result, args, "Current token vs next token")


def run_drift(args) -> int:
    """CKA and covariance similarity between layers, and translator transfer."""
    from tl_lenses.analysis.drift import residual_drift

    model = _model(args)
    _, held = _split(model, args)
    tuned = _lenses(model, args).get("tuned lens")
    result = residual_drift(model, held, tuned=tuned, batch_size=args.batch_size)
    return _write(result, args, "Representational drift")


def run_alignment(args) -> int:
    """Cosine of each sublayer's update with the negative loss gradient (iterative inference)."""
    from tl_lenses.analysis.alignment import gradient_alignment

    model = _model(args)
    _, held = _split(model, args)
    result = gradient_alignment(model, held, batch_size=args.batch_size)
    return _write(result, args, "Iterative inference")


def run_causal(args) -> int:
    """Causal fidelity of the lenses; optionally an LRE's causality at a held-out rank."""
    from tl_lenses.analysis.causal import causal_fidelity

    # Options the chosen run would ignore are refused, not dropped.
    if args.rank is not None and args.intervention != "resample":
        raise ValueError("--rank sets the resampled subspace: it needs --intervention resample")
    for flag, value in (("--lre-layer", args.lre_layer), ("--ranks", args.ranks),
                        ("--own-answers", args.own_answers or None)):
        if value is not None and not args.relation:
            raise ValueError(f"{flag} is a setting of the LRE: it needs --relation")
    relation = _relation(args)
    model = _model(args)
    layer, ranks = _lre_settings(model, args) if relation is not None else (None, None)
    _, held = _split(model, args)
    # Everything is computed before anything is written: a failing LRE leaves no report.
    lre = None
    if relation is not None:
        from tl_lenses.analysis.causal_lre import lre_causality

        lre = lre_causality(model, relation, layer, ranks=ranks, seed=args.seed,
                            own_answers=args.own_answers)
    result = causal_fidelity(model, held, _lenses(model, args), intervention=args.intervention,
                             rank=8 if args.rank is None else args.rank,
                             layers=args.layers,
                             batch_size=args.batch_size, seed=args.seed)
    extra = ""
    if lre is not None:
        for row in lre.table()[1]:
            print("  ".join(str(x) for x in row))
        extra = "<h2>LRE causality</h2>" + lre.to_html()
    return _write(result, args, "Causal fidelity", extra)


def _relation(args):
    if not args.relation:
        return None
    from tl_lenses.lenses.attribute.relations import get_relation

    return get_relation(args.relation, argument="--relation")


def _lre_settings(model, args) -> tuple[int, list[int]]:
    """``(layer, ranks)`` of the LRE: checked against the model, named by their flags."""
    from tl_lenses.analysis.causal_lre import check_ranks
    from tl_lenses.hooks import resolve_layer

    n_layers = model.cfg.n_layers
    # Layer 6 suits SmolLM2's 30 layers; a small model gets its middle layer instead.
    layer = (6 if n_layers > 6 else n_layers // 2) if args.lre_layer is None else args.lre_layer
    layer = resolve_layer(model, layer, argument="--lre-layer", negative=False)[0]
    try:
        ranks = check_ranks(args.ranks, model.cfg.d_model)
    except ValueError as error:
        raise ValueError(f"--{error}") from None
    return layer, ranks


RUNNERS = {"objectives": run_objectives, "retrained": run_retrained,
           "current-next": run_current_next, "drift": run_drift, "alignment": run_alignment,
           "causal": run_causal}
