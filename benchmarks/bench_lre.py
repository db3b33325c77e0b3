"""Time LRE estimation (n=8 Jacobians, one relation) on the embedded SmolLM2-135M.

    python benchmarks/bench_lre.py [--relation country_capital] [--layer 8] [--n 8]

Compares the default HookedTransformer path (suffix-only forward-mode Jacobian against a
frozen key/value cache of the prefix) with the generic path (s made a leaf through a hook,
d_model reverse-mode passes over the whole prompt), which the TransformerBridge uses. The
generic path is timed on ``--naive-rows`` rows of one Jacobian and extrapolated; the script
checks that both paths agree on those rows. On a machine shared with other jobs, pass
``--threads 1``: two OpenMP threads on an oversubscribed CPU spin and run far slower.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--relation", default="country_capital")
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--naive-rows", type=int, default=24,
                        help="rows of the generic Jacobian to time (then extrapolated)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from tl_lenses.lenses.attribute.lre import estimate_lre, relation_jacobian
    from tl_lenses.lenses.attribute.relations import get_relation
    from tl_lenses.models import load_default_model

    model = load_default_model()
    relation = get_relation(args.relation)
    print(f"{relation.name!r}, layer {args.layer}, n={args.n}, {torch.get_num_threads()} threads")

    start = time.perf_counter()
    lre = estimate_lre(model, relation, args.layer, n=args.n, method="kv-cache")
    fast = time.perf_counter() - start
    print(f"kv-cache + forward mode: {fast:.1f} s for n={args.n} "
          f"({fast / args.n:.2f} s per Jacobian)")

    sample = lre.train[0]
    ours = relation_jacobian(model, lre.prompt(sample.subject), sample.subject, args.layer,
                             method="kv-cache")
    start = time.perf_counter()
    rows, n_rows = naive_rows(model, lre.prompt(sample.subject), sample.subject, args.layer,
                              args.naive_rows)
    per_naive = (time.perf_counter() - start) * model.cfg.d_model / n_rows
    print(f"hooks + reverse mode over the whole prompt: ~{per_naive:.1f} s per Jacobian "
          f"(timed {n_rows} of {model.cfg.d_model} rows), ~{per_naive * args.n:.0f} s for "
          f"n={args.n}")
    print(f"speed-up: {per_naive * args.n / fast:.1f}x")
    error = (ours.jacobian[:n_rows] - rows).abs().max().item()
    print(f"max |J_kv - J_hooks| over those rows = {error:.2e} "
          f"(max |J| = {rows.abs().max().item():.2e})")


def naive_rows(model, prompt, subject, layer, n_rows):
    """The first ``n_rows`` rows of dz/ds by the generic path (lre._jacobian_hooks)."""
    from tl_lenses.lenses.attribute.lre import _jacobian_hooks, subject_position

    tokens, pos = subject_position(model, prompt, subject)
    return _jacobian_hooks(model, tokens, layer, pos, n_rows)[2], n_rows


if __name__ == "__main__":
    main()
