"""Training a tuned lens: the reference recipe and a faster default one.

Both minimise, for every covered layer, KL(final distribution || lens distribution) over
text, with the model frozen; one forward pass of the model per batch serves all layers.

``recipe="reference"`` is the tuned-lens library's: SGD with Nesterov momentum 0.9, lr 0.1
(effective lr 1 after the (1 - momentum) scaling), weight decay 1e-3, linear decay to 0,
gradient clipping at norm 1, the KL summed over layers; float32 unembedding matmuls by default
(the library autocasts its lens to bfloat16: ``bf16=True`` matches it).

``recipe="fast"`` (default) first solves for each layer, in closed form, the affine map whose
output points where the final residual points: a ridge regression (towards the identity)
from accumulated second moments, costing a model forward per batch and no unembedding.
A short KL refinement follows, with Adam and bfloat16 unembedding matmuls (the gradient
tolerates 8-bit mantissas; evaluation stays in float32). See ``docs/tuned_lens.md``.

The KL gradient is taken by hand: d KL / d logits = softmax(lens logits) - p_final, pushed
back through the frozen unembedding with one matmul, so no vocabulary-sized autograd graph
is kept and the final layer's distribution is computed once per batch for all layers.

On CUDA the softmax, the KL and that gradient are one compiled function
(:func:`tl_lenses.devices.compiled`: two passes over the bf16 logits instead of six eager
float32 ones), the default batch is larger (32 rows) and so are the matmuls (up to
``4e8`` logits each), and the per-step losses stay on the GPU until the end, so the GPU
never waits for the host. The CPU path is unchanged.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_lenses import devices
from tl_lenses.hooks import run_cache
from tl_lenses.lenses.tuned.lens import TunedLens
from tl_lenses.models import check_model
from tl_lenses.readout.unembed import Unembed

CHECKPOINT = "checkpoint.pt"
# The tuned-lens library's SGD lr: lr_scale 1 times (1 - momentum 0.9). The optimizer takes
# 0.1 as it is; the (1 - momentum) factor is already in it (applying it again gave 0.01).
REFERENCE_LR = 0.1


@dataclass
class TrainConfig:
    """Settings of :func:`train_tuned_lens`; ``None`` fields take the recipe's default."""

    recipe: str = "fast"                # "fast" or "reference"
    steps: int | None = None            # KL steps (reference 250, fast 30)
    time_budget: float | None = None    # seconds, LS warm start included; lr decays over it
    batch_size: int | None = None       # rows of tokens per step (8; 32 on a GPU)
    lr: float | None = None             # reference 0.1 (SGD), fast 1e-4 (Adam)
    momentum: float = 0.9
    weight_decay: float = 1e-3
    clip: float = 1.0
    bf16: bool | None = None            # reference False, fast True
    ls_tokens: int = 32768              # fast: tokens for the least-squares warm start
    ls_time_fraction: float = 0.5       # ...at most this share of time_budget
    ridge: float = 1e-2                 # ridge towards the identity, relative to E[x x^T]
    max_chunk_elements: int | None = None  # bounds [layers x tokens x d_vocab] per matmul
    #                                        (1e8; 4e8 on a GPU)
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 20
    progress: bool = True

    def resolved(self, device: torch.device | str = "cpu") -> "TrainConfig":
        """The recipe's defaults filled in (batch and matmul sizes depend on ``device``)."""
        if self.recipe not in ("fast", "reference"):
            raise ValueError(f"recipe must be 'fast' or 'reference', got {self.recipe!r}")
        fast = self.recipe == "fast"
        gpu = torch.device(device).type != "cpu"
        return replace(
            self, steps=self.steps if self.steps is not None else (30 if fast else 250),
            lr=self.lr if self.lr is not None else (1e-4 if fast else REFERENCE_LR),
            bf16=self.bf16 if self.bf16 is not None else fast,
            batch_size=self.batch_size if self.batch_size is not None else (32 if gpu else 8),
            max_chunk_elements=self.max_chunk_elements if self.max_chunk_elements is not None
            else (400_000_000 if gpu else 100_000_000),
        )


@dataclass
class TrainResult:
    """The trained lens and its history (per-step mean KL over layers, in nats)."""

    lens: TunedLens
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0
    config: dict = field(default_factory=dict)


