"""Indirect object identification on the embedded model: which heads push " Mary" over " John"?

    python demos/dla_ioi.py [--out FOLDER]

Runs SmolLM2-135M-Instruct once on the IOI prompt, attributes the logit difference
" Mary" - " John" at the last token to every head, MLP and embedding (and checks that the
parts add up to the model's own difference), traces the top heads back to the earlier
components and source tokens that feed their values, and writes an HTML report plus two PNGs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tl_lenses.attribution.core import dla, needed_hooks  # noqa: E402
from tl_lenses.attribution.paths import head_path_dla, path_hooks  # noqa: E402
from tl_lenses.attribution.view import write_report  # noqa: E402
from tl_lenses.hooks import run_cache  # noqa: E402
from tl_lenses.inputs import to_tokens  # noqa: E402
from tl_lenses.models import load_default_model  # noqa: E402

PROMPT = "When Mary and John went to the store, John gave a drink to"
DIRECTION = (" Mary", " John")


def run(model, out_dir: Path, context: dict | None = None) -> tuple[str, str]:
    """Write the IOI report into ``out_dir``; return (title, summary html) for the index."""
    tokens = to_tokens(model, PROMPT)
    names = {*needed_hooks(model), *path_hooks(model, model.cfg.n_layers - 1)}
    cache = run_cache(model, tokens, sorted(names))

    result = dla(model, tokens, DIRECTION, cache=cache)
    model_diff, parts = float(result.logits[0, 0, 0]), float(result.total()[0, 0, 0])
    print(f"logit difference {result.directions[0]}: model {model_diff:+.4f}, "
          f"sum of parts {parts:+.4f}")
    print("\ntop heads by |attribution|:")
    for label, value in result.heads().top(10).items():
        print(f"  {label:>6} {value:+.4f}")
    print("\ntop components (heads, MLPs, embed, biases):")
    for label, value in result.top(10).items():
        print(f"  {label:>8} {value:+.4f}")

    top_heads = list(result.heads().top(3).labels)
    paths = head_path_dla(model, tokens, DIRECTION, heads=top_heads, cache=cache)
    print(f"\ntop paths into {', '.join(top_heads)} (source @ source position -> head):")
    for label, value in paths.top(10).items():
        pos = int(label.rsplit(" ", 1)[1])
        print(f"  {label:<28} {value:+.4f}   token {paths.str_tokens[0][pos]!r}")

    by_position = dla(model, tokens, DIRECTION, positions=None, cache=cache)
    out = write_report(Path(out_dir) / "dla_ioi.html", result, by_position=by_position,
                       paths=paths, title=f"DLA: {PROMPT!r}, {result.directions[0]}")
    stem = Path(out).with_suffix("")
    result.save_png(f"{stem}_heads.png", "heads")
    result.save_png(f"{stem}_top.png", "top", k=20)
    heads = ", ".join(f"{label} {value:+.2f}" for label, value in result.heads().top(5).items())
    summary = (f"<p><a href='{Path(out).name}'>{PROMPT}</a>: logit difference "
               f"{result.directions[0]} = {model_diff:+.4f} (model) = {parts:+.4f} (sum of "
               f"parts). Top heads: {heads}.</p>")
    return "Direct logit attribution (IOI)", summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder for dla_ioi.html and its PNGs")
    args = parser.parse_args(argv)
    print("[tl_lenses] loading SmolLM2-135M-Instruct ...", file=sys.stderr, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    run(load_default_model(), Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
