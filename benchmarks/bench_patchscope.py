"""Benchmark: a full (l, l*) patchscope sweep, batched vs a loop of single run_with_hooks calls.

On the embedded SmolLM2-135M (30 blocks): every source layer l in 0..29 (``resid_pre`` of
each block) into every target layer l* in 0..29 of the identity prompt, at its last token:
900 patched runs. Three ways, in one run, on the same machine:

* ``batched``  -- :func:`tl_lenses.patchscopes.sweep.patchscope_sweep` (prefix shared through
  TL's KV cache, one hook per layer patching its own rows), all 900 cases;
* ``batched, no prefix sharing`` -- the same with ``reuse_prefix=False`` (every row runs
  the whole target prompt);
* ``loop``  -- one ``model.run_with_hooks`` per case with a ``patch_hook``.

The slower two are timed on a random subset of cases (``--subset``, default 90) and
extrapolated to 900 (printed as such); ``--subset 900`` runs them in full. Every timed case
is checked against the batched result: same top-5 tokens, probabilities within 1e-4.

    python benchmarks/bench_patchscope.py [--subset 90] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tl_lenses.hooks import resolve_layer  # noqa: E402
from tl_lenses.models import load_default_model  # noqa: E402
from tl_lenses.patchscopes.core import patch_hook, source_states  # noqa: E402
from tl_lenses.patchscopes.presets import IDENTITY_PROMPT  # noqa: E402
from tl_lenses.patchscopes.sweep import patchscope_sweep  # noqa: E402

SOURCE = "Diana, Princess of Wales"
K = 5


def loop_case(model, tokens, hidden, s_layer, t_layer):
    """One patched run the plain way: run_with_hooks with a patch at the last token."""
    hook = patch_hook(hidden[s_layer], position=-1)
    with torch.no_grad():
        logits = model.run_with_hooks(
            tokens, fwd_hooks=[(resolve_layer(model, t_layer)[1], hook)])[0, -1]
    return logits.softmax(-1).topk(K)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=90)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_default_model()
    layers = list(range(model.cfg.n_layers))
    n_cases = len(layers) ** 2
    target = model.to_tokens(IDENTITY_PROMPT)
    print(f"model {model.cfg.model_name}: {len(layers)} x {len(layers)} = {n_cases} cases; "
          f"target prompt {target.shape[1]} tokens; torch threads {torch.get_num_threads()}",
          file=sys.stderr)

    start = time.perf_counter()
    sweep = patchscope_sweep(model, SOURCE, target, source_layers=layers,
                             target_layers=layers, k=K)
    t_batched = time.perf_counter() - start
    print(f"batched: {t_batched:.2f} s", file=sys.stderr)

    cases = random.Random(args.seed).sample(range(n_cases), min(args.subset, n_cases))
    hidden = source_states(model, model.to_tokens(SOURCE), layers, [-1])[:, 0]
    start = time.perf_counter()
    loop = [loop_case(model, target, hidden, int(sweep.source_layer[c]),
                      int(sweep.target_layer[c])) for c in cases]
    t_loop = (time.perf_counter() - start) * n_cases / len(cases)

    start = time.perf_counter()
    full = patchscope_sweep(model, SOURCE, target, source_layers=layers,
                            target_layers=layers, k=K, reuse_prefix=False,
                            batch_size=len(cases)) if len(cases) == n_cases else None
    if full is None:  # time the no-sharing batch on the same subset of cases
        from tl_lenses.patchscopes.core import run_patched
        rows = torch.tensor(cases)
        names = [resolve_layer(model, int(l))[1] for l in sweep.target_layer[rows]]
        with torch.no_grad():
            logits, _ = run_patched(model, target.expand(len(cases), -1), names,
                                    [target.shape[1] - 1] * len(cases),
                                    hidden[sweep.source_layer[rows]], reuse_prefix=False)
        full_top = logits.softmax(-1).topk(K)
    t_full = (time.perf_counter() - start) * n_cases / len(cases)

    worst = 0.0
    for j, case in enumerate(cases):
        probs, ids = loop[j]
        assert ids.tolist() == sweep.top_ids[case].tolist(), f"case {case}: top-5 differ"
        worst = max(worst, (probs - sweep.top_probs[case]).abs().max().item())
        other = full.top_probs[case] if full is not None else full_top.values[j]
        worst = max(worst, (other - sweep.top_probs[case]).abs().max().item())
    assert worst < 1e-4, f"probabilities differ by {worst:.2e}"

    note = "" if len(cases) == n_cases else \
        f" (timed on {len(cases)} random cases, x{n_cases / len(cases):.0f})"
    print(f"\n{n_cases} patched runs (SmolLM2-135M, CPU, {torch.get_num_threads()} threads)")
    print(f"  batched (prefix shared)        {t_batched:8.2f} s")
    print(f"  batched, no prefix sharing     {t_full:8.2f} s{note}")
    print(f"  loop of run_with_hooks         {t_loop:8.2f} s{note}")
    print(f"  speed-up vs loop               {t_loop / t_batched:8.1f} x")
    print(f"  speed-up vs no prefix sharing  {t_full / t_batched:8.1f} x")
    print(f"  checked {len(cases)} cases: same top-{K} tokens, max |dp| = {worst:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
