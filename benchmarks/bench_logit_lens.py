"""All-layer top-k logit lens on the embedded model: tl_lenses vs TL's naive way vs the floor.

Contenders, on the same cached residuals (31 rows: resid_pre of each block + final):
- tl_lenses: ``apply_lens_to_cache`` (top-5, entropy, KL to final, rank of final top-1),
  with the eager statistics (``fused=False``) and with ``fused=True`` (tl_lenses' C kernel:
  two sweeps per row while it is in cache); the default (``fused=None``) is the kernel
  wherever it builds.
- naive TL: ``cache.accumulated_resid(apply_ln=True) @ W_U + b_U``, then the same
  statistics with ``log_softmax``; it holds [31, batch, pos, d_vocab] floats, so it runs only
  where that fits in memory.
- floor: the bare unembedding matmul of the same shape, streamed through one reused buffer.

Peak memory is the process's resident-set high-water mark above its level before each
contender (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``).

    python benchmarks/bench_logit_lens.py [--shapes 1x64,16x256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import tl_lenses as tll
from tl_lenses.hooks import resid_names
from tl_lenses.readout._row_stats import use_fused
from tl_lenses.readout.unembed import Unembed

MiB = 2**20


def rss_now() -> int:
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmRSS"))


def measure(fn, repeat: int):
    """(best seconds, peak RSS increase in bytes, last result)."""
    best, peak, result = float("inf"), 0, None
    for _ in range(repeat):
        result = None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = rss_now()
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
        with open("/proc/self/status") as status:
            hwm = next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmHWM"))
        peak = max(peak, hwm - before)
    return best, peak, result


def naive(model, cache, k: int):
    stack = cache.accumulated_resid(apply_ln=True)              # [31, batch, pos, d_model]
    logits = stack @ model.W_U + model.b_U                      # [31, batch, pos, d_vocab]
    logp = logits.log_softmax(-1)
    top = logits.topk(k, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    kl = (logp[-1].exp() * (logp[-1] - logp)).sum(-1)
    final_top = logits[-1].argmax(-1)
    rank = (logits > logits.gather(-1, final_top[None, ..., None].expand(len(logits), -1, -1, 1))
            ).sum(-1) + 1
    return top, entropy, kl, rank


def floor(model, cache, chunk: int = 256):
    """The unembedding matmul alone, over the same rows, into one reused buffer."""
    unembed = Unembed.from_model(model)
    rows = torch.cat([cache[n].reshape(-1, model.cfg.d_model) for n in resid_names(model)])
    out = torch.empty(chunk, model.cfg.d_vocab)
    torch.set_grad_enabled(False)
    for start in range(0, rows.shape[0], chunk):
        block = rows[start:start + chunk]
        torch.matmul(block, unembed.W_U, out=out[: block.shape[0]])
    torch.set_grad_enabled(True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="1x64,16x256")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    model = tll.load_default_model()
    print(f"torch threads: {torch.get_num_threads()}, cpu count: {os.cpu_count()}")
    gen = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        batch, pos = map(int, shape.split("x"))
        tokens = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen)
        names = set(resid_names(model))
        with torch.inference_mode():
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        rows = len(names) * batch * pos
        naive_bytes = rows * model.cfg.d_vocab * 4
        print(f"\n== {batch} x {pos} tokens: {rows} rows x {model.cfg.d_vocab} vocab ==")
        t_floor, m_floor, _ = measure(lambda: floor(model, cache), args.repeat)
        t_ours, m_ours, ours = measure(
            lambda: tll.apply_lens_to_cache(model, cache, tokens, k=args.k, target="final",
                                            fused=False), args.repeat)
        t_fused, m_fused, fused = measure(
            lambda: tll.apply_lens_to_cache(model, cache, tokens, k=args.k, target="final",
                                            fused=True), args.repeat)
        assert torch.equal(fused.top_ids, ours.top_ids)
        same = (fused.target_rank == ours.target_rank).float().mean().item()
        auto = "fused" if use_fused(None, torch.device("cpu"), torch.float32) else "eager"
        print(f"floor (bare matmul)   {t_floor:8.2f} s  peak +{m_floor / MiB:8.0f} MiB")
        print(f"tl_lenses fused=False {t_ours:8.2f} s  peak +{m_ours / MiB:8.0f} MiB"
              f"   time / floor = {t_ours / t_floor:.2f}x")
        print(f"tl_lenses fused=True  {t_fused:8.2f} s  peak +{m_fused / MiB:8.0f} MiB"
              f"   time / floor = {t_fused / t_floor:.2f}x  ({100 * same:.2f}% same ranks)")
        print(f"default fused=None takes the {auto} path at this size")
        # The naive way keeps ~3 full-vocabulary tensors of this size alive at once.
        if 3 * naive_bytes < 0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"):
            with torch.inference_mode():
                t_naive, m_naive, ref = measure(lambda: naive(model, cache, args.k), 1)
            assert torch.equal(ref[0].indices, fused.top_ids), "top-k differs from naive"
            assert torch.allclose(ref[2], fused.kl_to_final, atol=1e-3)
            # Ranks can differ by one where two logits tie to float rounding (the naive way
            # sums in another order), so count agreement rather than demand equality.
            same_rank = (ref[3] == fused.target_rank).float().mean().item()
            print(f"naive TL              {t_naive:8.2f} s  peak +{m_naive / MiB:8.0f} MiB"
                  f"   fused is {t_naive / t_fused:.1f}x faster, {m_naive / max(m_fused, 1):.0f}x "
                  "less memory; identical top-k, "
                  f"{100 * same_rank:.2f}% identical ranks")
        else:
            print(f"naive TL              skipped: its logits alone are {naive_bytes / 2**30:.1f}"
                  f" GiB (x3 with log-probs and probs) on a "
                  f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB "
                  "machine")


if __name__ == "__main__":
    main()
