"""The model arguments every ``tl-lenses`` subcommand takes: --model, --backend, --device, --dtype.

One helper adds them (:func:`add_model_arguments`) and one loads what they name
(:func:`model_from_args`), so each method's ``cli.py`` reads any model the same way.
"""

from __future__ import annotations

import argparse
import logging

from tl_lenses._compat import DEFAULT_BACKEND

logger = logging.getLogger("tl_lenses")
# Tiny random models (byte vocabulary) for tests and quick tries of the command line.
TINY = {"tiny-gpt2": "gpt2", "tiny-llama": "llama-gqa"}
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# The names tl_lenses.models.DTYPES accepts (torch is imported only when a model loads).
DTYPE_NAMES = ("bfloat16", "float16", "float32", "float64")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--model``, ``--backend``, ``--device`` and ``--dtype`` to a subcommand's parser.

    Args:
        parser: the subcommand's parser (changed in place).
    """
    parser.add_argument(
        "--model", default=None, metavar="NAME_OR_PATH",
        help=f"a Hugging Face model folder, a .gguf file, a TransformerLens model name, or "
             f"{', '.join(TINY)} (tiny random models); default: the embedded {DEFAULT_MODEL}")
    parser.add_argument("--backend", default=DEFAULT_BACKEND, choices=["hooked", "bridge"],
                        help="HookedTransformer or TransformerBridge (default: "
                             f"{DEFAULT_BACKEND}, this TransformerLens' default)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                        help="weight dtype (default: float32)")


def model_from_args(args: argparse.Namespace):
    """The model named by :func:`add_model_arguments`' arguments.

    Args:
        args: parsed arguments with ``model``, ``backend``, ``device`` and ``dtype``.

    Returns:
        A HookedTransformer or a compatibility-mode TransformerBridge.

    Raises:
        ValueError, FileNotFoundError, OSError: as :func:`tl_lenses.models.load_model`.
    """
    from tl_lenses.models import load_model

    if args.model in TINY:
        from tl_lenses.models import DTYPES
        from tl_lenses.tiny import tiny_bridge, tiny_hooked

        # Built on --device in --dtype like any other model (never silently float32 on cpu).
        build = tiny_hooked if args.backend == "hooked" else tiny_bridge
        return build(TINY[args.model], device=args.device, dtype=DTYPES[args.dtype])
    logger.info("loading %s (%s) ...", args.model or DEFAULT_MODEL, args.backend)
    return load_model(args.model, backend=args.backend, device=args.device, dtype=args.dtype)


__all__ = ["add_model_arguments", "model_from_args"]
