"""Tuned lens: reference recipe vs tl_lenses' fast recipe at equal wall-clock budgets.

One run per recipe, as long as the largest budget; the lens is snapshotted at each budget
(the last step that ended within it, or the untrained lens if none did; evaluation time is
not counted) and every snapshot is evaluated on the same held-out rows: mean KL(final ||
lens) per layer, float32. The logit lens and a bias-only lens (fast recipe, smallest budget)
are the baselines. Also reported: the first snapshot time at which the fast recipe's mean KL
is at or below the reference recipe's final one.

    python benchmarks/bench_tuned_lens.py --budgets 1,2,4 \
        --text /usr/share/doc/python3.11/html/_sources/ --png docs/tuned_lens_kl.png

The corpus is not bundled; Debian's python3.11-doc package has ~12 MB of reST sources.

Third contender, ``library``: the ``tuned-lens`` library itself (PyPI tuned-lens==0.2.0),
trained by its own training loop (``tuned_lens_library_driver.py``: SGD Nesterov, its lr
scaling, linear schedule with num_steps fitted to the budget, clipping, per-layer bf16
autocast losses) in a separate venv, on the same training rows and ``--batch-size``, from
the HF folder tl_lenses converted the model into. Its snapshots (``config.json`` +
``params.pt``) are imported with ``import_tuned_lens_library`` and scored like the others.
Set up once (about a minute; CPU torch 2.13.0 pinned), then name it in ``--contenders``:

    bash benchmarks/tuned_lens_library_env.sh /work/tlvenv
    python benchmarks/bench_tuned_lens.py --contenders reference,fast,library \
        --library-python /work/tlvenv/bin/python

Without that python the contender is skipped with a message. All lenses are compared on the
same hook points, ``blocks.{0..L-1}.hook_resid_pre`` (the library's translators read HF
``hidden_states[0..L-1]``, the same residuals), and means are over those L layers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", default="1,2,4", help="minutes, comma-separated")
    parser.add_argument("--text", nargs="+",
                        default=["/usr/share/doc/python3.11/html/_sources/"])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4, help="rows per KL step")
    parser.add_argument("--held-out-rows", type=int, default=4)
    parser.add_argument("--fine", type=float, default=30.0,
                        help="extra snapshots of the fast run every this many seconds")
    parser.add_argument("--png", default="docs/tuned_lens_kl.png")
    parser.add_argument("--json", default="benchmarks/bench_tuned_lens.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--contenders", default="reference,fast",
                        help="of reference, reference-bf16 (the library's autocast), fast, "
                        "library (the tuned-lens library itself, in its own venv)")
    parser.add_argument("--library-python", default="/work/tlvenv/bin/python",
                        help="python of the venv made by benchmarks/tuned_lens_library_env.sh")
    return parser.parse_args(argv)


class Snapshots:
    """A training callback keeping the lens state at the last step within each time mark."""

    def __init__(self, marks: list[float]):
        self.marks, self.states, self.times = sorted(marks), {}, {}

    def __call__(self, step: int, seconds: float, lens) -> None:
        for mark in self.marks:
            if seconds <= mark:
                self.states[mark] = {k: v.detach().clone() for k, v in lens.state_dict().items()}
                self.times[mark] = (seconds, step)


CONTENDERS = {"reference": ("reference", False), "reference-bf16": ("reference", True),
              "fast": ("fast", True)}
LIBRARY = "library"
DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned_lens_library_driver.py")


def run_recipe(model, split, contender, budget_s, marks, args, lens=None):
    from tl_lenses.lenses.tuned.lens import TunedLens
    from tl_lenses.lenses.tuned.train import train_tuned_lens

    recipe, bf16 = CONTENDERS[contender]
    snaps = Snapshots(marks)
    lens = lens if lens is not None else TunedLens.for_model(model)
    snaps(0, 0.0, lens)     # marks before the first step get the untrained lens (as library's)
    start = time.perf_counter()
    result = train_tuned_lens(model, split.train, lens, recipe=recipe, time_budget=budget_s,
                              steps=10**9, batch_size=args.batch_size, seed=args.seed,
                              bf16=bf16, callback=snaps, progress=True)
    wall = time.perf_counter() - start
    print(f"{contender}: {result.steps} KL steps, {result.tokens_seen} KL tokens, "
          f"{result.seconds:.0f} s training, {wall:.0f} s wall", file=sys.stderr)
    return result, snaps


def run_library(model, split, held, budget_s, marks, args, evaluator, logit):
    """Train the tuned-lens library's lens in its own venv; evaluate each snapshot here.

    The driver gets the HF folder that tl_lenses converted the model into, the same training
    rows, and the marks (plus 0: the untrained lens, which must read as the logit lens).
    Each snapshot is imported with ``import_tuned_lens_library`` (translator i ->
    ``blocks.{i}.hook_resid_pre``) and scored by ``evaluator`` like the other contenders;
    the driver's own float32 KL of the same snapshot on the same held-out rows is compared.
    """
    import subprocess
    import tempfile

    from tl_lenses.lenses.tuned.io import import_tuned_lens_library
    from tl_lenses.models import cache_dir

    hf_folder = cache_dir() / "hf"
    with tempfile.TemporaryDirectory(prefix="bench-tuned-lens-library-") as tmp:
        torch.save(split.train.contiguous(), os.path.join(tmp, "train.pt"))
        torch.save(held.contiguous(), os.path.join(tmp, "held_out.pt"))
        out = os.path.join(tmp, "out")
        command = [args.library_python, DRIVER, "--model", str(hf_folder),
                   "--tokens", os.path.join(tmp, "train.pt"),
                   "--eval-tokens", os.path.join(tmp, "held_out.pt"), "--out", out,
                   "--budget", repr(budget_s), "--marks", ",".join(map(repr, [0.0] + marks)),
                   "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
        start = time.perf_counter()
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.pop("PYTHONPATH", None)
        # The driver's chatter goes to stderr, like the other contenders' progress bars.
        subprocess.run(command, check=True, stdout=sys.stderr, cwd=tmp, env=env)
        wall = time.perf_counter() - start
        with open(os.path.join(out, "result.json")) as file:
            info = json.load(file)
        curves, own = {}, {}
        for mark in [0.0] + marks:
            snap = info["snapshots"][f"{mark:g}"]
            lens = import_tuned_lens_library(snap["path"], model)
            if lens.hook_names != evaluator.hook_names:
                raise RuntimeError(f"the imported lens covers {lens.hook_names}, the "
                                   f"evaluator {evaluator.hook_names}")
            kl = evaluator.kl(lens)
            curves[mark] = ((snap["seconds"], snap["step"]), kl)
            own[mark] = (kl - torch.tensor(snap["library_kl"])).abs().max().item()
    print(f"{LIBRARY}: {info['steps']} KL steps (num_steps fitted: {info['num_steps']}), "
          f"{info['tokens']} KL tokens, {info['seconds']:.0f} s training, {wall:.0f} s wall",
          file=sys.stderr)
    step0 = (curves.pop(0.0)[1] - logit).abs().max().item()
    check = {"step0_vs_logit_lens_max_abs_kl": step0,
             "library_own_kl_vs_ours_max_abs": max(own.values())}
    if step0 > 1e-5:
        raise RuntimeError(f"the library's untrained lens should read as the logit lens, but "
                           f"its KL differs by up to {step0:.3g} nats: the import is broken")
    return info, curves, check


def evaluate(evaluator, lens, state):
    lens.load_state_dict(state)
    return evaluator.kl(lens)


def main(argv=None) -> int:
    from tl_lenses.data import token_split
    from tl_lenses.lenses.logit import LogitLens
    from tl_lenses.lenses.tuned.eval import KLEvaluator
    from tl_lenses.lenses.tuned.lens import TunedLens
    from tl_lenses.models import load_default_model

    args = parse_args(argv)
    budgets = [float(b) * 60 for b in args.budgets.split(",")]
    longest = max(budgets)
    model = load_default_model()
    split = token_split(model, paths=args.text, seq_len=args.seq_len, held_out=0.02,
                        seed=args.seed)
    held = split.held_out[: args.held_out_rows]
    print(f"corpus: {split.n_tokens} tokens; held-out: {held.numel()} tokens", file=sys.stderr)
    evaluator = KLEvaluator(model, held)
    results = {"budgets_s": budgets, "held_out_tokens": held.numel(),
               "train_tokens_available": split.train.numel(), "load": os.getloadavg()}
    logit = evaluator.kl(LogitLens())
    results["logit"] = logit.tolist()

    # Fine marks (for the time-to-reach figure) up to twice the smallest budget.
    horizon = min(longest, 2 * min(budgets))
    fine = [args.fine * i for i in range(1, int(horizon // args.fine) + 1)]
    curves = {}
    contenders = args.contenders.split(",")
    unknown = set(contenders) - set(CONTENDERS) - {LIBRARY}
    if unknown:
        raise SystemExit(f"--contenders: unknown {sorted(unknown)}; choose from "
                         f"{list(CONTENDERS) + [LIBRARY]}")
    if LIBRARY in contenders and not os.path.isfile(args.library_python):
        venv = os.path.dirname(os.path.dirname(args.library_python))
        print(f"skipping the '{LIBRARY}' contender: no python at --library-python "
              f"{args.library_python}; make its venv with `bash "
              f"benchmarks/tuned_lens_library_env.sh {venv}`", file=sys.stderr)
        contenders.remove(LIBRARY)
    for recipe in contenders:
        if recipe == LIBRARY:
            info, curves[recipe], check = run_library(model, split, held, longest, budgets,
                                                      args, evaluator, logit)
            results[recipe] = {"steps": info["steps"], "kl_tokens": info["tokens"],
                               "num_steps": info["num_steps"], "seconds": info["seconds"],
                               "versions": info["versions"], **check,
                               "snapshots": _snapshot_json(curves[recipe])}
            continue
        marks = sorted(set(budgets + fine)) if recipe == "fast" else budgets
        result, snaps = run_recipe(model, split, recipe, longest, marks, args)
        lens = TunedLens.for_model(model)
        curves[recipe] = {mark: (snaps.times[mark], evaluate(evaluator, lens, snaps.states[mark]))
                          for mark in snaps.states}
        results[recipe] = {"steps": result.steps, "kl_tokens": result.tokens_seen,
                           "snapshots": _snapshot_json(curves[recipe])}
    bias = None
    if "fast" in contenders:
        bias_result, bias_snaps = run_recipe(model, split, "fast", min(budgets),
                                             [min(budgets)], args,
                                             TunedLens.for_model(model, kind="bias"))
        bias_lens = TunedLens.for_model(model, kind="bias")
        bias = evaluate(evaluator, bias_lens, bias_snaps.states[min(budgets)])
        results["bias_only_fast"] = {"budget_s": min(budgets), "kl": bias.tolist()}

    results["layers"] = evaluator.hook_names
    report(results, curves, logit, bias, budgets)
    plot(args.png, evaluator.hook_names, logit, bias, curves, longest)
    with open(args.json, "w") as file:
        json.dump(results, file, indent=1)
    print(f"wrote {args.json} and {args.png}")
    return 0


def _snapshot_json(curve) -> dict:
    return {str(m): {"seconds": t[0], "step": t[1], "kl": kl.tolist(), "mean_kl": float(kl.mean())}
            for m, (t, kl) in curve.items()}


def report(results, curves, logit, bias, budgets) -> None:
    layers = results["layers"]
    print(f"\nmean held-out KL(final || lens), nats, over {len(logit)} layers "
          f"{layers[0]} .. {layers[-1]} (= HF hidden_states 0..{len(layers) - 1}, the "
          f"library's translators) (load average at start {results['load'][0]:.1f})")
    print(f"logit lens: {logit.mean():.4f}")
    if bias is not None:
        print(f"bias-only (fast, {min(budgets) / 60:g} min): {bias.mean():.4f}")
    names = list(curves)
    print("budget | " + " | ".join(f"{name} (steps)" for name in names))
    nan = ((0, 0), torch.tensor(float("nan")))
    for b in budgets:
        cells = [curves[name].get(b, nan) for name in names]
        print(f"{b / 60:g} min | " + " | ".join(f"{kl.mean():.4f} ({t[1]})" for t, kl in cells))
    if LIBRARY in results:
        lib = results[LIBRARY]
        print(f"library: untrained lens vs logit lens, max |dKL| "
              f"{lib['step0_vs_logit_lens_max_abs_kl']:.2g}; its own float32 KL vs ours, "
              f"max |dKL| {lib['library_own_kl_vs_ours_max_abs']:.2g} nats "
              f"(num_steps fitted to the budget: {lib['num_steps']})")
    if "fast" not in curves:
        return
    for rival in ("reference", LIBRARY):
        if rival not in curves or max(budgets) not in curves[rival]:
            continue
        target = curves[rival][max(budgets)][1].mean()
        reached = [t for mark, (t, kl) in sorted(curves["fast"].items()) if kl.mean() <= target]
        if reached:
            print(f"fast reaches {rival}'s {max(budgets) / 60:g}-min KL ({target:.4f}) by "
                  f"{reached[0][0]:.0f} s (first snapshot at or below it; step {reached[0][1]})")
            results[f"fast_time_to_{rival}_final_s"] = reached[0][0]
        else:
            print(f"fast never reached {rival}'s final KL")
    fine = [(t[0], float(kl.mean())) for mark, (t, kl) in sorted(curves["fast"].items())]
    print("fast curve (seconds, mean KL):", [(round(s), round(k, 4)) for s, k in fine])


def plot(path, hook_names, logit, bias, curves, longest) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tl_lenses.hooks import short_label

    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(hook_names))
    lines = [("logit lens", logit)] + ([("bias-only (fast)", bias)] if bias is not None else [])
    names = {"reference": "reference recipe", "reference-bf16": "reference recipe, bf16",
             "fast": "fast recipe", LIBRARY: "tuned-lens library"}
    lines += [(f"{names[name]}, {longest / 60:g} min", curve[longest][1])
              for name, curve in curves.items() if longest in curve]
    for label, kl in lines:
        ax.plot(x, kl.tolist(), marker="o", markersize=3, label=f"{label} (mean {kl.mean():.3f})")
    ax.set_xticks(list(x), [short_label(n) for n in hook_names], rotation=60, ha="right",
                  fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("held-out KL(final || lens), nats")
    ax.set_title("SmolLM2-135M, python3.11-doc text", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
