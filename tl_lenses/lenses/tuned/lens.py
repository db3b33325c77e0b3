"""The tuned lens (Belrose et al. 2023): a learned affine translator per layer, then the logit lens.

Each covered hook point ``l`` gets ``h -> h + A_l h + b_l``. The translator is added
residually and zero-initialised, so a fresh lens *is* the logit lens and weight decay (or a
ridge penalty) pulls it towards the identity rather than towards zero. The final residual
needs no translator: ``translate`` passes it through unchanged.

The parameters of all layers are stacked (``weight[layer, d_model, d_model]``,
``bias[layer, d_model]``) so that training can translate every layer with one batched
matmul. ``weight`` follows ``nn.Linear``'s ``[out, in]`` convention: ``A_l h = weight[l] @ h``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_lenses._ints import is_int
from tl_lenses.hooks import check_hook_names, final_resid_name, resid_names, resolve_layer
from tl_lenses.models import check_model
from tl_lenses.readout.fingerprint import model_info
from tl_lenses.typing import IntLike

KINDS = ("affine", "bias")


class TunedLens(nn.Module):
    """Per-hook-point affine translators into the final layer's basis (a :class:`Lens`).

    Build one for a model with :meth:`for_model`; train it with
    :func:`tl_lenses.lenses.tuned.train.train_tuned_lens`; read with ``apply_lens``.

    >>> lens = TunedLens.for_model(model)                    # doctest: +SKIP
    >>> apply_lens(model, "The capital of France is", lens)  # doctest: +SKIP
    """

    def __init__(self, hook_names: Sequence[str], d_model: int, *, final_name: str,
                 kind: str = "affine", model_info: dict | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        names = list(hook_names)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"hook_names must be distinct and non-empty, got {names}")
        if final_name in names:
            raise ValueError(f"hook_names must not include the final residual {final_name!r}: "
                             "it is decoded as it is and needs no translator")
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        self.hook_names, self.final_name, self.kind = names, final_name, kind
        self.d_model = d_model
        self.model_info = dict(model_info or {})
        self._index = {name: i for i, name in enumerate(names)}
        n = len(names)
        self.bias = nn.Parameter(torch.zeros(n, d_model))
        if kind == "affine":
            self.weight = nn.Parameter(torch.zeros(n, d_model, d_model))
        else:
            self.register_parameter("weight", None)

    @property
    def name(self) -> str:
        """``tuned lens`` or ``tuned lens (bias only)``."""
        return "tuned lens" if self.kind == "affine" else "tuned lens (bias only)"

    @classmethod
    def for_model(cls, model, *, hook_names: Sequence[str] | None = None,
                  layers: IntLike | Sequence[IntLike] | None = None,
                  kind: str = "affine") -> "TunedLens":
        """A fresh (identity) lens for ``model``'s residual stream or a subset of it.

        Default: every ``resid_pre`` (``blocks.0.hook_resid_pre`` is the embedding).
        ``layers`` picks some of them by block index; ``hook_names`` any residual-width hook
        points (``resid_mid``, ``attn_out``, ...). The final ``resid_post`` is dropped from
        either: it needs no translator. ``model`` may be spread over several devices.
        """
        check_model(model, spread=True)
        names = _lens_hook_names(model, hook_names, layers)
        return cls(names, model.cfg.d_model, final_name=final_resid_name(model), kind=kind,
                   model_info=model_info(model))

    def index(self, hook_name: str) -> int:
        """The translator row of ``hook_name`` (ValueError when the lens does not cover it)."""
        try:
            return self._index[hook_name]
        except KeyError:
            raise ValueError(
                f"hook_name {hook_name!r} has no translator in this lens; it covers "
                f"{_summary(self.hook_names)} (and {self.final_name!r} as the identity)"
            ) from None

    def translate(
        self, resid: Float[Tensor, "*rows d_model"], hook_name: str
    ) -> Float[Tensor, "*rows d_model"]:
        """``h + A h + b`` for ``hook_name``'s translator; the final residual unchanged."""
        if hook_name == self.final_name:
            return resid
        i = self.index(hook_name)
        if resid.shape[-1] != self.d_model:
            raise ValueError(f"resid must end in d_model={self.d_model}, got {tuple(resid.shape)}")
        out = resid + self.bias[i].to(resid)                  # resid's device and dtype
        if self.weight is not None:
            out = out + resid @ self.weight[i].to(resid).T
        return out

    def translate_stack(
        self, resids: Float[Tensor, "layer rows d_model"], rows: Sequence[int] | None = None
    ) -> Float[Tensor, "layer rows d_model"]:
        """Translate a stack of residuals, one per translator (or per ``rows``), in one bmm."""
        idx = slice(None) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
        bias = self.bias[idx]
        if resids.shape[0] != bias.shape[0]:
            raise ValueError(f"resids has {resids.shape[0]} layers for {bias.shape[0]} translators")
        out = resids + bias[:, None, :]
        if self.weight is not None:
            out = out + torch.bmm(resids, self.weight[idx].transpose(1, 2))
        return out

    def extra_repr(self) -> str:
        """Kind, width and covered hook points, for ``repr``."""
        return f"kind={self.kind!r}, d_model={self.d_model}, hook_names={_summary(self.hook_names)}"


def _lens_hook_names(model, hook_names, layers) -> list[str]:
    final = final_resid_name(model)
    if hook_names is not None and layers is not None:
        raise ValueError("pass hook_names or layers, not both")
    if hook_names is not None:
        names = check_hook_names(model, hook_names)
    elif layers is not None:
        layers = [layers] if is_int(layers) else list(layers)
        if not layers:
            raise ValueError("layers must name at least one residual-stream layer")
        indices = sorted({resolve_layer(model, l, argument="layers", negative=False)[0]
                          for l in layers})
        names = [resolve_layer(model, l)[1] for l in indices]
    else:
        names = resid_names(model)
    names = [name for name in dict.fromkeys(names) if name != final]
    if not names:
        raise ValueError(f"the lens must cover at least one hook point besides {final!r}")
    return names


def _summary(names: Sequence[str]) -> str:
    if len(names) <= 4:
        return str(list(names))
    return f"[{names[0]!r}, {names[1]!r}, ..., {names[-1]!r}] ({len(names)} hook points)"
