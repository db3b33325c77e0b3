"""GPU check: CUDA == CPU on tiny models of both backends, then the GPU figures in one run.

    PYTHONPATH=. python benchmarks/gpu_check.py            # on a CUDA machine, < 5 minutes
    PYTHONPATH=. python benchmarks/gpu_check.py --cpu-smoke  # everything at tiny sizes on the CPU

(a) Correctness: the same tiny random weights (Llama/GQA and GPT-2, HookedTransformer and
TransformerBridge) built on the CPU and on the device; the logit lens (top-k, entropy, KL,
ranks), DLA parts with neurons, a patchscope's logits and greedy generation, a patchscope
sweep, tuned-lens training and LRE must agree; bf16 and fp16 models must run every method and
agree with float32 on the top-1 almost everywhere. With two or more GPUs, a tiny model split
over two of them (TL's ``n_devices``, an accelerate device map on the Bridge) must train the
tuned lens the one-GPU model does (skipped with fewer).

(b) Speed on a SmolLM2-135M-shaped model with random weights built from its config (no
download): the all-layer readout (31 rows, vocab 49152; top-5, entropy, KL, rank of the final
top-1) at 16 x 256 and 64 x 1024 tokens against the bare unembedding matmul (float32, same
rows, one reused buffer) and TL's naive ``accumulated_resid(apply_ln=True) @ W_U`` (skipped
where it would not fit), with peak memory above the cache; fast-recipe tuned-lens training
tokens/s (compiled fused KL vs eager, same held-out KL); DLA with neurons at 8 x 128; a
31 x 31 patchscope sweep; LRE n = 8.

Prints a table; writes ``$OUT/gpu_check.json`` when ``$OUT`` is set (or ``--json PATH``). Exits
1 when a correctness check fails. Needs only tl_lenses' own dependencies; where ``datasets``
or ``pandas`` cannot be imported (TransformerLens imports them at start-up, this script uses
neither) they are replaced by empty stand-ins, and the script says so.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.metadata
import json
import os
import sys
import time
import traceback
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NOTES: list[str] = []


def _stand_in(name: str, submodules: tuple[str, ...] = ()) -> None:
    """An importable empty module whose every attribute is a placeholder class."""
    def placeholder(attr: str):
        if attr.startswith("__"):  # inspect and importlib probe dunders: say there are none
            raise AttributeError(attr)
        return type(attr, (), {})

    def make(full: str):
        module = types.ModuleType(full)
        module.__spec__ = importlib.machinery.ModuleSpec(full, None)
        module.__path__ = []  # a package, so submodules import
        module.__getattr__ = placeholder
        sys.modules[full] = module
        return module

    make(name)
    for sub in submodules:
        make(f"{name}.{sub}")


def _import_or_stand_in() -> None:
    for name, subs in (("pandas", ()), ("datasets", ("arrow_dataset", "iterable_dataset",
                                                     "load"))):
        try:
            __import__(name)
        except Exception as error:  # missing, or its own dependencies (pyarrow) missing
            _stand_in(name, subs)
            NOTES.append(f"{name} unavailable ({type(error).__name__}: {error}); stand-in used")


_import_or_stand_in()

import torch  # noqa: E402

from tl_lenses._compat import HAS_HOOKED  # noqa: E402
from tl_lenses.attribution.core import dla  # noqa: E402
from tl_lenses.hooks import resid_names  # noqa: E402
from tl_lenses.lenses.attribute.lre import estimate_lre  # noqa: E402
from tl_lenses.lenses.attribute.relations import Relation, Sample  # noqa: E402
from tl_lenses.lenses.logit import logit_lens  # noqa: E402
from tl_lenses.lenses.tuned.train import train_tuned_lens  # noqa: E402
from tl_lenses.models import llama_config  # noqa: E402
from tl_lenses.patchscopes.core import patchscope  # noqa: E402
from tl_lenses.patchscopes.sweep import patchscope_sweep  # noqa: E402
from tl_lenses.readout.apply import apply_lens, apply_lens_to_cache  # noqa: E402
from tl_lenses.readout.unembed import Unembed  # noqa: E402
from tl_lenses.tiny import byte_tokenizer, tiny_bridge, tiny_hooked, tiny_spread  # noqa: E402

PROMPTS = ["The cat sat on the mat.", "Paris is in France, Rome"]
TOY = Relation("toy", ("{} =",), tuple(Sample(s, o) for s, o in
                                         zip("abcdefghijkl", "mnopqrstuvwx")))
GiB = 2**30


# ---------------------------------------------------------------------------------- (a)

def _close(a, b) -> float:
    """max |a - b| / (max |b| + 1e-6) over the finite cells: one number per quantity.

    Missing cells (NaN: padding, or no target) must be missing in both, else inf.
    """
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.equal(a.isnan(), b.isnan()):
        return float("inf")
    keep = b.isfinite()
    a, b = a[keep], b[keep]
    return float((a - b).abs().max() / (b.abs().max() + 1e-6)) if b.numel() else 0.0


def _same(a, b) -> float:
    """The share of equal entries."""
    return float((a.cpu() == b.cpu()).double().mean())


def _build(backend: str, arch: str, device, dtype=torch.float32):
    make = tiny_hooked if backend == "hooked" else tiny_bridge
    return make(arch, device=device, dtype=dtype)


def _method_outputs(model, *, train_steps: int = 8, small: bool = False):
    """Every method once on ``model``: the numbers to compare across devices (``small``:
    fewer layers, steps and subjects, for the CPU smoke run)."""
    out = {}
    lens = logit_lens(model, PROMPTS, target="next")
    out["logit lens"] = lens
    out["dla"] = dla(model, PROMPTS[0], ("a", "b"), neurons=True, positions=None)
    out["patchscope"] = patchscope(model, PROMPTS[0], PROMPTS[1], source_layer=1,
                                   target_layer=2, max_new_tokens=4)
    out["sweep"] = patchscope_sweep(model, PROMPTS, PROMPTS[1],
                                    source_layers=[0, 3] if small else [0, 1, 3],
                                    target_layers=[1] if small else [1, 2], k=3,
                                    max_new_tokens=2)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (16, 24), generator=gen)
    trained = train_tuned_lens(model, tokens[:12], steps=2 if small else train_steps,
                               batch_size=4, ls_tokens=96 if small else 192, progress=False)
    held = apply_lens(model, tokens[12:], trained.lens, target=None)
    out["tuned lens"] = (trained, held)
    out["lre"] = estimate_lre(model, TOY, 1, n=2 if small else 4)
    return out


def _compare(dev, ref) -> dict[str, tuple[bool, str]]:
    """{check: (passed, detail)} for device outputs against CPU float32 ones."""
    checks = {}
    a, b = dev["logit lens"], ref["logit lens"]
    top, rank = _same(a.top_ids[..., 0], b.top_ids[..., 0]), _same(a.target_rank, b.target_rank)
    d = max(_close(a.entropy, b.entropy), _close(a.kl_to_final, b.kl_to_final),
            _close(a.top_probs, b.top_probs))
    checks["logit lens top-k/KL/rank"] = (top >= 0.99 and rank >= 0.99 and d < 1e-3,
                                          f"top-1 same {top:.4f}, rank same {rank:.4f}, "
                                          f"rel diff {d:.1e}")
    d = _close(dev["dla"].values, ref["dla"].values)
    checks["DLA parts (neurons)"] = (d < 1e-3, f"rel diff {d:.1e}")
    a, b = dev["patchscope"], ref["patchscope"]
    d, gen = _close(a.logits, b.logits), torch.equal(a.generated_ids.cpu(), b.generated_ids.cpu())
    checks["patchscope logits+generation"] = (d < 1e-3 and gen,
                                              f"rel diff {d:.1e}, same tokens {gen}")
    same = _same(dev["sweep"].top_ids, ref["sweep"].top_ids)
    checks["patchscope sweep"] = (same >= 0.99, f"top-k same {same:.3f}")
    (_, ha), (_, hb) = dev["tuned lens"], ref["tuned lens"]
    ka, kb = float(ha.kl_to_final.mean()), float(hb.kl_to_final.mean())
    checks["tuned-lens training"] = (abs(ka - kb) <= 0.05 * kb + 1e-3,
                                     f"held-out KL {ka:.4f} vs CPU {kb:.4f}")
    d = max(_close(dev["lre"].weight, ref["lre"].weight), _close(dev["lre"].bias,
                                                                  ref["lre"].bias))
    checks["LRE"] = (d < 1e-3, f"rel diff {d:.1e}")
    return checks


def _compare_low_precision(dev, ref) -> tuple[bool, str]:
    a, b = dev["logit lens"], ref["logit lens"]
    top = _same(a.top_ids[..., 0], b.top_ids[..., 0])
    pairs = [(a.entropy, b.entropy), (a.kl_to_final, b.kl_to_final),
             (dev["dla"].values, ref["dla"].values),
             (dev["patchscope"].logits, ref["patchscope"].logits),
             (dev["lre"].weight, ref["lre"].weight)]
    # finite wherever float32 is (pad cells are missing, NaN, in both)
    finite = all(bool((t.isfinite().cpu() | ~r.isfinite().cpu()).all()) for t, r in pairs)
    kl = float(dev["tuned lens"][1].kl_to_final.mean())
    return (finite and top >= 0.85, f"top-1 same as float32 {top:.3f}, finite {finite}, "
            f"tuned held-out KL {kl:.3f}")


def correctness(device, *, smoke: bool = False) -> dict[str, dict]:
    """Each check per (arch, backend); the smoke run takes two of the four and bf16 only."""
    rows = {}
    configs = [(a, b) for a in ("llama-gqa", "gpt2") for b in ("hooked", "bridge")]
    if smoke:
        configs = [("llama-gqa", "hooked"), ("gpt2", "bridge")]
    if not HAS_HOOKED:  # TL 4.x: the Bridge is the one backend
        configs = [(a, "bridge") for a in dict.fromkeys(a for a, _ in configs)]
    for arch, backend in configs:
        tag = f"{arch}/{backend}"
        try:
            ref = _method_outputs(_build(backend, arch, "cpu"), small=smoke)
            model = _build(backend, arch, device)
            dev = _method_outputs(model, small=smoke)
            for check, (ok, detail) in _compare(dev, ref).items():
                rows[f"{tag}: {check}"] = {"ok": ok, "detail": detail}
            kinds = {p.device.type for p in model.parameters()}
            ok = kinds == {device.type} == {torch.device(model.cfg.device).type}
            rows[f"{tag}: weights and cfg.device"] = {
                "ok": ok, "detail": f"weights on {sorted(kinds)}, cfg.device {model.cfg.device}"}
            for dtype in (torch.bfloat16,) if smoke else (torch.bfloat16, torch.float16):
                low = _method_outputs(_build(backend, arch, device, dtype), train_steps=4,
                                      small=smoke)
                ok, detail = _compare_low_precision(low, ref)
                rows[f"{tag}: {str(dtype)[6:]} every method"] = {"ok": ok, "detail": detail}
        except Exception as error:
            rows[f"{tag}: ran"] = {"ok": False, "detail": f"{type(error).__name__}: {error}",
                                   "traceback": traceback.format_exc()}
    return rows


def spread_checks(*, smoke: bool = False) -> dict[str, dict]:
    """A tiny model split over two GPUs as TL splits it trains the lens the whole one does.

    HookedTransformer ``n_devices=2`` (TL 3.x) and an accelerate-dispatched Bridge, each
    against the same weights on the first GPU: the fast and reference recipes' lenses and
    loss curves, and the lens's device (the unembedding's, the second GPU). Skipped with
    fewer than two CUDA devices: TL splits over GPUs only (``n_devices`` is CUDA-only; a
    Bridge ``device_map`` mixing CPU and GPU is CPU offload, which TL refuses). ``smoke``:
    the same code over ("cpu", "cpu").
    """
    n = torch.cuda.device_count()
    if not smoke and n < 2:
        return {"spread over 2 GPUs: skipped": {
            "ok": True, "detail": f"needs >= 2 CUDA devices, found {n} (TL splits over GPUs "
                                  "only)"}}
    pair = ("cpu", "cpu") if smoke else ("cuda:0", "cuda:1")
    rows = {}
    tokens = torch.randint(0, 256, (16, 24), generator=torch.Generator().manual_seed(0))
    for backend in ("hooked", "bridge") if HAS_HOOKED else ("bridge",):
        tag = f"spread {backend} over {'+'.join(pair)}"
        try:
            split, whole = tiny_spread("llama-gqa", backend, pair), _build(backend,
                                                                        "llama-gqa", pair[0])
            placed = sorted({str(p.device) for p in split.parameters()})
            for recipe, tolerance in (("reference", 1e-4), ("fast", 1e-2)):
                kw = dict(recipe=recipe, steps=4, batch_size=4, ls_tokens=192, progress=False)
                a = train_tuned_lens(split, tokens, **kw)
                b = train_tuned_lens(whole, tokens, **kw)
                d = max(_close(a.lens.state_dict()[k], v) for k, v in b.lens.state_dict().items())
                dl = _close(torch.tensor(a.losses), torch.tensor(b.losses))
                # the lens on the unembedding's GPU, and the weights really on two GPUs
                where = torch.device(a.lens_device) == torch.device(pair[1]) and \
                    (smoke or len(placed) == 2)
                rows[f"{tag}: {recipe} lens"] = {
                    "ok": d < tolerance and dl < tolerance and where,
                    "detail": f"weights on {placed}, lens on {a.lens_device}; lens rel diff "
                              f"{d:.1e}, losses rel diff {dl:.1e} vs one device"}
        except Exception as error:
            rows[f"{tag}: ran"] = {"ok": False, "detail": f"{type(error).__name__}: {error}",
                                   "traceback": traceback.format_exc()}
    return rows


# ---------------------------------------------------------------------------------- (b)

def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int = 2):
    """(best seconds, peak bytes above the memory in use before, result); one warm-up call."""
    cuda = torch.device(device).type == "cuda"
    result = fn()  # warm-up: compiles, cuBLAS handles
    _sync(device)
    best, peak = float("inf"), None
    for _ in range(repeat):
        result = None
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        result = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
        if cuda:
            peak = max(peak or 0, torch.cuda.max_memory_allocated() - base)
    return best, peak, result


def smol_shaped(device, *, smoke: bool):
    """A random-weight model of SmolLM2-135M's shape (or a tiny one for the smoke run)."""
    from transformers import LlamaConfig

    shape = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)
    if smoke:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
    hf_config = LlamaConfig(**shape, max_position_embeddings=2048, rms_norm_eps=1e-5,
                            rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    if not HAS_HOOKED:  # TL 4.x: the same shape as a Bridge around the HF model
        from transformers import LlamaForCausalLM

        from tl_lenses.models import bridge_from_hf

        hf_model = LlamaForCausalLM(hf_config).to(device).eval()
        return bridge_from_hf(hf_model, byte_tokenizer(), "LlamaForCausalLM", "smol-shaped")
    cfg = llama_config(hf_config, n_ctx=1024, device=str(device))
    from transformer_lens import HookedTransformer

    return HookedTransformer(cfg, tokenizer=byte_tokenizer(), move_to_device=True).eval()


def naive(model, cache, k: int = 5):
    stack = cache.accumulated_resid(apply_ln=True)
    logits = stack @ model.W_U + model.b_U
    logp = logits.log_softmax(-1)
    top = logits.topk(k, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    kl = (logp[-1].exp() * (logp[-1] - logp)).sum(-1)
    final_top = logits[-1].argmax(-1)
    index = final_top[None, ..., None].expand(len(logits), -1, -1, 1)
    rank = (logits > logits.gather(-1, index)).sum(-1) + 1
    return top, entropy, kl, rank


def floor(model, cache, rows_per_matmul: int = 8192):
    """The bare float32 unembedding matmul of the same rows, into one reused buffer."""
    unembed = Unembed.from_model(model).at_least_float32()
    names = resid_names(model)
    n = cache[names[0]].shape[0] * cache[names[0]].shape[1]
    out = torch.empty(min(n, rows_per_matmul), unembed.d_vocab, device=unembed.W_U.device)
    for name in names:
        x = unembed.normalize(cache[name].reshape(n, -1).float())
        for start in range(0, n, rows_per_matmul):
            block = x[start:start + rows_per_matmul]
            torch.matmul(block, unembed.W_U, out=out[: block.shape[0]])
    return out


def readout_figures(model, device, shapes, *, smoke: bool) -> list[dict]:
    rows = []
    names = set(resid_names(model))
    for batch, pos in shapes:
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen).to(device)
        with torch.inference_mode():
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
            row = {"shape": f"{batch}x{pos}", "rows": len(names) * batch * pos}
            t_floor, m_floor, _ = timed(lambda: floor(model, cache), device)
            t_ours, m_ours, ours = timed(lambda: apply_lens_to_cache(
                model, cache, tokens, k=5, target="final"), device)
            t_eager, m_eager, eager = timed(lambda: apply_lens_to_cache(
                model, cache, tokens, k=5, target="final", fused=False), device, repeat=1)
            row.update(floor_s=t_floor, floor_peak=m_floor, ours_s=t_ours, ours_peak=m_ours,
                       ratio=t_ours / t_floor, eager_s=t_eager, eager_peak=m_eager,
                       same_top_ids=_same(ours.top_ids, eager.top_ids),
                       same_ranks=_same(ours.target_rank, eager.target_rank))
            need = 4 * row["rows"] * model.cfg.d_vocab * 4      # ~4 float32 logit tensors
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
                free = torch.cuda.mem_get_info()[0]
            else:
                free = 8 * GiB
            if need < 0.8 * free:
                try:
                    t_naive, m_naive, ref = timed(lambda: naive(model, cache), device, repeat=1)
                    row.update(naive_s=t_naive, naive_peak=m_naive,
                               naive_same_top1=_same(ref[0].indices[..., 0],
                                                     ours.top_ids[..., 0]))
                    del ref
                except torch.cuda.OutOfMemoryError:
                    row["naive_s"] = "out of memory"
            else:
                row["naive_s"] = f"skipped: needs ~{need / GiB:.0f} GiB, {free / GiB:.0f} free"
            cache = None  # free the residuals before the next shape
        rows.append(row)
    return rows


def training_figures(model, device, *, smoke: bool) -> dict:
    seq = 32 if smoke else 128
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (96 if smoke else 1024, seq), generator=gen)
    held = tokens[-8:]
    figures = {}
    for batch in (4, 32):
        stamps = {}
        steps = 6 if smoke else 40

        def clock(step, seconds, lens):  # wall clock after the GPU's queue is done
            _sync(device)
            stamps[step] = time.perf_counter()

        train_tuned_lens(model, tokens[:-8], steps=steps, batch_size=batch, ls_tokens=0,
                         progress=False, callback=clock)
        _sync(device)
        first = 3 if smoke else 5        # after the compiles and cuBLAS warm-up
        span = stamps[steps] - stamps[first]
        figures[f"kl_tokens_per_s_batch{batch}"] = (steps - first) * batch * seq / span
    kls = {}
    for mode in ("compiled", "eager"):
        if mode == "eager":
            os.environ["TL_LENSES_NO_COMPILE"] = "1"
        try:
            start = time.perf_counter()
            result = train_tuned_lens(model, tokens[:-8], steps=8 if smoke else 60,
                                      batch_size=32, ls_tokens=1024 if smoke else 65536,
                                      progress=False)
            _sync(device)
            seconds = time.perf_counter() - start
        finally:
            os.environ.pop("TL_LENSES_NO_COMPILE", None)
        with torch.inference_mode():
            kl = apply_lens(model, held.to(device), result.lens, target=None).kl_to_final
        kls[mode] = {"held_out_kl": float(kl[:-1].mean()), "seconds": seconds,
                     "tokens_per_s": result.tokens_seen / seconds}
    figures["fast_recipe"] = kls
    return figures


