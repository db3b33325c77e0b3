"""Train the ``tuned-lens`` library's own TunedLens for a wall-clock budget (a benchmark driver).

Run by ``benchmarks/bench_tuned_lens.py`` with the python of the library's separate venv
(``benchmarks/tuned_lens_library_env.sh``); it imports the library, never tl_lenses.

    python tuned_lens_library_driver.py --model HF_FOLDER --tokens rows.pt --out DIR \
        --budget 240 --marks 0,60,120,240 --batch-size 4 [--eval-tokens held_out.pt]

What runs is the library's ``tuned_lens.scripts.train_loop.Train`` (the ``tuned-lens train``
command's dataclass), built programmatically with its defaults and ``Train.execute()`` run
unchanged: its ``setup`` (lens ``TunedLens.from_model``, zero-initialised translators for HF
``hidden_states[0 .. L-1]``; optimizer ``ing.Optimizer().create_optim``: SGD, Nesterov
momentum 0.9, lr = lr_scale 1.0 x (1 - 0.9), weight decay 1e-3; scheduler
``create_scheduler``: linear decay to 0 over ``num_steps``, no warm-up for SGD; its
torchdata DataLoader2 with shuffle, seeded by ``--seed``), and its loop (the model forward
with ``output_hidden_states``; target ``final_logits.float().log_softmax``, token shift 0;
per layer, sequentially, the KL loss under ``torch.autocast(device, bfloat16)`` -- here
CPU autocast -- and its own backward; gradient clipping at norm 1.0 over the whole lens;
``opt.step``, ``zero_grad``, ``scheduler.step``).

What the driver replaces, and nothing else:

* ``ing.Data.load`` (HF ``load_dataset`` + ``chunk_and_tokenize`` of a text corpus): the
  dataset is the token rows in ``--tokens`` (an int tensor ``[rows, seq_len]`` saved with
  ``torch.save``: the benchmark's ``split.train``), as a ``datasets.Dataset`` with an
  ``input_ids`` column in torch format, which is what ``chunk_and_tokenize`` returns. Its
  ``nats_to_bpb`` (only used for wandb logging) is computed by decoding the rows.
* ``ing.Model.load`` runs as it is, but its ``AutoModelForCausalLM.from_pretrained`` call goes
  through a shim that drops ``load_in_8bit=False`` (transformers 5 rejects the argument)
  and passes ``torch_dtype`` as ``dtype``. ``--model`` is the converted HF folder of the model
  (no hub access); precision is the library's default ``auto`` (float32 here).
* ``Train._log`` (wandb logging, called after every optimizer step; a no-op without
  ``--wandb``) is where the driver hooks in: it calls the original, then keeps snapshots and
  enforces the time budget (raising an exception out of ``execute``). Its own time is not
  counted. The clock starts when ``Train.setup`` returns (model, data and lens loaded).
* ``num_steps``: the library's linear schedule needs the step count up front. Unless
  ``--num-steps`` is given, it is fitted to the budget after the first step, from that step's
  duration: ``N = max(1, round(budget / t_1))``; the library's ``create_scheduler(opt, N)`` is
  then built and advanced one step (the first step ran at lr factor 1, which is what the
  schedule gives step 0 for any N), so the run follows the library's schedule for
  ``--num_steps N``. Training stops after N steps (the lr is then 0) or when the budget runs
  out, whichever comes first.

Batch: ``--batch-size`` rows of the rows' length per optimizer step (``per_gpu_batch_size``
= batch size, ``tokens_per_step`` = batch size x seq_len, so no gradient accumulation). The
library's defaults would be ``per_gpu_batch_size=1``, ``max_length=2048``,
``tokens_per_step=2**18`` (128 accumulated micro-batches per step) and ``num_steps=250``.

Snapshots: for each mark (seconds), the lens after the last step that ended within it is
saved with the library's ``TunedLens.save`` (``config.json`` + ``params.pt``) into
``OUT/snapshots/<mark>`` (a mark of 0 gives the zero-initialised lens, i.e. the logit lens).
``OUT/result.json`` gives steps, training seconds, the fitted num_steps, the per-step mean
loss (the library's logged bf16 losses, averaged over layers), and each snapshot's
(seconds, step). With ``--eval-tokens`` (held-out rows), after training, each snapshot is
read back with the library's ``TunedLens.from_model_and_pretrained`` and its float32 KL per
layer on those rows (``lens(hidden_states[i], idx=i)`` vs the model's logits, every
position) is added: the benchmark checks that its own evaluation of the imported lens agrees.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# torchdata 0.9 warns, on import, that its datapipes and dataloader2 are deprecated.
warnings.filterwarnings("ignore", category=UserWarning, module=r"torchdata\b.*")

import torch  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="HF model folder (LlamaForCausalLM)")
    parser.add_argument("--tokens", required=True, help="torch.save'd int tensor [rows, pos]")
    parser.add_argument("--out", required=True, help="output folder (must be new or empty)")
    parser.add_argument("--budget", type=float, required=True, help="seconds of training")
    parser.add_argument("--marks", default="", help="snapshot times in seconds, comma-separated"
                        " (the budget is always one)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per optimizer step")
    parser.add_argument("--num-steps", type=int, default=0,
                        help="the library's num_steps; 0: fitted to the budget after step 1")
    parser.add_argument("--seed", type=int, default=42, help="data shuffling (library: 42)")
    parser.add_argument("--eval-tokens", help="torch.save'd held-out rows: each snapshot's "
                        "float32 KL per layer on them goes into result.json")
    return parser.parse_args(argv)


class _Stop(Exception):
    """Raised from the logging hook to leave ``Train.execute`` (budget or num_steps reached)."""


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} is not empty (the library would resume from it)")
    out.mkdir(parents=True, exist_ok=True)
    marks = sorted({float(m) for m in args.marks.split(",") if m.strip()} | {args.budget})

    import tuned_lens.scripts.ingredients as ing
    from datasets import Dataset
    from tuned_lens.scripts.train_loop import Train

    t0 = time.perf_counter()
    _shim_from_pretrained(ing)
    rows = torch.load(args.tokens, map_location="cpu", weights_only=True)
    if rows.dim() != 2 or rows.dtype.is_floating_point:
        raise SystemExit(f"--tokens must hold an int tensor [rows, pos], got {rows.shape}")
    seq_len = rows.shape[1]

    @dataclass
    class RowsData(ing.Data):
        """The benchmark's token rows instead of a tokenized text corpus."""

        def load(self, tokenizer):
            print(f"Using {rows.shape[0]} token rows of {seq_len} from {args.tokens}")
            data = Dataset.from_dict({"input_ids": rows.numpy()})
            n_bytes = sum(len(text.encode("utf-8"))
                          for text in tokenizer.batch_decode(rows.tolist()))
            nats_to_bpb = rows.numel() / n_bytes / math.log(2)
            return data.with_format("torch", columns=["input_ids"]), nats_to_bpb

    @dataclass
    class BudgetedTrain(Train):
        """``Train`` with a wall clock, snapshots and a fitted num_steps, via ``_log``."""

        fixed_steps: int = 0
        clock: dict = field(default_factory=dict)
        history: dict = field(default_factory=lambda: {"loss": [], "times": [],
                                                       "snapshots": {}})

        def setup(self):
            state, model, grad_acc_steps = super().setup()
            print(f"setup took {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            self.state, self.model = state, model
            self.shadow = copy.deepcopy(state.lens)           # the lens at the last step end
            self.shadow_at = (0.0, 0)
            self.pending = list(marks)
            self.steps_target = self.fixed_steps or None
            self.clock.update(start=time.perf_counter(), paused=0.0)
            return state, model, grad_acc_steps

        def elapsed(self) -> float:
            return time.perf_counter() - self.clock["start"] - self.clock["paused"]

        def _log(self, opt, step, losses, tuned_lens, nats_to_bpb):
            seconds = self.elapsed()
            begin = time.perf_counter()
            self.history["loss"].append(
                float(sum(sum(v) / len(v) for v in losses.values()) / len(losses)))
            super()._log(opt, step, losses, tuned_lens, nats_to_bpb)
            done = step + 1
            self.history["times"].append(seconds)
            if self.steps_target is None:                       # fit num_steps to the budget
                self.steps_target = max(1, round(args.budget / seconds))
                self.state.scheduler = self.opt.create_scheduler(opt, self.steps_target)
                self.state.scheduler.step()
                print(f"first step took {seconds:.1f} s: num_steps = {self.steps_target} "
                      f"for a {args.budget:g} s budget", file=sys.stderr)
            while self.pending and self.pending[0] < seconds:   # this step ended past a mark
                self.save(self.pending.pop(0), self.shadow, self.shadow_at)
            self.shadow.layer_translators.load_state_dict(
                tuned_lens.layer_translators.state_dict())
            self.shadow_at = (seconds, done)
            stop = seconds >= args.budget or done >= self.steps_target
            self.clock["paused"] += time.perf_counter() - begin
            if stop:
                raise _Stop

        def save(self, mark, lens, at):
            folder = out / "snapshots" / f"{mark:g}"
            lens.save(folder)
            self.history["snapshots"][f"{mark:g}"] = {"seconds": at[0], "step": at[1],
                                                      "path": str(folder)}

        def finish(self):
            for mark in self.pending:                           # marks after the last step
                self.save(mark, self.shadow, self.shadow_at)
            self.pending = []

    train = BudgetedTrain(
        model=ing.Model(name=args.model), data=RowsData(), opt=ing.Optimizer(),
        dist=ing.Distributed(per_gpu_batch_size=args.batch_size), output=out / "final",
        seed=args.seed, num_steps=10**9 if not args.num_steps else args.num_steps,
        tokens_per_step=args.batch_size * seq_len, fixed_steps=args.num_steps,
    )
    try:
        train.execute()        # returns only if the data or num_steps ran out first
    except _Stop:
        pass
    seconds = train.elapsed()
    train.finish()
    if args.eval_tokens:
        begin = time.perf_counter()
        held = torch.load(args.eval_tokens, map_location="cpu", weights_only=True)
        for snap in train.history["snapshots"].values():
            snap["library_kl"] = library_kl(train.model, snap["path"], held)
        print(f"evaluating {len(train.history['snapshots'])} snapshots took "
              f"{time.perf_counter() - begin:.1f} s", file=sys.stderr)
    steps = train.shadow_at[1]
    result = {"steps": steps, "seconds": seconds, "tokens": steps * args.batch_size * seq_len,
              "num_steps": train.steps_target, "budget_s": args.budget,
              "batch_size": args.batch_size, "seq_len": seq_len, "seed": args.seed,
              "losses": train.history["loss"], "step_end_seconds": train.history["times"],
              "snapshots": train.history["snapshots"],
              "versions": _versions()}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"library: {result['steps']} steps in {seconds:.1f} s of training "
          f"(num_steps {result['num_steps']})", file=sys.stderr)
    return 0


