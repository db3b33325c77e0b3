"""tl_lenses against TransformerLens 4.x's own analysis tools, on the embedded model (Bridge).

Needs ``transformer_lens>=4`` (its ``transformer_lens.tools.analysis``). Contenders, from the
same cache of the same random tokens, in one run:

- all-layer logit lens (31 rows: ``resid_pre`` of each block + final ``resid_post``, every
  position): tl_lenses ``apply_lens_to_cache`` (top-5, entropy, KL to final, rank of the
  final top-1; default path) vs TL's ``tools.analysis.logit_lens(cache, positions=None,
  top_k=5, return_type="probs")`` (top-5 and entropy only: TL takes one selector per call,
  so ranks would need a second pass). The top-5 ids must be identical and the
  probabilities equal to 1e-4.
- DLA of a logit difference at the last position: tl_lenses ``dla`` (every head, every
  MLP, embeddings and biases) vs TL's ``direct_logit_attribution(unit="head")`` (heads +
  one remainder), and tl_lenses ``dla(heads=False)`` vs TL's ``unit="component"``. The
  head / per-layer values must agree to 1e-4.

Peak memory is the process's resident-set high-water mark above its level before each
contender (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``), with glibc's dynamic
mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_``, set by re-executing) so that freed large
tensors leave the resident set and the order of contenders does not matter; time is the
best of ``--repeat`` runs (DLA: of ``--dla-repeat`` calls alternating with TL's, median
beside it). Ratios are TL / tl_lenses (above 1: tl_lenses is faster or smaller).

    python benchmarks/bench_tl4_tools.py [--shapes 1x64,16x256] [--repeat 2] [--dla-repeat 50]
        [--only dla]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import tl_lenses as tll
from tl_lenses.attribution.core import needed_hooks
from tl_lenses.hooks import resid_names

MiB = 2**20
TABLE: list[str] = []  # markdown rows for the README, printed at the end


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))


def measure(fn, repeat: int):
    """(best seconds, peak RSS increase in bytes, last result)."""
    best, peak, result = float("inf"), 0, None
    for _ in range(repeat):
        result = None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _status("VmRSS")
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
        peak = max(peak, _status("VmHWM") - before)
    return best, peak, result


def row(name: str, seconds: float, peak: int) -> str:
    return f"  {name:<34} {seconds * 1e3:10.2f} ms  peak +{peak / MiB:7.0f} MiB"


def ratio(ours, theirs) -> str:
    # Peaks under 1 MiB are below the resident set's resolution here: compared as 1 MiB.
    return (f"  TL / tl_lenses: time {theirs[0] / ours[0]:.2f}x, "
            f"memory {max(theirs[1], MiB) / max(ours[1], MiB):.2f}x")


def bench_logit_lens(model, tokens, repeat: int, k: int = 5) -> None:
    from transformer_lens.tools.analysis import logit_lens as tl_logit_lens

    names = set(resid_names(model))
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    t_ours, m_ours, ours = measure(
        lambda: tll.apply_lens_to_cache(model, cache, tokens, k=k, target="final"), repeat)
    t_tl, m_tl, theirs = measure(
        lambda: tl_logit_lens(cache, positions=None, top_k=k, return_type="probs"), repeat)
    # Near-ties may order differently (the two sum the logits in another order): report the
    # share of cells with identical top-k ids and compare probabilities on those.
    same = (theirs.readout.top_ids == ours.top_ids).all(-1)
    torch.testing.assert_close(theirs.values[same], ours.top_probs[same], atol=1e-4, rtol=1e-3)
    print(f" logit lens, {len(names)} rows x {tokens.numel()} positions, top-{k} "
          f"(identical top-k ids in {same.float().mean():.4%} of cells, probabilities "
          "within 1e-4 there)")
    print(row("tl_lenses apply_lens_to_cache", t_ours, m_ours))
    print(row("TL 4.x tools.analysis.logit_lens", t_tl, m_tl))
    print(ratio((t_ours, m_ours), (t_tl, m_tl)))
    shape = "x".join(map(str, tokens.shape))
    _table_row(f"logit lens, {len(names)} rows x {shape}, top-{k}", (t_ours, m_ours),
               (t_tl, m_tl))


def bench_dla(model, tokens, dla_repeat: int) -> None:
    from transformer_lens.tools.analysis import direct_logit_attribution

    # The same token ids to both (neither pays for tokenizing the answers).
    good, bad = model.to_single_token(" Mary"), model.to_single_token(" John")
    # Both read the same cache: the hook points either needs (a full cache at 16 x 256 would
    # hold every attention pattern). no_grad, not inference_mode: TL's head results einsum
    # cached tensors with weights.
    names = set(needed_hooks(model, heads=True)) | set(needed_hooks(model, heads=False))
    torch.set_grad_enabled(False)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    for ours_kw, unit in (({}, "head"), ({"heads": False}, "component")):
        # A fresh cache object (same tensors) per call: TL's cache memoises the per-head
        # results it computes, so a second call on one cache would skip TL's main work.
        def ours_call():
            return tll.dla(model, tokens, (good, bad), cache=fresh(cache), **ours_kw)

        def tl_call():
            return direct_logit_attribution(model, answer_tokens=good, incorrect_tokens=bad,
                                            unit=unit, cache=fresh(cache))

        # Calls of a few ms: many, alternating (a load that comes and goes hits both alike);
        # TL's per-head call takes seconds at 16 x 256: a tenth as many.
        calls = dla_repeat if unit == "component" else max(2, dla_repeat // 10)
        times: dict[str, list[float]] = {"ours": [], "tl": []}
        m_ours = m_tl = 0
        for _ in range(calls):
            t, m, ours = measure(ours_call, 1)
            times["ours"].append(t)
            m_ours = max(m_ours, m)
            t, m, theirs = measure(tl_call, 1)
            times["tl"].append(t)
            m_tl = max(m_tl, m)
        t_ours, t_tl = min(times["ours"]), min(times["tl"])
        median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        _check_dla(ours, theirs)
        print(f" DLA ({unit}s), last position, batch {tokens.shape[0]} (values within 1e-4; "
              f"best of {calls} alternating calls)")
        print(row("tl_lenses dla" + (" heads=False" if ours_kw else ""), t_ours, m_ours))
        print(row(f"TL 4.x direct_logit_attribution({unit})", t_tl, m_tl))
        print(ratio((t_ours, m_ours), (t_tl, m_tl))
              + f"; medians {median['ours'] * 1e3:.2f} vs {median['tl'] * 1e3:.2f} ms "
              f"(time {median['tl'] / median['ours']:.2f}x)")
        shape = "x".join(map(str, tokens.shape))
        _table_row(f"DLA per {'head' if unit == 'head' else 'sublayer'}, {shape}",
                   (t_ours, m_ours), (t_tl, m_tl))
    torch.set_grad_enabled(True)


def _table_row(name: str, ours, theirs) -> None:
    def cell(seconds, peak):
        ms = seconds * 1e3
        return (f"{ms:.2f} ms, " if ms < 10 else f"{ms:.0f} ms, ") + (
            f"+{peak / MiB:.0f} MiB" if peak >= MiB
                                               else "<1 MiB")
    TABLE.append(f"| {name} | {cell(*ours)} | {cell(*theirs)} | time "
                 f"{theirs[0] / ours[0]:.2f}x, memory "
                 f"{max(theirs[1], MiB) / max(ours[1], MiB):.2f}x |")


def fresh(cache):
    """A new ActivationCache over the same tensors (nothing memoised by earlier calls)."""
    from transformer_lens import ActivationCache

    return ActivationCache(dict(cache.cache_dict), cache.model,
                           has_batch_dim=cache.has_batch_dim)


def _check_dla(ours, theirs) -> None:
    """TL's per-head / per-sublayer values equal ours under the matching labels."""
    for label in theirs.labels:
        if label == "remainder":
            continue
        torch.testing.assert_close(theirs.attribution[theirs.labels.index(label)],
                                   ours[_our_label(label)].values[0, :, 0, 0], atol=1e-4, rtol=1e-4)