def method_figures(model, device, *, smoke: bool) -> dict:
    figures = {}
    gen = torch.Generator().manual_seed(1)
    batch, pos = (2, 16) if smoke else (8, 128)
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen).to(device)
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens)
    figures["dla_neurons_s"] = timed(lambda: dla(model, tokens, (100, 200), neurons=True,
                                                 cache=cache), device)[0]
    cache = None
    layers = list(range(model.cfg.n_layers + 1))
    figures["sweep_cases"] = len(layers) ** 2
    figures["sweep_s"] = timed(lambda: patchscope_sweep(
        model, "Diana, Princess of Wales", "cat -> cat; 1135 -> 1135; hello -> hello; ?",
        source_layers=layers, target_layers=layers, k=5), device, repeat=1)[0]
    figures["lre_n8_s"] = timed(lambda: estimate_lre(model, TOY, min(8, model.cfg.n_layers - 1),
                                                     n=8, method="kv-cache"),
                                device, repeat=1)[0]
    return figures


# ---------------------------------------------------------------------------------- main

def _fmt(value, unit: str = "s") -> str:
    if isinstance(value, str) or value is None:
        return "-" if value is None else value
    if unit == "GiB":
        return f"{value / GiB:.2f} GiB"
    return f"{value:.3f} s"


