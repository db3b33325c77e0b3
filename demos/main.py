"""The main demo: every tl_lenses method on the embedded SmolLM2-135M-Instruct.

Writes one HTML page per method into ``--out`` and an ``index.html`` that links them.
Each demo module in this folder has ``run(model, out_dir, context) -> (title, summary_html)``;
``context`` carries results between demos (the trained tuned lens).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import tl_lenses as tll  # noqa: E402
from tl_lenses.viz.html import page  # noqa: E402

# Order matters: the tuned lens trained here joins the patchscope token-identity table.
DEMOS = ["logit_lens_demo", "tuned_lens_demo", "dla_ioi", "patchscope_demo",
         "attribute_lens_demo", "analysis_demo"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out", help="folder for the report")
    parser.add_argument("--only", default=None, help="comma-separated demo modules to run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print("[demo] loading SmolLM2-135M-Instruct", file=sys.stderr, flush=True)
    model = tll.load_default_model()
    sections, context = [], {}
    for name in (args.only.split(",") if args.only else DEMOS):
        print(f"[demo] {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        title, summary = importlib.import_module(name).run(model, out, context)
        sections.append(f"<h2>{title}</h2>{summary}"
                        f"<p class='note'>{time.perf_counter() - t0:.0f} s</p>")
    index = out / "index.html"
    index.write_text(page("tl_lenses on SmolLM2-135M-Instruct", *sections), encoding="utf-8")
    print(f"[demo] wrote {index.resolve()} in {time.perf_counter() - started:.0f} s "
          "(open it in a browser)")


if __name__ == "__main__":
    main()
