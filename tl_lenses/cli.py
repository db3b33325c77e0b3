"""The ``tl-lenses`` command line: collects each method's subcommand (its ``cli.py``)."""

from __future__ import annotations

import argparse
import importlib
import logging
import re
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
        message = as_flags(str(error), getattr(args, "flag_names", {}))
        print(f"tl-lenses {args.command}: error: {message}", file=sys.stderr)
        return 2


def as_flags(message: str, flag_names: dict[str, str]) -> str:
    """``message`` with the Python argument names a subcommand maps replaced by its flags.

    The library names its arguments (``source_layers must be ...``); on the command line the
    user typed ``--layers``. Only a name that starts a clause (the message, or after ``; ``,
    ``: ``, ``, `` or ``(``) and is followed by ``must``, ``is``, ``has``, ``=`` or a quoted
    value is replaced, so prose that happens to hold the word is left alone.

    Args:
        message: the error's text.
        flag_names: Python argument name -> the flag (or positional) that sets it.

    Returns:
        The message with each mapped name replaced.
    """
    for name, flag in flag_names.items():
        message = re.sub(rf"(^|[;:,] |\()({re.escape(name)})(?=( must| is | has |=| '))",
                         lambda m, flag=flag: m.group(1) + flag, message)
    return message


if __name__ == "__main__":
    sys.exit(main())
