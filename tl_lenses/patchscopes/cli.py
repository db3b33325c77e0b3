"""``tl-lenses patchscope PRESET "prompt" --out report.html``: patchscopes on the embedded model.

Presets: ``identity`` (token identity, Precision@1 / surprisal vs the logit lens),
``describe`` (entity description per layer), ``sweep`` (every (l, l*) pair into a target
prompt, heatmap of the decoded tokens), ``cot`` (the Figure 4 multi-hop patch; the prompt
argument is the outer phrase, ``--inner`` the inner one).
"""

from __future__ import annotations

import logging

from tl_lenses.model_args import add_model_arguments

PRESETS = ("identity", "describe", "sweep", "cot")
COT_INNER = "the company that created Visual Basic Script"
# The options each preset reads; giving another one is an error, never silently ignored.
USES = {
    "identity": {"target", "placeholder", "layers", "png"},
    "describe": {"target", "placeholder", "position", "layers", "max_new_tokens"},
    "sweep": {"target", "placeholder", "position", "layers", "target_layers",
              "max_new_tokens", "png"},
    "cot": {"inner", "layers", "target_layers", "max_new_tokens", "png"},
}
OPTIONS = ("target", "placeholder", "inner", "position", "layers", "target_layers",
           "max_new_tokens", "png")
logger = logging.getLogger("tl_lenses")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "patchscope", help="patch a hidden state into a target prompt and decode it (HTML+PNG)"
    )
    parser.add_argument("preset", choices=PRESETS)
    parser.add_argument("text", help="the source prompt (for cot: the outer phrase)")
    parser.add_argument("--target", default=None,
                        help="target prompt (default: the preset's; must hold the placeholder)")
    parser.add_argument("--placeholder", default=None,
                        help="the target prompt's placeholder ('?' for identity/sweep, 'x' "
                             "for describe); its last token is the patched position")
    parser.add_argument("--inner", default=None,
                        help=f"cot: the inner phrase (default {COT_INNER!r})")
    parser.add_argument("--position", type=int, default=None,
                        help="describe/sweep: source position (default -1)")
    parser.add_argument("--layers", default=None,
                        help="source layers as 'a:b' or 'a,b,c' (0 = embedding, 30 = final)")
    parser.add_argument("--target-layers", default=None, help="sweep/cot: target layers")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens to generate (describe: 20, sweep: 0, cot: 5)")
    parser.add_argument("--out", default="patchscope.html", help="HTML report path")
    parser.add_argument("--png", default=None, help="also write the heatmap as a PNG")
    add_model_arguments(parser)
    # The library's argument names, as the user typed them (tl_lenses.cli.as_flags).
    parser.set_defaults(func=run, flag_names={
        "source_layers": "--layers", "layers": "--layers", "target_layers": "--target-layers",
        "max_new_tokens": "--max-new-tokens", "source_positions": "--position",
        "source_position": "--position", "position": "--position", "target_prompt": "--target",
        "target_prompts": "--target", "placeholder": "--placeholder", "inner": "--inner",
        "outer": "the text", "prompt": "the text", "source_prompt": "the text",
        "source_prompts": "the text"})


def parse_layers(text: str | None, argument: str = "--layers") -> list[int] | None:
    """``'3:7'`` -> [3, 4, 5, 6], ``'1,5,9'`` -> [1, 5, 9], None -> None (all layers)."""
    if text is None:
        return None
    try:
        if ":" in text:
            start, stop = text.split(":")
            return list(range(int(start), int(stop)))
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{argument} must look like '3:7' or '1,5,9', got {text!r}") from None


def run(args) -> int:
    from tl_lenses.model_args import model_from_args
    from tl_lenses.viz.html import page

    unused = [f"--{name.replace('_', '-')}" for name in OPTIONS
              if getattr(args, name) is not None and name not in USES[args.preset]]
    if unused:
        raise ValueError(f"the {args.preset} preset does not use {', '.join(unused)}")
    layers = parse_layers(args.layers)
    target_layers = parse_layers(args.target_layers, "--target-layers")
    model = model_from_args(args)
    logger.info(f"running the {args.preset} patchscope ...")
    section, title = RUNNERS[args.preset](model, args, layers, target_layers)
    with open(args.out, "w", encoding="utf-8") as file:
        file.write(page(title, section))
    print(f"wrote {args.out}")
    return 0


def _identity(model, args, layers, _):
    from tl_lenses.patchscopes.presets import IDENTITY_PROMPT, token_identity
    from tl_lenses.patchscopes.view import token_identity_html, token_identity_png

    result = token_identity(model, args.text, layers=layers,
                            target_prompt=args.target or IDENTITY_PROMPT,
                            placeholder=args.placeholder or "?")
    for row in result.summary_rows():
        print("  layer {:>2}: patchscope P@1 {} surprisal {} | logit lens P@1 {} surprisal {}"
              .format(*row[:5]))
    if args.png:
        print(f"wrote {token_identity_png(result, args.png)}")
    return token_identity_html(result), f"Token identity patchscope: {args.text!r}"


def _describe(model, args, layers, _):
    from tl_lenses.patchscopes.presets import DESCRIPTION_PROMPT, entity_description
    from tl_lenses.patchscopes.view import generation_table_html

    position = -1 if args.position is None else args.position
    table = entity_description(model, args.text, position=position, layers=layers,
                               target_prompt=args.target or DESCRIPTION_PROMPT,
                               placeholder=args.placeholder or "x",
                               max_new_tokens=_or(args.max_new_tokens, 20))
    for layer, text in table.rows():
        print(f"  layer {layer:>2}: {text!r}")
    return generation_table_html(table), f"Entity description: {args.text!r}"


def _sweep(model, args, layers, target_layers):
    from tl_lenses.patchscopes.presets import IDENTITY_PROMPT, placeholder_position
    from tl_lenses.patchscopes.sweep import patchscope_sweep
    from tl_lenses.patchscopes.view import sweep_html, sweep_png

    target = args.target or IDENTITY_PROMPT
    position = placeholder_position(model, target, args.placeholder or "?")
    sweep = patchscope_sweep(model, args.text, target, source_layers=layers,
                             source_positions=-1 if args.position is None else args.position,
                             target_layers=target_layers,
                             target_position=position,
                             max_new_tokens=_or(args.max_new_tokens, 0))
    if args.png:
        print(f"wrote {sweep_png(sweep, args.png)}")
    return sweep_html(sweep), f"Patchscope sweep: {args.text!r} into {target!r}"


def _cot(model, args, layers, target_layers):
    from tl_lenses.patchscopes.presets import chain_of_thought
    from tl_lenses.patchscopes.view import sweep_html, sweep_png

    inner = _or(args.inner, COT_INNER)
    sweep = chain_of_thought(model, args.text, inner, source_layers=layers,
                             target_layers=target_layers,
                             max_new_tokens=_or(args.max_new_tokens, 5))
    if args.png:
        print(f"wrote {sweep_png(sweep, args.png, title='Chain-of-thought patchscope')}")
    return (sweep_html(sweep, title="Chain-of-thought: inner phrase's last token into the "
                       "outer phrase's last token"),
            f"Chain-of-thought patchscope: {args.text!r} + {inner!r}")


def _or(value, default):
    """``value`` unless the option was not given (0 is a value, not a missing option)."""
    return default if value is None else value


RUNNERS = {"identity": _identity, "describe": _describe, "sweep": _sweep, "cot": _cot}
