"""The training loop: data shares, micro-batches on the clock, all-reduce, checkpoints.

Each step's global batch is cut into micro-batches whose gradients add up (sums, divided by
the step's token count at the end). Each rank takes its share of every global batch and one
all-reduce per step adds the ranks' sums, so N processes make the same steps as one. With a
time budget the micro-batches are sized to rank 0's clock (:mod:`.budget`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import torch
from torch import Tensor

from tl_lenses import devices
from tl_lenses.lenses.tuned.budget import SAFETY, Clock
from tl_lenses.lenses.tuned.checkpoint import (
    load_checkpoint,
    restore_trainer,
    save_checkpoint,
    trainer_state,
)
from tl_lenses.lenses.tuned.config import TrainConfig, TrainResult, _optimizer
from tl_lenses.lenses.tuned.distributed import World
from tl_lenses.lenses.tuned.kl import kl_backward, residuals
from tl_lenses.lenses.tuned.least_squares import Moments, regression_pairs
from tl_lenses.readout.unembed import Unembed
from tl_lenses.streams import TensorRows

logger = logging.getLogger("tl_lenses")


class Trainer:
    """The loop state: data, optimizer, clock, ranks, checkpoints."""

    def __init__(self, model, lens, source, cfg: TrainConfig, callback, world: World,
                 clock: Clock):
        self.model, self.lens, self.source, self.cfg = model, lens, source, cfg
        self.callback, self.world, self.clock = callback, world, clock
        # The lens's device holds the decoder and the KL targets; a model spread over
        # several devices sends each layer's residual there (kl.residuals).
        self.unembed = Unembed.from_model(model, spread=True).to(lens.bias.device)
        self.input_device = devices.input_device(model)
        self.W = self.unembed.W_U.detach().to(torch.bfloat16 if cfg.bf16 else torch.float32)
        self.optimizer = _optimizer(lens, cfg)
        self.step, self.tokens_seen = 0, 0
        self.losses: list = []                 # floats, or GPU scalars until loss_values()
        self.warm_tokens, self.micro_batches, self.warm_seconds = 0, 0, 0.0
        self._first_row_done: float | None = None   # seconds at the end of the first piece
        self._fitted = -1                     # this rank's moments count at the last solve
        self.stop_reason, self.kl_skipped = "steps", False
        self.warm_stop = "none"
        self.batch_rows = cfg.batch_size
        if isinstance(source, TensorRows):
            self.batch_rows = min(cfg.batch_size, source.tokens.shape[0])
        if self.batch_rows % world.size:
            raise ValueError(f"batch_size ({self.batch_rows} rows per step over all "
                             f"processes) must be a multiple of the {world.size} processes")

    def result(self) -> TrainResult:
        """What was trained and done, as a :class:`TrainResult`."""
        return TrainResult(
            lens=self.lens, losses=self.loss_values(), steps=self.step,
            tokens_seen=self.tokens_seen,
            seconds=self.clock.elapsed(), config=asdict(self.cfg),
            warm_start_tokens=self.warm_tokens, stop_reason=self.stop_reason,
            kl_skipped=self.kl_skipped, micro_batches=self.micro_batches,
            world_size=self.world.size, floor_seconds=self._floor(),
            warm_start_seconds=self.warm_seconds, warm_start_stop=self.warm_stop,
            lens_device=str(self.lens.bias.device))

    def _floor(self) -> float:
        """Seconds to the end of the first piece of work plus one solve (see TrainResult)."""
        if self._first_row_done is None:   # not one row fitted: the call was all set-up
            return self.clock.elapsed()
        return self._first_row_done + self.clock.fixed.get("solve", 0.0)

    def warn_if_over(self) -> None:
        """Log when the call overran its budget by more than 10%, and why if it was the floor."""
        budget, seconds = self.cfg.time_budget, self.clock.elapsed()
        if budget is None or seconds <= 1.1 * budget or not self.world.is_main:
            return
        floor = self._floor()
        why = (f"below this call's floor of {floor:.1f} s (set-up, one row's forward pass and "
               "one least-squares solve)" if floor > budget else "the clock misjudged a piece")
        logger.warning("tuned-lens training took %.1f s for time_budget=%.1f s: %s",
                       seconds, budget, why)

    def loss_values(self) -> list[float]:
        """The per-step losses as floats (one host sync for all the GPU ones)."""
        pending = [i for i, x in enumerate(self.losses) if isinstance(x, Tensor)]
        if pending:
            values = torch.stack([self.losses[i] for i in pending]).tolist()
            for i, value in zip(pending, values):
                self.losses[i] = value
        return self.losses

    # --- data and clock ------------------------------------------------------------------

    def _next_local(self) -> Tensor | None:
        """This rank's share of the next global batch; ``None`` when the data ran out."""
        batch = self.source.next_batch(self.batch_rows)
        if batch.shape[0] < self.batch_rows:
            return None
        return batch[self.world.rank::self.world.size].to(self.input_device)

    def _rows_now(self, kind: str, wanted: int, reserve: float, prior=None) -> int:
        """Rows for the next micro-batch, decided by rank 0's clock (0: stop)."""
        if self.cfg.micro_batch_size is not None:
            wanted = min(wanted, self.cfg.micro_batch_size)
        if self.clock.budget is None:
            return wanted
        return self.world.broadcast_int(self.clock.rows_that_fit(kind, wanted, reserve, prior))

    def _pieces(self, rows: Tensor, kind: str, reserve: float, prior=None):
        """Micro-batches of ``rows`` sized to the clock; each one's time is recorded."""
        start = 0
        while start < rows.shape[0]:
            n = self._rows_now(kind, rows.shape[0] - start, reserve, prior)
            if n == 0:
                return
            begin = time.perf_counter()
            yield rows[start:start + n]
            if self.clock.budget is not None and rows.device.type == "cuda":
                torch.cuda.synchronize(rows.device)   # time the work, not its launch
            self.clock.record(kind, time.perf_counter() - begin, n)
            if self._first_row_done is None:
                self._first_row_done = self.clock.elapsed()
            start += n

    def _report(self) -> None:
        if self.callback is not None:
            begin = time.perf_counter()
            self.callback(self.step, self.clock.elapsed(), self.lens)
            self.clock.pause(time.perf_counter() - begin)

    # --- the fast recipe's warm start ------------------------------------------------------

    def warm_start(self) -> None:
        """Accumulate least-squares moments (this rank's rows), sum over ranks, solve.

        At most one pass over the data: ``ls_tokens`` in whole batches, capped at the
        batches an in-memory tensor gives before its rows repeat; a stream stops at its end.
        """
        cfg, moments = self.cfg, Moments.zeros(len(self.lens.hook_names), self.lens.d_model,
                                               self.lens.bias.device)
        per_batch = self.batch_rows * self.source.seq_len
        n_batches, self.warm_stop = max(1, -(-cfg.ls_tokens // per_batch)), "ls_tokens"
        if isinstance(self.source, TensorRows):
            distinct = self.source.batches_before_repeat(self.batch_rows)
            if distinct < n_batches:          # more would re-read rows: the data held fewer
                n_batches, self.warm_stop = distinct, "data"
        bar = _progress(range(n_batches), cfg.progress and self.world.is_main,
                        "least-squares warm start")
        kl_share = None                   # seconds kept for the KL phase, once known
        for i in bar if bar is not None else range(n_batches):
            reserve = self._solve_reserve() + (kl_share or 0.0) + self._end_reserve()
            if self._rows_now("ls", 1, reserve) == 0:
                self.warm_stop = "time_budget"
                break
            batch = self._next_local()
            if batch is None:
                self.stop_reason = self.warm_stop = "data"
                break
            done = self.warm_tokens
            for piece in self._pieces(batch, "ls", reserve):
                moments.add(*regression_pairs(*residuals(self.model, self.lens, piece),
                                              self.unembed))
                self.warm_tokens += piece.numel() * self.world.size
            if self.warm_tokens - done < batch.numel() * self.world.size:
                self.warm_stop = "time_budget"     # the clock cut this batch short
            # A callback sees every interim fit; under a budget the first fit times the solve.
            if self.callback is not None or (i == 0 and self.clock.budget is not None):
                self._fit(moments)
                self._report()
            if kl_share is None and self.clock.budget is not None:
                kl_share = self._kl_share()
        if bar is not None:
            bar.close()
        if moments.count != self._fitted:     # no second solve of the same sums
            self._fit(moments)
        self.warm_seconds = self.clock.elapsed()
        if self.clock.budget is not None and self.world.is_main:
            logger.info("warm start: %d tokens, done at %.1f s of %.1f (solve %.1f s); kept "
                        "%.1f s for KL rows predicted at %.1f s each", self.warm_tokens,
                        self.warm_seconds, self.clock.budget, self.clock.fixed.get("solve", 0),
                        kl_share or 0.0, self._kl_prior())

    def _solve_reserve(self) -> float:
        """Seconds to keep for the least-squares solve (0 without a budget).

        Measured once a solve has run; before that, one layer's factorisation and solve of
        its ``(d_model + 1)``-square system, timed, times the number of layers.
        """
        if self.clock.budget is None or "solve" in self.clock.fixed:
            return self.clock.fixed.get("solve", 0.0)
        if not hasattr(self, "_solve_prior"):
            d, device = self.lens.d_model, self.lens.bias.device
            system = 2.0 * torch.eye(d + 1, dtype=torch.float64, device=device)
            begin = time.perf_counter()
            torch.cholesky_solve(system[:, :d], torch.linalg.cholesky(system))
            self._solve_prior = (time.perf_counter() - begin) * len(self.lens.hook_names)
        return self._solve_prior

    def _fit(self, moments: Moments) -> None:
        begin = time.perf_counter()
        self._fitted = moments.count
        total = moments.reduced(self.world)
        if total.count == 0:             # the budget allowed no batch: the logit lens stays
            return
        if self.lens.weight is None:
            weight, bias = None, total.solve_bias(self.cfg.ridge)
        else:
            weight, bias = total.solve(self.cfg.ridge)
        with torch.no_grad():
            self.lens.bias.copy_(bias.to(self.lens.bias))
            if self.lens.weight is not None:
                self.lens.weight.copy_(weight.to(self.lens.weight))
        self.clock.record("solve", time.perf_counter() - begin)

    def _kl_share(self) -> float:
        """Seconds the warm start leaves for the KL phase (0: it may use the whole budget).

        ``1 - ls_time_fraction`` of the budget, or nothing when not even one KL row is
        predicted to fit there (the KL phase will then be skipped).
        """
        share = (1.0 - self.cfg.ls_time_fraction) * self.clock.budget
        if self.cfg.steps == 0 or self._kl_prior() * SAFETY > share:
            return 0.0
        return share

    def _kl_prior(self) -> float:
        """Predicted seconds per KL row before one is measured.

        A warm-start row's forward pass plus, per layer, two unembedding matmuls and the
        softmax, from a small timed matmul scaled up by its FLOPs (a full-size probe can
        itself blow a small budget: bf16 matmuls without hardware support ran at ~50
        MFLOP/s on this project's AMD CPU).
        """
        if "kl" in self.clock.per_row:
            return self.clock.per_row["kl"]
        if not hasattr(self, "_prior"):
            rows, cols = 16, min(1024, self.W.shape[1])
            x = torch.ones(rows, self.lens.d_model, dtype=self.W.dtype, device=self.W.device)
            begin = time.perf_counter()
            torch.matmul(x, self.W[:, :cols]).float().softmax(-1)
            scale = self.source.seq_len / rows * self.W.shape[1] / cols
            one = (time.perf_counter() - begin) * scale
            self._prior = self.clock.per_row.get("ls", 0.0) + \
                2.5 * len(self.lens.hook_names) * one
        return self._prior

    # --- the KL phase ---------------------------------------------------------------------

    def run(self) -> None:
        """The KL phase: steps until ``steps``, the budget or the data end."""
        cfg = self.cfg
        bar = _progress(None, cfg.progress and self.world.is_main, f"tuned lens ({cfg.recipe})",
                        total=None if cfg.time_budget is not None else cfg.steps,
                        initial=self.step)
        while self.step < cfg.steps and self.stop_reason == "steps":
            if self._rows_now("kl", 1, self._end_reserve(), self._kl_prior_or_none()) == 0:
                self.stop_reason, self.kl_skipped = "time_budget", self.step == 0
                self._log_stop()
                break
            batch = self._next_local()
            if batch is None:
                self.stop_reason = "data"
                break
            loss = self._kl_step(batch)
            if loss is None:                   # the clock left no time for one row
                self.stop_reason, self.kl_skipped = "time_budget", self.step == 0
                self._log_stop()
                break
            self.losses.append(loss)
            if bar is not None:
                bar.update(1)
                if not isinstance(loss, Tensor) or self.step % 10 == 0:
                    recent = self.loss_values()[-10:]
                    bar.set_postfix(kl=f"{sum(recent) / len(recent):.3f}")
            if cfg.checkpoint_dir and self.step % cfg.checkpoint_every == 0:
                self.save()
            self._report()
        if bar is not None:
            bar.close()
        if cfg.checkpoint_dir:
            self.save()

    def _log_stop(self) -> None:
        if self.world.is_main:
            logger.info("KL phase ended by the budget after %d steps: %.1f s left, a KL row "
                        "costs %.1f s (x%.1f safety)", self.step, self.clock.left(),
                        self.clock.per_row.get("kl", self._kl_prior()), SAFETY)

    def _kl_prior_or_none(self) -> float | None:
        """The KL row prior under a budget (else None).

        Without a measured warm-start row (reference recipe, or a warm start that fitted no
        row) it is the unembedding part alone: an unmeasured KL row is never started as a
        blind probe (that overran a 1 s budget by a 7 s row on SmolLM2).
        """
        if self.clock.budget is None:
            return None
        return self._kl_prior()

    def _end_reserve(self) -> float:
        """Seconds to keep for the final checkpoint write."""
        if not self.cfg.checkpoint_dir:
            return 0.0
        if "save" not in self.clock.fixed:  # unmeasured: assume 100 MB/s for lens + Adam
            nbytes = sum(p.numel() * p.element_size() for p in self.lens.parameters())
            return 3 * nbytes / 1e8
        return self.clock.fixed["save"]

    def _kl_step(self, batch: Tensor) -> float | Tensor | None:
        """One optimizer step on this rank's rows (micro-batches) summed over ranks.

        Returns the step's mean KL (a float; a scalar tensor on a GPU), or None if no row
        fitted in the budget.
        """
        self._set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        kl_sums = torch.zeros(len(self.lens.hook_names), device=self.lens.bias.device)
        tokens = 0
        for piece in self._pieces(batch, "kl", self._end_reserve(), self._kl_prior_or_none()):
            n = piece.numel()
            per_layer = kl_backward(self.model, self.lens, self.unembed, self.W, piece,
                                    self.cfg.max_chunk_elements, grad_scale=1.0)
            kl_sums += per_layer.detach() * n
            tokens += n
            self.micro_batches += 1
        if tokens < batch.numel():
            self.stop_reason = "time_budget"   # the clock cut this step short
        total = self._all_reduce(kl_sums, tokens)
        if total == 0:                         # no row fitted: no step (Adam would move)
            return None
        if self.cfg.clip:
            torch.nn.utils.clip_grad_norm_(self.lens.parameters(), self.cfg.clip)
        self.optimizer.step()
        self.step += 1
        self.tokens_seen += total
        loss = (kl_sums / total).mean()
        # float() waits for the GPU; there keep the scalar and read them all at the end.
        return loss if loss.device.type != "cpu" else float(loss)

    def _all_reduce(self, kl_sums: Tensor, tokens: int) -> int:
        """Sum gradients, KL sums and token counts over ranks, in one all-reduce.

        The gradients are then divided by the global token count: those of the mean KL.
        """
        params = list(self.lens.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] +
                         [kl_sums, torch.tensor([float(tokens)], device=kl_sums.device)])
        self.world.all_reduce_(flat)
        # One process knows its count without reading the GPU (no host sync per step).
        total = tokens if self.world.size == 1 else int(flat[-1].item())
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g) / max(total, 1)
            offset += g.numel()
        kl_sums.copy_(flat[offset:offset + kl_sums.numel()])
        return total

    def _set_lr(self) -> None:
        """Linear decay to 0 over the steps or the time budget, whichever ends first."""
        done = self.step / self.cfg.steps
        if self.cfg.time_budget is not None:
            done = max(done, self.clock.elapsed() / self.cfg.time_budget)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * max(0.0, 1.0 - done)

    # --- checkpoints ------------------------------------------------------------------------

    def save(self) -> None:
        """Rank 0 writes lens, optimizer, schedule position, RNG and data position."""
        if not self.world.is_main:
            return
        begin = time.perf_counter()
        save_checkpoint(self.cfg.checkpoint_dir, trainer_state(self))
        self.clock.record("save", time.perf_counter() - begin)

    def load(self) -> bool:
        """Restore from ``checkpoint_dir``; False when there is no checkpoint."""
        state = load_checkpoint(self.cfg.checkpoint_dir)
        if state is not None:
            restore_trainer(self, state)
        return state is not None


def _progress(iterable, enabled: bool, desc: str, **kwargs):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, **kwargs)