def train_tuned_lens(model, tokens: Int[Tensor, "batch pos"], lens: TunedLens | None = None, *,
                     config: TrainConfig | None = None,
                     callback: Callable[[int, float, TunedLens], None] | None = None,
                     resume: bool = False, **overrides) -> TrainResult:
    """Train a tuned lens on ``tokens`` (Belrose et al. 2023: minimise KL(final || lens)).

    ``recipe="fast"`` (default): a closed-form least-squares warm start from accumulated
    second moments, then Adam KL steps with bf16 unembedding matmuls. ``"reference"``: the
    published recipe (SGD with Nesterov momentum 0.9, lr 0.1 x (1 - momentum), weight decay,
    linear decay, clipping). The model is frozen; its weights never change.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge``.
        tokens: int token rows ``[batch, pos]`` (e.g. ``token_split(...).train``).
        lens: the lens to train (default: a fresh full-affine :class:`TunedLens`).
        config: a :class:`TrainConfig`.
        callback: ``callback(step, seconds, lens)`` after the warm start (step 0) and after
            every step; its own time is not counted.
        resume: continue from the checkpoint in ``checkpoint_dir``.
        **overrides: :class:`TrainConfig` fields (``recipe``, ``steps``, ``time_budget``
            in seconds, ``batch_size``, ``lr``, ``seed``, ...).

    Returns:
        A :class:`TrainResult`: the lens, the per-step mean KL over layers (nats), steps,
        tokens seen and seconds.

    Raises:
        ValueError: naming the argument: tokens that are not int ``[batch, pos]`` ids of the
            vocabulary, an unknown ``recipe`` or config field, a lens for another model.

    >>> rows = torch.randint(0, model.cfg.d_vocab, (16, 12), generator=torch.manual_seed(0))
    >>> result = train_tuned_lens(model, rows, steps=2, batch_size=8, progress=False)
    >>> result.steps, len(result.losses) > 0
    (2, True)
    """
    check_model(model)
    cfg = replace(config or TrainConfig(), **overrides).resolved(devices.model_device(model))
    _check_tokens(model, tokens)
    lens = lens if lens is not None else TunedLens.for_model(model)
    if not isinstance(lens, TunedLens):
        raise TypeError(f"lens must be a TunedLens, got {type(lens).__name__}")
    lens.to(devices.model_device(model))
    torch.manual_seed(cfg.seed)
    trainer = _Trainer(model, lens, tokens, cfg, callback)
    if not (resume and trainer.load_checkpoint()):
        if cfg.recipe == "fast" and cfg.ls_tokens > 0:
            trainer.warm_start()
    trainer.run()
    return TrainResult(lens=lens, losses=trainer.loss_values(), steps=trainer.step,
                       tokens_seen=trainer.tokens_seen, seconds=trainer.elapsed(),
                       config=asdict(cfg))


def _check_tokens(model, tokens) -> None:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
        raise ValueError("tokens must be an int tensor of token rows shaped [batch, pos]")
    if tokens.shape[0] < 1 or tokens.shape[1] > model.cfg.n_ctx:
        raise ValueError(f"tokens must hold >= 1 row of <= n_ctx={model.cfg.n_ctx} tokens, "
                         f"got shape {tuple(tokens.shape)}")


