"""The shared, chunked readout behind every lens: residuals in, LensResult out.

Memory stays bounded by streaming ``chunk_size`` (batch x position) rows at a time through
three reused ``[chunk_size, d_vocab]`` buffers: the final layer's probabilities, the
current layer's logits, and scratch. Nothing ``[layer, batch, pos, d_vocab]``-sized
exists unless ``keep_logits=True``. The per-row statistics (:mod:`tl_lenses.row_stats`)
take one compiled pass over each layer's logits on large readouts, so the cost stays close
to the unembedding matmul's.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_lenses.inputs import single_token, str_tokens
from tl_lenses.lenses.base import Lens
from tl_lenses.result import LensResult, empty_like_cells
from tl_lenses.row_stats import row_stats, use_fused, warm_up
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
    fused: bool | None = None,
) -> LensResult:
    """Decode each residual in ``resids`` (one per hook name) through ``lens``.

    ``fused``: compute the per-row statistics in one ``torch.compile``d pass over the
    logits instead of five (:mod:`tl_lenses.row_stats`); None (auto) does so for large
    readouts on the CPU, where the seconds of compiling pay off, and whenever the kernel is
    already compiled. Both paths give the same top-k and ranks and the same sums to
    float rounding.

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
        n_rows = final_rows.shape[0]
        # A matmul never exceeds chunk_size rows (rows x stacked layers), nor all the rows.
        size = min(chunk_size, n_rows * len(rows))
        work = _Workspace(size, unembed.d_vocab, final_rows.shape[-1], final_rows.device)
        work.fused = use_fused(fused, final_rows.device, unembed.d_vocab,
                               unembed.W_U.dtype, n_rows * len(rows))
        work.strict = fused is True
        for start in _chunks(n_rows, chunk_size, progress):
            stop = min(start + chunk_size, n_rows)
            _read_chunk(lens, unembed, rows, final_rows, hook_names, slice(start, stop),
                        flat_targets, isinstance(target, str) and target == "final", cells, k,
                        chunk_size, work)
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


class _Workspace:
    """Flat buffers reused by every chunk: the first touch of fresh memory (page faults)
    costs as much as the statistics, so each readout allocates its buffers once."""

    def __init__(self, size: int, vocab: int, d_model: int, device):
        self.fused = self.warm = self.strict = False
        self.logits = torch.empty(size * vocab, device=device)
        self.scratch = torch.empty(size * vocab, device=device)
        self.probs = torch.empty(size * vocab, device=device)
        self.translated = torch.empty(size * d_model, device=device)

    @staticmethod
    def view(buffer: Tensor, *shape: int) -> Tensor:
        return buffer[: math.prod(shape)].view(*shape)


def _read_chunk(lens, unembed, rows, final_rows, hook_names, span, flat_targets,
                fill_final_targets, cells, k, chunk_size, work: _Workspace):
    """Statistics for the rows in ``span``, for every layer, written into ``cells``.

    When ``span`` is short (a short prompt), several layers share one matmul of about
    ``chunk_size`` rows: the unembedding streams W_U once per matmul, so tall matmuls are
    what keep the readout near the speed of a bare unembedding.
    """
    n, vocab, d_model = span.stop - span.start, unembed.d_vocab, final_rows.shape[-1]
    final_logits = unembed(final_rows[span], out=work.view(work.logits, n, vocab))
    final_lse = torch.logsumexp(final_logits, dim=-1)
    final_probs = torch.sub(final_logits, final_lse[:, None],
                            out=work.view(work.probs, n, vocab)).exp_()
    final_neg_entropy = torch.linalg.vecdot(final_probs, final_logits) - final_lse
    if fill_final_targets:
        flat_targets[span] = final_logits.argmax(dim=-1)
    targets = None if flat_targets is None else flat_targets[span]
    n_layers = len(rows)
    group = max(1, min(n_layers, chunk_size // n))
    for first in range(0, n_layers, group):
        layers = range(first, min(first + group, n_layers))
        g = len(layers)
        translated = work.view(work.translated, g, n, d_model)
        for i, layer in enumerate(layers):
            translated[i] = lens.translate(rows[layer][span], hook_names[layer])
        logits = unembed(translated, out=work.view(work.logits, g, n, vocab))
        _cell_stats(logits, work.view(work.scratch, g, n, vocab), final_probs,
                    final_neg_entropy, targets, k, work,
                    {key: (None if value is None else value[first:first + g, span])
                     for key, value in cells.items()})


def _cell_stats(logits, scratch, final_probs, final_neg_entropy, targets, k, work, out):
    """Top-k, entropy, KL(final || layer) and target stats of ``[layers, rows]`` logits.

    The final layer's ``[rows, d_vocab]`` probabilities broadcast over layers.
    """
    n_layers = logits.shape[0]
    if targets is None:
        chosen = logits.new_full((n_layers, logits.shape[1], 1), torch.inf)
    else:
        index = targets.clamp_min(0)[None, :, None].expand(n_layers, -1, 1)
        chosen = logits.gather(-1, index)                               # [layers, rows, 1]
    if work.fused and not work.warm:
        # compile before the first use; falls back to eager (auto) or raises (fused=True)
        work.fused = work.warm = warm_up(logits, final_probs, chosen, strict=work.strict)
    stats = row_stats(logits, final_probs, chosen, k, scratch, work.fused)
    lse = stats.lse
    out["top_ids"].copy_(stats.top_ids)
    out["top_logits"].copy_(stats.top_values)
    out["top_probs"].copy_(torch.exp(stats.top_values - lse[..., None]))
    out["entropy"].copy_(lse - stats.e_z / stats.sum_exp)          # H = lse - E_p[z]
    # KL(f || l) = E_f[log p_f] - E_f[z_l] + lse_l. The two expectations are ~|z| in size,
    # so float32 leaves ~1e-5 nats of rounding (clamped: KL is never negative).
    out["kl_to_final"].copy_((final_neg_entropy - stats.e_f + lse).clamp_min_(0.0))
    if out["logits"] is not None:
        out["logits"].copy_(logits)
    if targets is not None:
        valid = targets >= 0
        out["target_rank"].copy_(torch.where(valid, stats.n_above.long() + 1, -1))
        nan = torch.tensor(float("nan"), device=logits.device)
        out["target_logit"].copy_(torch.where(valid, chosen[..., 0], nan))
        out["target_prob"].copy_(torch.where(valid, torch.exp(chosen[..., 0] - lse), nan))
