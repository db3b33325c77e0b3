"""The ``tl-lenses`` command line: one subcommand per method, on the embedded model."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines add_parser(subparsers), which registers a subcommand whose
# ``func(args)`` does the work.
COMMANDS = [
    "tl_lenses.commands.logit_lens",
    "tl_lenses.commands.tuned",
    "tl_lenses.commands.dla",
    "tl_lenses.commands.patchscope",
    "tl_lenses.commands.attribute_lens",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tl-lenses", description="Lenses on the hidden states of TransformerLens models."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:
        print(f"tl-lenses {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