def report(out: dict) -> None:
    print("\n== correctness: device vs CPU float32 ==")
    for name, row in out["correctness"].items():
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {name:55s} {row['detail']}")
        if "traceback" in row:
            print(row["traceback"])
    print(f"\n== readout ({out['device_name']}) ==")
    print("| tokens | bare matmul | tl_lenses | ratio | peak above cache | eager stats | "
          "naive accumulated_resid @ W_U | same top-k/ranks (ours vs eager) |")
    for r in out.get("readout", []):
        naive_s = r.get("naive_s")
        naive_text = _fmt(naive_s) + (f", {_fmt(r['naive_peak'], 'GiB')}"
                                      if isinstance(naive_s, float) else "")
        print(f"| {r['shape']} | {_fmt(r['floor_s'])} | {_fmt(r['ours_s'])} | "
              f"{r['ratio']:.2f}x | {_fmt(r['ours_peak'], 'GiB')} | {_fmt(r['eager_s'])} | "
              f"{naive_text} | {r['same_top_ids']:.4f} / {r['same_ranks']:.4f} |")
    if "training" in out:
        t = out["training"]
        print("\n== tuned lens, fast recipe ==")
        for key, value in t.items():
            print(f"{key}: {json.dumps(value) if isinstance(value, dict) else f'{value:,.0f}'}")
    if "methods" in out:
        print("\n== other methods ==")
        for key, value in out["methods"].items():
            print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    for note in NOTES:
        print(f"note: {note}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run everything at tiny sizes on the CPU (checks the script)")
    parser.add_argument("--correctness-only", action="store_true")
    parser.add_argument("--json", default=None, help="default: $OUT/gpu_check.json if $OUT")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke to check the script on the CPU")
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    begin = time.perf_counter()
    out = {"device": str(device), "torch": torch.__version__, "notes": NOTES,
           "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "CPU"}
    for dist in ("transformer_lens", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except Exception:  # not installed as a distribution (a bare path): say so
            out[dist] = "unknown"
    print(f"device {out['device_name']}, torch {torch.__version__}, "
          f"TL {out.get('transformer_lens')}, transformers {out.get('transformers')}")
    out["correctness"] = correctness(device, smoke=smoke)
    out["correctness"].update(spread_checks(smoke=smoke))
    print(f"correctness done in {time.perf_counter() - begin:.0f} s", flush=True)
    if not args.correctness_only:
        model = smol_shaped(device, smoke=smoke)
        shapes = [(2, 16), (4, 64)] if smoke else [(16, 256), (64, 1024)]
        for key, fn in (("readout", lambda: readout_figures(model, device, shapes, smoke=smoke)),
                        ("training", lambda: training_figures(model, device, smoke=smoke)),
                        ("methods", lambda: method_figures(model, device, smoke=smoke))):
            try:
                out[key] = fn()
            except Exception as error:
                NOTES.append(f"{key} failed: {type(error).__name__}: {error}")
                traceback.print_exc()
            print(f"{key} done at {time.perf_counter() - begin:.0f} s", flush=True)
    out["seconds"] = time.perf_counter() - begin
    report(out)
    path = args.json or (os.path.join(os.environ["OUT"], "gpu_check.json")
                         if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"wrote {path}")
    return 0 if all(row["ok"] for row in out["correctness"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
