"""Pin the numbers tl_lenses produces, to check a refactor changes none of them (bit for bit).

``python benchmarks/pin_numbers.py --record FILE`` saves them; ``--check FILE`` recomputes and
compares exactly (``torch.equal``), printing each mismatch. Pinned: on the embedded
SmolLM2-135M-Instruct, the all-layer logit lens (top-5 ids and probabilities, entropy, KL to
final, rank of the final top-1) of three prompts, the DLA parts (heads, MLPs, neurons) of a
logit difference, and identity-patchscope predictions; on a tiny random model, a tuned lens
trained with a fixed seed (fast and reference recipes, a few steps).

Float sums depend on how matmuls split across threads: ``pinned_numbers.pt`` was recorded
with 2 threads (this project's machines), so the check runs with ``--threads 2``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tl_lenses as tll  # noqa: E402
from tl_lenses.tiny import tiny_hooked  # noqa: E402

PROMPTS = ["The capital of France is", "When Mary and John went to the store, John gave a drink to",
           "def add(a, b):\n    return"]
TARGET = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"


def lens_numbers(model, out: dict) -> None:
    for i, prompt in enumerate(PROMPTS):
        r = tll.logit_lens(model, prompt, k=5, target="final")
        for field in ("top_ids", "top_probs", "entropy", "kl_to_final", "target_rank"):
            out[f"lens{i}.{field}"] = getattr(r, field)


def dla_numbers(model, out: dict) -> None:
    r = tll.dla(model, PROMPTS[1], (" Mary", " John"))
    out["dla.parts"], out["dla.logits"] = r.values, r.logits
    n = tll.dla(model, PROMPTS[1], (" Mary", " John"), neurons=True)
    out["dla_neurons.parts"] = n.values


def patchscope_numbers(model, out: dict) -> None:
    for layer in (0, 6, 15, 29):
        r = tll.patchscope(model, "Diana, Princess of Wales", TARGET, source_layer=layer,
                           target_layer=layer, max_new_tokens=3)
        out[f"patch{layer}.logits"] = r.logits
        out[f"patch{layer}.generated"] = r.generated_ids


def tuned_numbers(out: dict) -> None:
    model = tiny_hooked("llama-gqa")
    rows = torch.randint(0, model.cfg.d_vocab, (24, 16), generator=torch.Generator().manual_seed(0))
    for recipe in ("fast", "reference"):
        # bf16 named: its default follows the CPU's bf16 support, the pins must not.
        result = tll.train_tuned_lens(model, rows, recipe=recipe, steps=3, batch_size=8,
                                      progress=False, ls_tokens=256, bf16=recipe == "fast")
        for name, p in result.lens.state_dict().items():
            out[f"tuned.{recipe}.{name}"] = p
        out[f"tuned.{recipe}.losses"] = torch.tensor(result.losses, dtype=torch.float64)


def compute() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    model = tll.load_default_model()
    lens_numbers(model, out)
    dla_numbers(model, out)
    patchscope_numbers(model, out)
    tuned_numbers(out)
    return {k: v.detach().cpu().clone() for k, v in out.items()}  # clone: no shared storage


def _difference(old, new) -> str:
    """How far apart two float tensors are (to tell rounding from a real change)."""
    if old is None or new is None or old.shape != new.shape or not old.is_floating_point():
        return ""
    both = old.isfinite() & new.isfinite()
    gap = (old[both].double() - new[both].double()).abs()
    scale = old[both].double().abs().max().clamp(min=1e-30)
    return (f": max |diff| {gap.max().item():.3g} (relative to max |value| "
            f"{(gap.max() / scale).item():.3g}), non-finite cells equal: "
            f"{torch.equal(old.isfinite(), new.isfinite())}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--record", metavar="FILE")
    group.add_argument("--check", metavar="FILE")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (the pinned file was recorded with 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    numbers = compute()
    if args.record:
        torch.save(numbers, args.record)
        print(f"recorded {len(numbers)} tensors to {args.record}")
        return 0
    pinned = torch.load(args.check)
    bad = [k for k in pinned if k not in numbers or not torch.equal(pinned[k], numbers[k])]
    bad += [k for k in numbers if k not in pinned]
    for key in bad:
        print(f"MISMATCH {key}{_difference(pinned.get(key), numbers.get(key))}")
    print(f"{len(pinned) - len(bad)} of {len(pinned)} pinned tensors bit-identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