def library_kl(model, folder, tokens, batch_size: int = 8) -> list[float]:
    """Mean KL(final || lens) per translator over ``tokens``, float32, by the library's code.

    The lens is read back with ``TunedLens.from_model_and_pretrained`` (the library's loader)
    and applied with its ``forward(h, idx)`` to ``hidden_states[idx]``; no autocast.
    """
    from tuned_lens import TunedLens

    lens = TunedLens.from_model_and_pretrained(model, str(folder)).float()
    sums = torch.zeros(len(lens), dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start:start + batch_size]
            output = model(input_ids=batch, output_hidden_states=True)
            logp = output.logits.float().log_softmax(-1)
            for i, h in enumerate(output.hidden_states[:-1]):
                logq = lens(h.float(), idx=i).float().log_softmax(-1)
                sums[i] += (logp.exp() * (logp - logq)).sum(-1).double().sum()
    return (sums / tokens.numel()).tolist()


def _shim_from_pretrained(ing) -> None:
    """Let ``ing.Model.load`` run under transformers 5 (no ``load_in_8bit``, ``dtype``)."""
    auto = ing.AutoModelForCausalLM

    class AutoModelForCausalLM:
        @staticmethod
        def from_pretrained(name, **kwargs):
            if kwargs.pop("load_in_8bit", False):
                raise SystemExit("int8 (bitsandbytes) is not supported by this driver")
            if "torch_dtype" in kwargs:
                kwargs["dtype"] = kwargs.pop("torch_dtype")
            return auto.from_pretrained(name, **kwargs)

    ing.AutoModelForCausalLM = AutoModelForCausalLM


def _versions() -> dict:
    import importlib.metadata as md

    return {name: md.version(name) for name in ("tuned-lens", "torch", "torchdata",
                                                 "transformers")}


if __name__ == "__main__":
    sys.exit(main())
