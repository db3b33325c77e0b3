"""Neuron DLA and head-path DLA on the embedded model, against TransformerLens' own routes.

    python benchmarks/bench_dla.py [--threads N]   # ~2 minutes on a 2-core CPU, ~4 GB peak

For 1 x 64 and 8 x 128 tokens, at the last position, attributing the logit difference of two
tokens to all 30 x 1536 neurons:

- ours: ``tl_lenses.attribution.core.dla(..., neurons=True)`` (every component, neurons included);
- TL full: ``cache.stack_neuron_results(n_layers, pos_slice=-1)`` + ``cache.logit_attrs``
  (one d_model vector per neuron per prompt, then the dot product);
- TL projected: ``cache.stack_neuron_results(..., apply_ln=True, project_output_onto=diff)``.

All three read the same cache (its forward pass is not timed) and must give the same numbers.
Memory is the peak resident-set growth during the call: ``/proc/self/status`` VmHWM after
resetting it with ``/proc/self/clear_refs`` (Linux), minus VmRSS before; the script re-executes
itself with ``MALLOC_MMAP_THRESHOLD_=65536`` so that every block of 64 KiB or more is its own
mapping, returned on free (glibc otherwise raises the threshold after a big free and serves
later tensors from heap it holds, invisible to RSS). Python objects (labels) are counted too.
Then head-path DLA
(every head x every earlier component x every source position) at one destination, 64 tokens.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tl_lenses.attribution.core import dla  # noqa: E402
from tl_lenses.attribution.paths import head_path_dla  # noqa: E402
from tl_lenses.models import load_default_model  # noqa: E402

ANSWER, WRONG = " Mary", " John"


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) * 1024


def measure(fn, repeats: int = 5):
    """(median seconds, peak RSS growth in bytes of the first call, result)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    start = time.perf_counter()
    out = fn()
    times = [time.perf_counter() - start]
    peak = _status("VmHWM") - before
    for _ in range(repeats - 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak, out


def mb(n: int) -> str:
    return f"{n / 2**20:8.1f} MB"


def bench_neurons(model, batch: int, n_pos: int) -> None:
    tokens = torch.randint(1000, model.cfg.d_vocab, (batch, n_pos),
                           generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens)
        a, b = model.to_single_token(ANSWER), model.to_single_token(WRONG)
        diff = model.W_U[:, a] - model.W_U[:, b]
        L, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
        labels = [f"L{l}N{i}" for l in range(L) for i in range(d_mlp)]

        def ours():
            return dla(model, tokens, (ANSWER, WRONG), neurons=True, cache=cache)

        def tl_full():
            stack = cache.stack_neuron_results(L, pos_slice=-1)
            return cache.logit_attrs(stack, tokens=ANSWER, incorrect_tokens=WRONG, pos_slice=-1)

        def tl_projected():
            return cache.stack_neuron_results(L, pos_slice=-1, apply_ln=True,
                                              project_output_onto=diff)

        t_ours, m_ours, r_ours = measure(ours)
        t_proj, m_proj, r_proj = measure(tl_projected)
        t_full, m_full, r_full = measure(tl_full, repeats=2)
    values = r_ours[labels].values[:, :, 0, 0]
    err_full = (values - r_full).abs().max().item()
    err_proj = (values - r_proj).abs().max().item()
    scale = r_full.abs().max().item()
    print(f"\nneuron DLA, {batch} x {n_pos} tokens, last position, {L * d_mlp} neurons")
    print(f"  ours (all components)     {t_ours * 1e3:8.1f} ms  {mb(m_ours)}")
    print(f"  TL stack + logit_attrs    {t_full * 1e3:8.1f} ms  {mb(m_full)}")
    print(f"  TL project_output_onto    {t_proj * 1e3:8.1f} ms  {mb(m_proj)}")
    print(f"  vs TL stack:     {t_full / t_ours:6.1f}x faster, "
          f"{m_full / max(m_ours, 1):6.1f}x less memory")
    print(f"  vs TL projected: {t_proj / t_ours:6.1f}x faster, "
          f"{m_proj / max(m_ours, 1):6.1f}x less memory")
    print(f"  max |difference|: {err_full:.2e} (TL stack), {err_proj:.2e} (TL projected); "
          f"largest value {scale:.3g}")
    assert err_full < 1e-4 * max(scale, 1) and err_proj < 1e-4 * max(scale, 1)


def bench_paths(model, n_pos: int = 64) -> None:
    tokens = torch.randint(1000, model.cfg.d_vocab, (1, n_pos),
                           generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens)
        t_paths, m_paths, paths = measure(
            lambda: head_path_dla(model, tokens, (ANSWER, WRONG), position=-1, cache=cache))
        t_all, _, _ = measure(
            lambda: head_path_dla(model, tokens, (ANSWER, WRONG), position=-1), repeats=2)
        heads = dla(model, tokens, (ANSWER, WRONG), cache=cache)[paths.heads]
    n_paths = paths.values[..., 0].numel()
    err = (paths.head_totals()[:, 0, 0] - heads.values[:, 0, 0, 0]).abs().max().item()
    print(f"\nhead-path DLA, 1 x {n_pos} tokens, destination = last token")
    print(f"  {len(paths.heads)} heads x {len(paths.sources)} sources x {n_pos} source "
          f"positions = {n_paths} paths")
    print(f"  from a cache:       {t_paths * 1e3:8.1f} ms  {mb(m_paths)}")
    print(f"  with forward pass:  {t_all * 1e3:8.1f} ms")
    print(f"  paths summed vs head DLA: max |difference| {err:.2e}")


def main() -> int:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; loading model ...",
          file=sys.stderr, flush=True)
    model = load_default_model()
    for batch, n_pos in ((1, 64), (8, 128)):
        bench_neurons(model, batch, n_pos)
    bench_paths(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
