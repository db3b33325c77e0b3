"""The fast recipe's warm start: a closed-form least-squares fit of every translator.

The final norm ignores the scale of its input, so a translator only needs to make
``h + A h + b`` point where the final residual points. For all layers at once, second
moments of ``x = [h; 1] / rms(h)`` and ``y = unit(h_final)`` are accumulated (sums, so
ranks of a distributed run add theirs with one all-reduce) and the ridge regression towards
the identity is solved by Cholesky. See ``docs/tuned_lens.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from tl_lenses.lenses.tuned.distributed import World
from tl_lenses.readout.unembed import Unembed


@dataclass
class Moments:
    """Running sums for the least-squares fit of each layer: X^T X, X^T Y, count."""

    xx: Float[Tensor, "layer d_in d_in"]
    xy: Float[Tensor, "layer d_in d_model"]
    count: int = 0

    @classmethod
    def zeros(cls, n_layers: int, d_model: int, device: torch.device | str = "cpu"
              ) -> "Moments":
        """Empty sums for ``n_layers`` translators of width ``d_model``, float64 on ``device``.

        On a GPU that is the residuals' device: copying the ``[layer, d, d]`` sums to the
        host for every batch would dominate at 7B.
        """
        d_in = d_model + 1
        return cls(torch.zeros(n_layers, d_in, d_in, dtype=torch.float64, device=device),
                   torch.zeros(n_layers, d_in, d_model, dtype=torch.float64, device=device))

    def add(self, x: Float[Tensor, "layer rows d_in"], y: Float[Tensor, "layer rows d_model"]
            ) -> None:
        """Add regression pairs (``x`` ends in the constant feature)."""
        self.xx += torch.bmm(x.transpose(1, 2), x).to(self.xx.device, torch.float64)
        self.xy += torch.bmm(x.transpose(1, 2), y).to(self.xy.device, torch.float64)
        self.count += x.shape[1]

    def reduced(self, world: World) -> "Moments":
        """The sums over every rank (a copy; this rank's own sums are left as they are)."""
        count = world.all_reduce_(torch.tensor([self.count], dtype=torch.float64))
        return Moments(world.all_reduce_(self.xx.clone()), world.all_reduce_(self.xy.clone()),
                       int(count.item()))

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
        eye = torch.eye(d + 1, dtype=torch.float64, device=self.xx.device)
        prior = torch.eye(d + 1, d, dtype=torch.float64, device=self.xx.device)  # [I; 0]
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
        eye_d = torch.eye(d, dtype=torch.float64, device=M.device)
        return (M[:, :, :d] - eye_d).float(), M[:, :, d].float()

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