class _Trainer:
    """The loop state: batches, optimizer, clock (minus callback time), checkpoints."""

    def __init__(self, model, lens, tokens, cfg: TrainConfig, callback):
        self.model, self.lens, self.tokens, self.cfg = model, lens, tokens, cfg
        self.callback = callback
        self.unembed = Unembed.from_model(model)
        self.W = self.unembed.W_U.detach().to(torch.bfloat16 if cfg.bf16 else torch.float32)
        self.optimizer = _optimizer(lens, cfg)
        self.step, self.tokens_seen = 0, 0
        self.losses: list = []                 # floats, or GPU scalars until loss_values()
        self.batch_offset = 0                  # batches the warm start used
        self.start, self.paused, self.offset = time.perf_counter(), 0.0, 0.0

    def loss_values(self) -> list[float]:
        """The per-step losses as floats (one host sync for all the GPU ones)."""
        pending = [i for i, x in enumerate(self.losses) if isinstance(x, Tensor)]
        if pending:
            values = torch.stack([self.losses[i] for i in pending]).tolist()
            for i, value in zip(pending, values):
                self.losses[i] = value
        return self.losses

    def elapsed(self) -> float:
        return self.offset + time.perf_counter() - self.start - self.paused

    def _report(self) -> None:
        if self.callback is not None:
            begin = time.perf_counter()
            self.callback(self.step, self.elapsed(), self.lens)
            self.paused += time.perf_counter() - begin

    def batch(self, i: int) -> Tensor:
        """Batch ``i`` of a seeded per-epoch shuffle (so a resumed run sees the same data)."""
        n, size = self.tokens.shape[0], min(self.cfg.batch_size, self.tokens.shape[0])
        per_epoch = max(1, n // size)
        epoch, j = divmod(i, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        return self.tokens[order[j * size:(j + 1) * size]].to(self.model.cfg.device)

    def warm_start(self) -> None:
        budget = None if self.cfg.time_budget is None else \
            self.cfg.ls_time_fraction * self.cfg.time_budget
        moments = Moments.zeros(len(self.lens.hook_names), self.lens.d_model)
        n_batches = max(1, -(-self.cfg.ls_tokens // (self.cfg.batch_size * self.tokens.shape[1])))
        bar = _progress(range(n_batches), self.cfg.progress, "least-squares warm start")
        for i in bar:
            resids, final = residuals(self.model, self.lens, self.batch(i))
            moments.add(*regression_pairs(resids, final, self.unembed))
            self.batch_offset = i + 1
            last = i + 1 == n_batches or (budget is not None and self.elapsed() > budget)
            if last or self.callback is not None:     # a callback sees every interim fit
                self._load_solution(moments)
                self._report()
            if last:
                break
        if hasattr(bar, "close"):
            bar.close()

    def _load_solution(self, moments: "Moments") -> None:
        if self.lens.weight is None:
            weight, bias = None, moments.solve_bias(self.cfg.ridge)
        else:
            weight, bias = moments.solve(self.cfg.ridge)
        with torch.no_grad():
            self.lens.bias.copy_(bias.to(self.lens.bias))
            if self.lens.weight is not None:
                self.lens.weight.copy_(weight.to(self.lens.weight))

    def run(self) -> None:
        cfg = self.cfg
        total = None if cfg.time_budget is not None else cfg.steps    # time decides the end
        bar = _progress(None, cfg.progress, f"tuned lens ({cfg.recipe})", total=total,
                        initial=self.step)
        while self.step < cfg.steps and not self._out_of_time():
            self._set_lr()
            self.optimizer.zero_grad(set_to_none=True)
            batch = self.batch(self.batch_offset + self.step)
            per_layer = kl_backward(self.model, self.lens, self.unembed, self.W, batch,
                                    cfg.max_chunk_elements)
            if cfg.clip:
                torch.nn.utils.clip_grad_norm_(self.lens.parameters(), cfg.clip)
            self.optimizer.step()
            self.step += 1
            self.tokens_seen += batch.numel()
            loss = per_layer.mean().detach()
            # float() waits for the GPU; there keep the scalar and read them all at the end.
            self.losses.append(loss if loss.device.type != "cpu" else float(loss))
            if bar is not None:
                bar.update(1)
                if loss.device.type == "cpu" or self.step % 10 == 0:
                    recent = self.loss_values()[-10:]
                    bar.set_postfix(kl=f"{sum(recent) / len(recent):.3f}")
            if cfg.checkpoint_dir and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            self._report()
        if bar is not None:
            bar.close()
        if cfg.checkpoint_dir:
            self.save_checkpoint()

    def _out_of_time(self) -> bool:
        return self.cfg.time_budget is not None and self.elapsed() >= self.cfg.time_budget

    def _set_lr(self) -> None:
        """Linear decay to 0 over the steps or the time budget, whichever ends first."""
        done = self.step / self.cfg.steps
        if self.cfg.time_budget is not None:
            done = max(done, self.elapsed() / self.cfg.time_budget)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * max(0.0, 1.0 - done)

    def save_checkpoint(self) -> None:
        folder = Path(self.cfg.checkpoint_dir)
        folder.mkdir(parents=True, exist_ok=True)
        state = {"lens": self.lens.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "step": self.step, "tokens_seen": self.tokens_seen,
                 "losses": self.loss_values(),
                 "elapsed": self.elapsed(), "hook_names": self.lens.hook_names,
                 "batch_offset": self.batch_offset, "recipe": self.cfg.recipe}
        torch.save(state, folder / (CHECKPOINT + ".tmp"))
        (folder / (CHECKPOINT + ".tmp")).replace(folder / CHECKPOINT)

    def load_checkpoint(self) -> bool:
        path = Path(self.cfg.checkpoint_dir or ".") / CHECKPOINT
        if not self.cfg.checkpoint_dir or not path.is_file():
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"checkpoint {path} is corrupt or truncated: {error}") from None
        if state["hook_names"] != self.lens.hook_names or state["recipe"] != self.cfg.recipe:
            raise ValueError(f"checkpoint {path} is for another lens or recipe")
        self.lens.load_state_dict(state["lens"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.losses, self.offset = list(state["losses"]), state["elapsed"]
        self.batch_offset = state["batch_offset"]
        return True


def _optimizer(lens: TunedLens, cfg: TrainConfig):
    if cfg.recipe == "reference":
        return torch.optim.SGD(lens.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(lens.parameters(), lr=cfg.lr)


def _progress(iterable, enabled: bool, desc: str, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    bar = tqdm(iterable, desc=desc, **kwargs)
    return bar


def residuals(model, lens: TunedLens, tokens: Int[Tensor, "batch pos"]
              ) -> tuple[Float[Tensor, "layer rows d_model"], Float[Tensor, "rows d_model"]]:
    """One forward pass: the residual at every hook point of ``lens`` and the final one."""
    cache = run_cache(model, tokens, [*lens.hook_names, lens.final_name])
    stack = torch.stack([cache[name].reshape(-1, lens.d_model) for name in lens.hook_names])
    return stack.float(), cache[lens.final_name].reshape(-1, lens.d_model).float()


def kl_backward(model, lens: TunedLens, unembed: Unembed, W: Tensor,
                tokens: Int[Tensor, "batch pos"], max_chunk_elements: int
                ) -> Float[Tensor, " layer"]:
    """Accumulate d(sum over layers of mean KL)/d(lens) for one batch; return each layer's KL."""
    resids, final = residuals(model, lens, tokens)
    n_layers, n_rows = resids.shape[:2]
    with torch.no_grad():
        final_logits = unembed(final)
        final_logp = torch.log_softmax(final_logits, dim=-1)
        final_p = final_logp.exp()
        neg_entropy = (final_p * final_logp).sum(-1)                       # [rows]
    chunk = max(1, max_chunk_elements // (n_rows * unembed.d_vocab))
    kls = []
    for start in range(0, n_layers, chunk):
        rows = list(range(start, min(start + chunk, n_layers)))
        normed = unembed.normalize(lens.translate_stack(resids[rows], rows))
        grad, kl = _kl_grad(normed.detach(), W, unembed.b_U, final_p, neg_entropy)
        normed.backward(grad / n_rows)
        kls.append(kl.mean(-1))
    return torch.cat(kls)


def _kl_grad(normed, W, b_U, final_p, neg_entropy):
    """(d sum KL / d normed, KL per row) with the softmax gradient computed in place."""
    with torch.no_grad():
        logits = torch.matmul(normed.to(W.dtype), W)                      # [c, rows, vocab]
        if devices.compile_enabled(logits.device):
            softmax_minus_p, kl = fused_kl_grad(logits, final_p, neg_entropy, b_U)
            return torch.matmul(softmax_minus_p, W.T).float(), kl
        logits = logits.float()
        if b_U is not None:
            logits += b_U.float()
        lse = torch.logsumexp(logits, dim=-1)
        kl = neg_entropy - torch.einsum("crv,rv->cr", logits, final_p) + lse
        logits.sub_(lse[..., None]).exp_().sub_(final_p)                   # softmax - p
        grad = torch.matmul(logits.to(W.dtype), W.T).float()
    return grad, kl


def _kl_grad_terms(logits: Tensor, final_p: Tensor, neg_entropy: Tensor, b_U: Tensor | None):
    """(softmax(z) - p_final in z's dtype, KL(p_final || softmax(z)) per row), float32 inside.

    The eager branch of :func:`_kl_grad` in one function, for ``torch.compile`` to fuse
    into two passes over ``z`` (bf16 in the fast recipe) with no float32 copy of it.
    """
    z = logits.float()
    if b_U is not None:
        z = z + b_U.float()
    lse = torch.logsumexp(z, dim=-1)
    kl = neg_entropy - (z * final_p).sum(-1) + lse
    return (torch.exp(z - lse[..., None]) - final_p).to(logits.dtype), kl


fused_kl_grad = devices.compiled(_kl_grad_terms)


@dataclass
class Moments:
    """Running sums for the least-squares fit of each layer: X^T X, X^T Y, count."""

    xx: Float[Tensor, "layer d_in d_in"]
    xy: Float[Tensor, "layer d_in d_model"]
    count: int = 0

    @classmethod
    def zeros(cls, n_layers: int, d_model: int) -> "Moments":
        """Empty sums for ``n_layers`` translators of width ``d_model`` (float64)."""
        d_in = d_model + 1
        return cls(torch.zeros(n_layers, d_in, d_in, dtype=torch.float64),
                   torch.zeros(n_layers, d_in, d_model, dtype=torch.float64))

    def add(self, x: Float[Tensor, "layer rows d_in"], y: Float[Tensor, "layer rows d_model"]
            ) -> None:
        """Add regression pairs (``x`` ends in the constant feature)."""
        self.xx += torch.bmm(x.transpose(1, 2), x).double().cpu()
        self.xy += torch.bmm(x.transpose(1, 2), y).double().cpu()
        self.count += x.shape[1]

    def solve(self, ridge: float) -> tuple[Float[Tensor, "layer d_model d_model"],
                                           Float[Tensor, "layer d_model"]]:
        """(A, b) with ``[I + A, b]`` the ridge solution shrunk towards ``[I, 0]``.

        Minimises sum ||M x - y||^2 + lam ||M - [I, 0]||^2 with lam = ridge * count *
        mean(diag E[x x^T]), so ``ridge`` is scale-free.
        """
        if self.count == 0:
            raise ValueError("no regression pairs were added")
        d = self.xy.shape[-1]
        lam = ridge * self.xx.diagonal(dim1=1, dim2=2).mean(-1)                # [layer]
        eye = torch.eye(d + 1, dtype=torch.float64)
        prior = torch.eye(d + 1, d, dtype=torch.float64)                      # [I; 0]
        lhs = self.xx + lam[:, None, None] * eye
        rhs = self.xy + lam[:, None, None] * prior
        # lhs is symmetric positive definite: Cholesky is exact here, and batched LU
        # (linalg.solve) trips an MKL bug when torch runs with set_num_threads(2).
        factor, info = torch.linalg.cholesky_ex(lhs)
        if info.any():
            raise ValueError("the least-squares system is singular or not finite (residuals "
                             "with NaN/inf?); raise ridge or check the model's activations")
        solution = torch.cholesky_solve(rhs, factor)                          # M^T: [d+1, d]
        M = solution.transpose(1, 2)                                          # [layer, d, d+1]
        return (M[:, :, :d] - torch.eye(d, dtype=torch.float64)).float(), M[:, :, d].float()

    def solve_bias(self, ridge: float) -> Float[Tensor, "layer d_model"]:
        """B minimising sum ||x_h + b x_1 - y||^2 + lam ||b||^2 (``A`` held at 0)."""
        if self.count == 0:
            raise ValueError("no regression pairs were added")
        d = self.xy.shape[-1]
        lam = ridge * self.xx.diagonal(dim1=1, dim2=2).mean(-1)
        num = self.xy[:, d, :] - self.xx[:, d, :d]                            # sum x_1 (y - x_h)
        return (num / (self.xx[:, d, d] + lam)[:, None]).float()


def regression_pairs(resids: Float[Tensor, "layer rows d_model"],
                     final: Float[Tensor, "rows d_model"], unembed: Unembed
                     ) -> tuple[Float[Tensor, "layer rows d_in"],
                                Float[Tensor, "layer rows d_model"]]:
    """Inputs ``[h; 1] / rms(h)`` and target ``unit(final)`` for the warm start.

    The final norm ignores the scale of its input, so the translated residual need only
    point where the final residual points; dividing by each row's own RMS asks the map to
    do so at the row's own scale, and keeps rows with huge norms from dominating the fit.
    """
    scale = resids.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()           # [layer, rows, 1]
    x = torch.cat([resids * scale, scale], dim=-1)
    target = _unit(final, unembed)
    return x, target.expand(resids.shape[0], -1, -1)


def _unit(resid: Tensor, unembed: Unembed) -> Tensor:
    """The final norm without its weight and bias: what the norm's output is a scaling of."""
    x = resid - resid.mean(-1, keepdim=True) if unembed.kind == "layernorm" else resid
    if unembed.kind == "none":
        return x
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + unembed.eps)
