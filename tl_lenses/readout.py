"""The shared, chunked readout behind every lens: residuals in, LensResult out.

Memory stays bounded by streaming ``chunk_size`` (batch x position) rows at a time through
four reused ``[chunk_size, d_vocab]`` buffers: the final layer's logits and probabilities,
the current layer's logits, and scratch. Nothing ``[layer, batch, pos, d_vocab]``-sized
exists unless ``keep_logits=True``. Per layer and row the statistics take one top-k, one exp
pass and a few fused multiply-sums, so the cost stays close to the unembedding matmul.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_lenses.inputs import single_token, str_tokens
from tl_lenses.lenses.base import Lens
from tl_lenses.result import LensResult, empty_like_cells
from tl_lenses.unembed import Unembed

Target = Union[None, str, int, Tensor]
DEFAULT_CHUNK = 256


def resolve_target(model, target: Target, tokens: Tensor) -> tuple[str | None, Tensor | None]:
    """(description, ids[batch, pos] or None) for a target spec.

    ``"final"``: the model's own final top-1 at each position (filled in by the readout);
    ``"next"``: the true next token (-1 at the last position); a one-token string or an id:
    that token everywhere; an int tensor ``[batch, pos]``: per-cell ids (-1 for none).
    """
    if target is None:
        return None, None
    if isinstance(target, Tensor):
        if target.shape != tokens.shape or target.dtype.is_floating_point:
            raise ValueError(
                f"target as a tensor must hold int ids shaped like the tokens "
                f"{tuple(tokens.shape)}, got {target.dtype} {tuple(target.shape)}"
            )
        return "given ids", target.to(tokens.device).long()
    if target == "final":
        return "final top-1", torch.full_like(tokens, -1)
    if target == "next":
        ids = torch.full_like(tokens, -1)
        ids[:, :-1] = tokens[:, 1:]
        return "next token", ids
    token_id = single_token(model, target, argument="target")
    return repr(model.to_string([token_id]) if model.tokenizer else token_id), \
        torch.full_like(tokens, token_id)


def read_lens(
    model,
    lens: Lens,
    resids: Sequence[Float[Tensor, "batch pos d_model"]],
    final_resid: Float[Tensor, "batch pos d_model"],
    hook_names: Sequence[str],
    tokens: Int[Tensor, "batch _"],
    *,
    positions: Sequence[int] | None = None,
    k: int = 5,
    target: Target = "final",
    chunk_size: int = DEFAULT_CHUNK,
    keep_logits: bool = False,
    progress: bool = False,
) -> LensResult:
    """Decode each residual in ``resids`` (one per hook name) through ``lens``.

    ``resids`` and ``final_resid`` cover the positions listed in ``positions`` (all, when
    None) of the prompts in ``tokens``. KL is measured against the model's own final
    distribution (the logit lens of ``final_resid``).
    """
    if len(resids) != len(hook_names):
        raise ValueError(f"got {len(resids)} residuals for {len(hook_names)} hook_names")
    if not isinstance(k, int) or not 1 <= k <= model.cfg.d_vocab:
        raise ValueError(f"k must be an int in [1, d_vocab={model.cfg.d_vocab}], got {k!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    positions = list(range(tokens.shape[1])) if positions is None else list(positions)
    description, target_ids = resolve_target(model, target, tokens)
    if target_ids is not None:
        target_ids = target_ids[:, positions].clone()
    unembed = Unembed.from_model(model).at_least_float32()
    batch, n_pos = final_resid.shape[:2]
    cells = empty_like_cells(
        len(resids), batch, n_pos, k=k, target=target_ids is not None,
        d_vocab=unembed.d_vocab if keep_logits else None, device=final_resid.device,
    )
    flat_targets = None if target_ids is None else target_ids.reshape(-1)
    with torch.inference_mode():
        rows = [r.reshape(-1, r.shape[-1]) for r in resids]
        final_rows = final_resid.reshape(-1, final_resid.shape[-1])
        for start in _chunks(final_rows.shape[0], chunk_size, progress):
            stop = min(start + chunk_size, final_rows.shape[0])
            _read_chunk(lens, unembed, rows, final_rows, hook_names, slice(start, stop),
                        flat_targets, isinstance(target, str) and target == "final", cells, k)
    shaped = {name: (None if value is None else value.reshape(len(resids), batch, n_pos,
                                                              *value.shape[2:]))
              for name, value in cells.items()}
    return LensResult(
        lens=getattr(lens, "name", type(lens).__name__), hook_names=list(hook_names),
        tokens=tokens, positions=positions, str_tokens=str_tokens(model, tokens),
        target=description, target_ids=target_ids, tokenizer=getattr(model, "tokenizer", None),
        **shaped,
    )


def _chunks(n_rows: int, chunk_size: int, progress: bool):
    starts = range(0, n_rows, chunk_size)
    if not progress or len(starts) < 2:
        return starts
    from tqdm.auto import tqdm

    return tqdm(starts, desc="lens readout", unit="chunk")


def _read_chunk(lens, unembed, rows, final_rows, hook_names, span, flat_targets,
                fill_final_targets, cells, k):
    """Statistics for the rows in ``span``, for every layer, written into ``cells``."""
    final_logits = unembed(final_rows[span])                     # [n, d_vocab]
    final_lse = torch.logsumexp(final_logits, dim=-1)
    final_probs = torch.softmax(final_logits, dim=-1)
    if fill_final_targets:
        flat_targets[span] = final_logits.argmax(dim=-1)
    targets = None if flat_targets is None else flat_targets[span]
    logits = torch.empty_like(final_logits)
    scratch = torch.empty_like(final_logits)
    for layer, (resid, name) in enumerate(zip(rows, hook_names)):
        translated = lens.translate(resid[span], name)
        unembed(translated, out=logits)
        _cell_stats(logits, scratch, final_logits, final_probs, final_lse, targets, k,
                    {key: (None if value is None else value[layer, span])
                     for key, value in cells.items()})


def _cell_stats(logits, scratch, final_logits, final_probs, final_lse, targets, k, out):
    """Top-k, entropy, KL(final || layer) and target stats of one chunk of logit rows."""
    top = torch.topk(logits, k, dim=-1)
    row_max = top.values[:, :1]
    torch.sub(logits, row_max, out=scratch).exp_()
    sum_exp = scratch.sum(-1)
    lse = row_max[:, 0] + sum_exp.log()
    out["top_ids"].copy_(top.indices)
    out["top_logits"].copy_(top.values)
    out["top_probs"].copy_(torch.exp(top.values - lse[:, None]))
    # H = lse - E_p[z]; the exp pass above already holds p * sum_exp.
    out["entropy"].copy_(lse - torch.mul(scratch, logits, out=scratch).sum(-1) / sum_exp)
    # KL(f || l) = E_f[z_f - z_l] + lse_l - lse_f; differencing the logits first keeps
    # small divergences accurate (no cancellation between two large sums).
    torch.sub(final_logits, logits, out=scratch)
    kl = torch.mul(scratch, final_probs, out=scratch).sum(-1) + lse - final_lse
    out["kl_to_final"].copy_(kl.clamp_min_(0.0))
    if out["logits"] is not None:
        out["logits"].copy_(logits)
    if targets is not None:
        _target_stats(logits, scratch, lse, targets, out)


def _target_stats(logits, scratch, lse, targets, out):
    valid = targets >= 0
    chosen = logits.gather(1, targets.clamp_min(0)[:, None])           # [n, 1]
    rank = torch.gt(logits, chosen, out=scratch).sum(-1).long() + 1
    out["target_rank"].copy_(torch.where(valid, rank, -1))
    nan = torch.tensor(float("nan"), device=logits.device)
    out["target_logit"].copy_(torch.where(valid, chosen[:, 0], nan))
    out["target_prob"].copy_(torch.where(valid, torch.exp(chosen[:, 0] - lse), nan))
