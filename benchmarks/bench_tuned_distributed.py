"""Tuned lens under torchrun: 1 vs N gloo processes on the embedded model, same tokens.

Launches ``torchrun --nproc_per_node=N`` (standalone rendezvous) for each N in ``--procs``,
each process running this script with ``--worker``: every rank loads SmolLM2-135M on the
CPU, packs the same rows (same seed), and trains the fast recipe in two timed calls, the
least-squares warm start (``steps=0``) and then the KL phase on the warm-started lens
(``ls_tokens=0``), with the same global batches whatever N is. Rank 0 reports tokens/s of
each phase (all processes together) and the mean held-out KL(final || lens) of the result;
with the same tokens the lenses should agree (issue 18: N processes train the lens one
does), so the KL columns should match to a few digits.

    python benchmarks/bench_tuned_distributed.py --procs 1,2

Threads: each process gets ``--threads // N`` torch threads, so N processes use the same
cores as one. On a machine shared with other jobs the rates move with the load; the load
average is printed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--procs", default="1,2", help="process counts, comma-separated")
    parser.add_argument("--text", nargs="+", default=["/usr/lib/python3.11/*.py"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all")
    parser.add_argument("--batch-size", type=int, default=4, help="global rows per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    parser.add_argument("--ls-tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=2, help="KL steps")
    parser.add_argument("--held-out-rows", type=int, default=2)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 KL matmuls (default: where the CPU has bf16 units)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def launch(args) -> None:
    print(f"load average {os.getloadavg()[0]:.1f}; global batch {args.batch_size} rows of "
          f"{args.seq_len} tokens; {args.ls_tokens} warm-start tokens, {args.steps} KL steps")
    print("processes | threads each | warm start tok/s | KL tok/s | held-out KL after warm "
          "start (nats) | last step's KL (nats) | held-out KL after KL steps (nats) | wall s")
    for n in [int(p) for p in args.procs.split(",")]:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={n}", __file__, "--worker", *_forward(args)]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // n))}
        begin = time.perf_counter()
        out = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
        if out.returncode or not lines:
            print(out.stdout[-2000:], out.stderr[-4000:])
            raise SystemExit(f"torchrun with {n} processes failed ({out.returncode})")
        print(lines[0].removeprefix("RESULT ") + f" | {time.perf_counter() - begin:.0f}",
              flush=True)


def _forward(args) -> list[str]:
    return ["--text", *args.text, "--threads", str(args.threads), "--batch-size",
            str(args.batch_size), "--seq-len", str(args.seq_len), "--ls-tokens",
            str(args.ls_tokens), "--steps", str(args.steps), "--held-out-rows",
            str(args.held_out_rows),
            *([] if args.bf16 is None else ["--bf16" if args.bf16 else "--no-bf16"])]


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from tl_lenses.lenses.tuned.distributed import close_distributed, init_distributed
    from tl_lenses.lenses.tuned.eval import KLEvaluator
    from tl_lenses.lenses.tuned.train import train_tuned_lens
    from tl_lenses.models import load_default_model
    from tl_lenses.streams import TokenStream

    world = init_distributed("cpu")
    threads = max(1, args.threads // world.size)
    torch.set_num_threads(threads)
    try:
        model = load_default_model()
        stream = TokenStream(model, paths=args.text, seq_len=args.seq_len)   # lazily, in order
        held_out = stream.next_batch(args.held_out_rows)
        train = stream.next_batch(400)
        kw = dict(batch_size=args.batch_size, progress=False, seed=0)
        dist.barrier() if world.size > 1 else None
        begin = time.perf_counter()
        warm = train_tuned_lens(model, train, steps=0, ls_tokens=args.ls_tokens, **kw)
        dist.barrier() if world.size > 1 else None
        middle = time.perf_counter()
        evaluator = KLEvaluator(model, held_out) if world.is_main else None
        warm_kl = float(evaluator.kl(warm.lens).mean()) if world.is_main else 0.0
        dist.barrier() if world.size > 1 else None
        kl_begin = time.perf_counter()
        kl = warm if args.steps == 0 else train_tuned_lens(
            model, train, warm.lens, steps=args.steps, ls_tokens=0, bf16=args.bf16, **kw)
        dist.barrier() if world.size > 1 else None
        end = time.perf_counter()
        if world.is_main:
            held = evaluator.kl(kl.lens)
            print(f"RESULT {world.size} | {threads} | "
                  f"{warm.warm_start_tokens / (middle - begin):.0f} | "
                  f"{kl.tokens_seen / max(end - kl_begin, 1e-9):.0f} | "
                  f"{warm_kl:.4f} | "
                  f"{kl.losses[-1] if kl.losses else float('nan'):.4f} | "
                  f"{float(held.mean()):.4f}",
                  flush=True)
    finally:
        close_distributed()


if __name__ == "__main__":
    parsed = parse_args()
    worker(parsed) if parsed.worker else launch(parsed)
