"""Subcommands of the ``tl-lenses`` command line (see tl_lenses/cli.py)."""
