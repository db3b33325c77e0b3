"""Tuned lens on the embedded model: train on the spot, evaluate, show it beside the logit lens.

    python demos/tuned_lens_demo.py [--out FOLDER] [--budget 90]

Text: Debian's python3.11-doc reST sources when installed (``apt-get install
python3.11-doc``; not bundled), otherwise the docstrings of this Python's own standard
library (read at run time, nothing bundled; sampling the model's own text also works, via
``token_split(generate=...)``, but takes minutes on a CPU). The fast
recipe (least-squares warm start + short KL refinement) trains within ``--budget`` seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tl_lenses as tll  # noqa: E402
from tl_lenses.data import token_split  # noqa: E402
from tl_lenses.lenses.tuned.eval import evaluate_lenses  # noqa: E402
from tl_lenses.lenses.tuned.io import save_tuned_lens  # noqa: E402
from tl_lenses.lenses.tuned.lens import TunedLens  # noqa: E402
from tl_lenses.lenses.tuned.train import train_tuned_lens  # noqa: E402
from tl_lenses.readout.view import write_report  # noqa: E402
from tl_lenses.viz.html import esc  # noqa: E402

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
PROMPT = "The tuned lens translates each layer into the basis of the final layer, so"


def training_text(model):
    """(split, description): python docs if present, else the model's own samples."""
    if DOCS.is_dir():
        split = token_split(model, paths=[DOCS], seq_len=128, max_tokens=300_000, held_out=0.05)
        return split, f"python3.11-doc reST ({split.n_tokens} tokens)"
    texts = stdlib_docstrings()
    split = token_split(model, texts=texts, seq_len=128, max_tokens=300_000, held_out=0.05)
    return split, f"docstrings of Python's standard library ({split.n_tokens} tokens)"


def stdlib_docstrings() -> list[str]:
    """English prose every Python installation carries: its standard library's docstrings."""
    import importlib
    import inspect

    modules = ["argparse", "asyncio", "collections", "concurrent.futures", "csv", "dataclasses",
               "datetime", "decimal", "email", "enum", "fractions", "functools", "http.client",
               "inspect", "itertools", "json", "logging", "os", "pathlib", "pickle", "random",
               "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess",
               "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse",
               "uuid", "zipfile"]
    texts = []
    for name in modules:
        module = importlib.import_module(name)
        members = [module] + [obj for _, obj in inspect.getmembers(module)
                              if inspect.isclass(obj) or inspect.isfunction(obj)]
        texts += [doc for obj in members if (doc := inspect.getdoc(obj)) and len(doc) > 200]
    return list(dict.fromkeys(texts))


def run(model, out_dir: Path, context: dict | None = None, budget: float = 90.0):
    """Train, evaluate, draw; returns (title, summary html). Puts the lens in ``context``."""
    out_dir = Path(out_dir)
    split, source = training_text(model)
    print(f"[demo] tuned lens: training on {source}", file=sys.stderr, flush=True)
    tuned = train_tuned_lens(model, split.train, time_budget=budget, progress=True)
    bias = train_tuned_lens(model, split.train, TunedLens.for_model(model, kind="bias"),
                            time_budget=budget / 3, progress=True)
    save_tuned_lens(tuned.lens, out_dir / "tuned_lens")
    # Full-vocabulary KL for 31 rows x 3 lenses costs ~10 GFLOP per token: 512 held-out
    # tokens keep the evaluation to seconds (the benchmark uses the same size).
    held_out = split.held_out[: max(1, 512 // split.held_out.shape[1])]
    evaluation = evaluate_lenses(model, held_out, {
        "logit": tll.LogitLens(), "bias-only": bias.lens, "tuned": tuned.lens})
    evaluation.save_png(out_dir / "tuned_lens_kl.png")
    (out_dir / "tuned_lens_eval.html").write_text(evaluation.to_html(), encoding="utf-8")
    logit = tll.logit_lens(model, PROMPT)
    tuned_view = tll.apply_lens(model, PROMPT, tuned.lens)
    page = write_report(out_dir / "tuned_lens.html", [logit, tuned_view],
                        title=f"Logit lens (left) and tuned lens (right): {PROMPT!r}")
    if context is not None:
        context["tuned_lens"] = tuned.lens
    means = {name: metrics.mean_kl for name, metrics in evaluation.metrics.items()}
    kls = ", ".join(f"{name} {value:.2f}" for name, value in means.items())
    summary = (f"<p>Trained in {tuned.seconds:.0f} s on {esc(source)} (fast recipe: "
               f"least-squares warm start + {tuned.steps} KL steps). Mean held-out "
               f"KL(final || lens) over layers on {held_out.numel()} tokens, nats: {kls}. "
               f"<a href='{page.name}'>Grids side by side</a>, "
               f"<a href='tuned_lens_eval.html'>per-layer table</a>, "
               f"<a href='tuned_lens_kl.png'>KL per layer (PNG)</a>; the lens is saved in "
               f"<code>tuned_lens/</code>.</p>")
    return "Tuned lens", summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--budget", type=float, default=90.0, help="training seconds")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    run(tll.load_default_model(), Path(args.out), budget=args.budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
