"""The ``tl-lenses`` command line: collects each method's subcommand (its ``cli.py``)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Each module defines add_parser(subparsers), which registers a subcommand whose
# ``func(args)`` does the work.
COMMANDS = [
    "tl_lenses.lenses.cli",
    "tl_lenses.lenses.tuned.cli",
    "tl_lenses.attribution.cli",
    "tl_lenses.patchscopes.cli",
    "tl_lenses.lenses.attribute.cli",
    "tl_lenses.analysis.cli",
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
    """Run one subcommand; returns the exit status (2 for bad input, with the reason)."""
    args = build_parser().parse_args(argv)
    # Progress messages go to the "tl_lenses" logger; the command line shows them on stderr.
    logging.basicConfig(format="[tl_lenses] %(message)s", level=logging.INFO)
    try:
        return args.func(args) or 0
    # OSError: a --model name that cannot be downloaded; NotImplementedError: a method or
    # backend that refuses the model's architecture.
    except (ValueError, OSError, ModuleNotFoundError, NotImplementedError) as error:
        print(f"tl-lenses {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