def _our_label(tl_label: str) -> str:
    if tl_label.startswith("L") or tl_label in ("embed", "pos_embed"):
        return tl_label                                  # heads: "L3H5" on both sides
    layer, kind = tl_label.split("_", 1)                 # "3_attn_out" / "3_mlp_out"
    return f"L{layer} attn" if kind == "attn_out" else f"L{layer} MLP"


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="1x64,16x256")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dla-repeat", type=int, default=50,
                        help="alternating calls per DLA contender (best and median reported)")
    parser.add_argument("--only", choices=("lens", "dla"), default=None,
                        help="run one contender pair (the 16 x 256 logit lens takes minutes)")
    args = parser.parse_args()
    model = tll.load_default_model(backend="bridge")
    print(f"torch threads: {torch.get_num_threads()}, cpu count: {os.cpu_count()}")
    gen = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        batch, pos = map(int, shape.split("x"))
        tokens = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen)
        print(f"\n== {batch} x {pos} tokens ==")
        if args.only != "dla":
            bench_logit_lens(model, tokens, args.repeat)
        if args.only != "lens":
            bench_dla(model, tokens, args.dla_repeat)
    print("\n| measurement | tl_lenses | TL 4.3 tool | TL / tl_lenses |")
    print("| --- | --- | --- | --- |")
    print("\n".join(TABLE))


if __name__ == "__main__":
    main()
