"""The lecture notes' open questions on the embedded model: six analyses, one page each.

    python demos/analysis_demo.py [--out FOLDER] [--size demo|docs] [--only drift,causal]

``--size demo`` (the main demo's) keeps each analysis to about a minute on 2 CPU cores by
shrinking the *data* (rows, steps, layers measured), never the method; ``--size docs``
is the larger run behind ``docs/analysis.md`` (4-15 min a page, ~45 min in all on 2
cores). Text: as the tuned lens demo (python3.11-doc when installed, else the standard
library's docstrings). The tuned lens comes from the tuned-lens demo when it ran first
(``context["tuned_lens"]``), else it is trained here with the fast recipe.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from tl_lenses import analysis  # noqa: E402
from tl_lenses.lenses.logit import LogitLens  # noqa: E402
from tl_lenses.viz.html import esc, page  # noqa: E402

SIZES = {
    # rows of --seq-len tokens; steps of batch_size rows; every k-th layer trained/measured
    "demo": dict(seq_len=32, rows=4, steps=12, batch_size=2, every=6, lr=3e-3, tuned_budget=30,
                 relation_n=8, ranks=(4, 16, 64, 256)),
    # docs: 8x the demo's tokens per step and held-out, 3x its steps, every 5th layer: about
    # 45 min on 2 cores (the objectives page is two thirds of it)
    "docs": dict(seq_len=64, rows=16, steps=40, batch_size=2, every=5, lr=3e-3,
                 tuned_budget=120, relation_n=8, ranks=(2, 4, 8, 16, 32, 64, 128, 256)),
}
LRE_LAYER = 6
USES_TUNED = {"current_next", "drift", "causal", "causal_resample", "retrained"}


def _tuned(model, split, context, budget, folder: Path):
    from tl_lenses.lenses.tuned.io import load_tuned_lens, save_tuned_lens
    from tl_lenses.lenses.tuned.train import train_tuned_lens

    if context and "tuned_lens" in context:
        return context["tuned_lens"]
    if folder.is_dir():
        return load_tuned_lens(folder, model)
    # float32, one row per KL step: on a CPU without bf16 units one default step (8 rows,
    # bf16) outlasts the whole budget, which is only checked between steps.
    lens = train_tuned_lens(model, split.train, time_budget=budget, bf16=False,
                            batch_size=1).lens
    save_tuned_lens(lens, folder, training={"time_budget": budget})
    return lens


class _Lazy:
    """The tuned lens, trained (or loaded) on first use: LRE causality does not need it."""

    def __init__(self, make):
        self._make, self._value = make, None

    def __call__(self):
        if self._value is None:
            self._value = self._make()
        return self._value


def run(model, out_dir: Path, context: dict | None = None, size: str = "demo",
        only: list[str] | None = None):
    """Run the six analyses (or ``only`` those named); write one page (and PNG) each.

    Returns (title, summary html).
    """
    from tuned_lens_demo import training_text

    out_dir, cfg = Path(out_dir), SIZES[size]
    split, source = training_text(model)
    split = type(split)(train=_repack(split.train, cfg["seq_len"]),
                        held_out=_repack(split.held_out, cfg["seq_len"]))
    held = split.held_out[: cfg["rows"]]
    tuned = _Lazy(lambda: _tuned(model, split, context, cfg["tuned_budget"],
                                 out_dir / "tuned_lens"))
    lenses = lambda: {"logit lens": LogitLens(), "tuned lens": tuned()}  # noqa: E731
    lre = _Lazy(lambda: _lre(model, context, cfg["relation_n"], out_dir))
    n = model.cfg.n_layers
    layers = list(range(0, n, cfg["every"]))
    fit = dict(steps=cfg["steps"], lr=cfg["lr"], batch_size=cfg["batch_size"])
    jobs = {
        # "rare" = outside the text's `common` most frequent ids: few ids on little text
        "current_next": lambda: analysis.current_vs_next(model, held, lenses(), common=20,
                                                         batch_size=cfg["batch_size"]),
        "drift": lambda: analysis.residual_drift(model, held, tuned=tuned(), max_offset=2,
                                                 batch_size=cfg["batch_size"]),
        "alignment": lambda: analysis.gradient_alignment(model, held, batch_size=2),
        "causal": lambda: analysis.causal_fidelity(model, held, lenses(), layers=layers,
                                                   batch_size=cfg["batch_size"]),
        "causal_resample": lambda: analysis.causal_fidelity(
            model, held, lenses(), intervention="resample", rank=8, layers=layers,
            batch_size=cfg["batch_size"]),
        "lre_causality": lambda: analysis.lre_causality(
            model, _relation(), LRE_LAYER, n=cfg["relation_n"], ranks=cfg["ranks"],
            lre=lre(), progress=True),
        "retrained": lambda: analysis.retrained_decoders(model, split.train, held,
                                                         layers=layers + [n], tuned=tuned(),
                                                         **fit),
        "objectives": lambda: analysis.compare_objectives(model, split.train, held,
                                                          layers=layers, **fit),
    }
    unknown = sorted(set(only or ()) - set(jobs))
    if unknown:
        raise ValueError(f"only: unknown analyses {unknown}; have {sorted(jobs)}")
    numbers_file = out_dir / "analysis_numbers.json"
    numbers = json.loads(numbers_file.read_text()) if only and numbers_file.exists() else {}
    links = []
    for name, job in jobs.items():
        if only and name not in only:
            continue
        print(f"[demo] analysis: {name}", file=sys.stderr, flush=True)
        if name in USES_TUNED:
            tuned()     # trained once, outside the analysis's own time
        if name == "lre_causality":
            lre()       # the main demo's comes from the attribute-lens page
        started = time.perf_counter()
        result = job()
        seconds = time.perf_counter() - started
        png = result.save_png(out_dir / f"analysis_{name}.png")
        html = out_dir / f"analysis_{name}.html"
        html.write_text(page(f"Analysis: {name}", f"<p class='note'>{esc(source)}; "
                             f"{seconds:.0f} s.</p><img src='{png.name}' "
                             "style='max-width:100%'>", result.to_html()), encoding="utf-8")
        links.append(f"<a href='{html.name}'>{name}</a> ({seconds:.0f} s)")
        numbers[name] = {**_numbers(name, result), "seconds": round(seconds, 1), "size": size}
        numbers_file.write_text(json.dumps(numbers, indent=1))
    summary = (f"<p>On {esc(source)}, {held.numel()} held-out tokens per analysis: "
               + ", ".join(links) + ".</p>" + _headline(numbers))
    return "Analyses: the lecture notes' open questions", summary


def _relation():
    from tl_lenses.lenses.attribute.relations import get_relation

    return get_relation("country_capital")


def _lre(model, context, n, out_dir: Path):
    """The country -> capital LRE at LRE_LAYER from n subjects (split seed 0, as the page's).

    From the attribute-lens demo when it ran first, else from ``OUT/lre_*`` saved by an
    earlier run of this page, else estimated here and saved there.
    """
    from tl_lenses.lenses.attribute.io import load_lre, save_lre
    from tl_lenses.lenses.attribute.lre import estimate_lre

    lre = (context or {}).get("lre_country_capital")
    if lre is not None and lre.layer == LRE_LAYER and len(lre.train) == n:
        return lre
    folder = out_dir / f"lre_country_capital_{LRE_LAYER}_n{n}"
    if folder.is_dir():
        return load_lre(folder, model)
    relation = _relation()
    lre = estimate_lre(model, relation, LRE_LAYER, train=relation.split(n, seed=0)[0],
                       progress=True)
    save_lre(lre, folder, model)
    return lre


def _repack(rows, seq_len):
    """Rows cut to ``seq_len`` tokens (the demo's text is packed at 128)."""
    usable = rows.shape[1] // seq_len * seq_len
    return rows[:, :usable].reshape(-1, seq_len)


def _numbers(name, result) -> dict:
    """The figures docs/analysis.md quotes, as plain lists."""
    rnd = lambda t: [round(float(x), 4) for x in t]  # noqa: E731
    if name == "objectives":
        return {"labels": result.labels, **{lens: {k: rnd(v) for k, v in m.items()}
                                            for lens, m in result.metrics.items()},
                "summary": result.summary()[1]}
    if name == "retrained":
        return {"labels": result.labels, **{lens: {k: rnd(m[k]) for k in ("ce", "top1_accuracy")}
                                            for lens, m in result.metrics.items()}}
    if name == "current_next":
        return {"labels": result.labels, "counts": result.counts,
                **{lens: {k: rnd(v) for k, v in s.items()} for lens, s in result.stats.items()}}
    if name == "drift":
        return {"labels": result.labels, "cka": [rnd(r) for r in result.cka],
                "covariance": [rnd(r) for r in result.covariance],
                "transfer_kl": [rnd(r) for r in result.transfer_kl],
                "logit_kl": rnd(result.logit_kl)}
    if name == "alignment":
        return {"mean": [rnd(r) for r in result.mean], "q10": [rnd(r) for r in
                                                               result.quantile(0.1)],
                "q90": [rnd(r) for r in result.quantile(0.9)], "n_tokens": result.n_tokens}
    if name.startswith("causal"):
        return {"labels": result.labels, **{lens: {**{k: rnd(v) for k, v in
                                                       result.means(lens).items()},
                                                    "spearman_kl": rnd(result.correlation(lens))}
                                            for lens in result.effects}}
    return {"chosen_rank": result.chosen_rank, "test": result.test, "full": result.full,
            "faithfulness": result.faithfulness, "validation": result.validation,
            "ranks": result.ranks, "pairs": [result.n_validation_pairs, result.n_test_pairs]}


def _headline(numbers) -> str:
    if "lre_causality" not in numbers:
        return ""
    lre = numbers["lre_causality"]
    return (f"<p>Attribute lens causality (country &rarr; capital, layer {LRE_LAYER}) at the "
            f"rank chosen on validation pairs ({lre['chosen_rank']}): "
            + ", ".join(f"{m} {v:.2f}" for m, v in lre["test"].items())
            + "; at full rank: " + ", ".join(f"{m} {v:.2f}" for m, v in lre["full"].items())
            + ".</p>")


def main() -> int:
    import tl_lenses as tll

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="analysis_out")
    parser.add_argument("--size", default="demo", choices=sorted(SIZES))
    parser.add_argument("--only", default=None,
                        help="comma-separated analyses (e.g. drift,lre_causality); default all")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(message)s")
    logging.getLogger("tl_lenses").setLevel(logging.INFO)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    only = args.only.split(",") if args.only else None
    title, summary = run(tll.load_default_model(), Path(args.out), size=args.size, only=only)
    (Path(args.out) / "index.html").write_text(page(title, summary), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
