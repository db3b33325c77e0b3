"""The shared, chunked readout behind every lens: residuals in, LensResult out.

Memory stays bounded by streaming ``chunk_size`` (batch x position) rows at a time through
reused ``[chunk_size, d_vocab]`` buffers: the final layer's probabilities, the current
layer's logits (and scratch for the eager statistics). Nothing
``[layer, batch, pos, d_vocab]``-sized exists unless ``keep_logits=True``. The per-row
statistics (:mod:`tl_lenses.readout._row_stats`) take one C kernel call per layer group,
and the KL's cross term is a d_model-wide dot product, so the cost stays close to the
unembedding matmul's.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_lenses.inputs import single_token, str_tokens
from tl_lenses.readout._row_stats import row_stats, use_fused
from tl_lenses.readout.lens import Lens
from tl_lenses.readout.result import LensResult, empty_like_cells
from tl_lenses.readout.unembed import Unembed

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
    lens: Lens | None,
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

    ``lens=None`` is the logit lens (the identity translation).

    ``fused``: the per-row statistics from tl_lenses' C kernel (True) or from eager torch
    passes (False); None (auto) takes the kernel for float32 on the CPU when it builds
    (:mod:`tl_lenses.readout._row_stats`). Both give the same top-k and ranks, and the same sums to
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
    translate = _identity if lens is None else lens.translate
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
        work = _Workspace(size, min(chunk_size, n_rows), unembed.d_vocab, final_rows.shape[-1],
                          final_rows.device, use_fused(fused, final_rows.device, unembed.W_U.dtype))
        work.final_like = [_same_view(r, final_rows) for r in rows]
        for start in _chunks(n_rows, chunk_size, progress):
            stop = min(start + chunk_size, n_rows)
            _read_chunk(translate, unembed, rows, final_rows, hook_names, slice(start, stop),
                        flat_targets, isinstance(target, str) and target == "final", cells, k,
                        chunk_size, work)
    shaped = {name: (None if value is None else value.reshape(len(resids), batch, n_pos,
                                                              *value.shape[2:]))
              for name, value in cells.items()}
    return LensResult(
        lens=_lens_name(lens), hook_names=list(hook_names),
        tokens=tokens, positions=positions, str_tokens=str_tokens(model, tokens),
        target=description, target_ids=target_ids, tokenizer=getattr(model, "tokenizer", None),
        **shaped,
    )


def _identity(resid: Tensor, hook_name: str) -> Tensor:
    return resid


def _lens_name(lens: Lens | None) -> str:
    return "logit lens" if lens is None else getattr(lens, "name", type(lens).__name__)


def _chunks(n_rows: int, chunk_size: int, progress: bool):
    starts = range(0, n_rows, chunk_size)
    if not progress or len(starts) < 2:
        return starts
    from tqdm.auto import tqdm

    return tqdm(starts, desc="lens readout", unit="chunk")


class _Workspace:
    """Flat buffers reused by every chunk.

    The first touch of fresh memory (page faults) costs as much as the statistics, so each
    readout allocates its buffers once. The eager statistics need a scratch buffer; the
    kernel doesn't.
    """

    def __init__(self, size: int, chunk: int, vocab: int, d_model: int, device, fused: bool):
        self.fused = fused
        self.final_like: list[bool] = []  # rows that are the final residual itself
        self.logits = torch.empty(size * vocab, device=device)
        self.scratch = None if fused else torch.empty(size * vocab, device=device)
        self.final_logits = torch.empty(chunk * vocab, device=device)
        self.probs = torch.empty(chunk * vocab, device=device)
        self.translated = torch.empty(size * d_model, device=device)

    @staticmethod
    def view(buffer: Tensor, *shape: int) -> Tensor:
        return buffer[: math.prod(shape)].view(*shape)


def _read_chunk(translate, unembed, rows, final_rows, hook_names, span, flat_targets,
                fill_final_targets, cells, k, chunk_size, work: _Workspace):
    """Statistics for the rows in ``span``, for every layer, written into ``cells``.

    When ``span`` is short (a short prompt), several layers share one matmul of about
    ``chunk_size`` rows: the unembedding streams W_U once per matmul, so tall matmuls are
    what keep the readout near the speed of a bare unembedding.
    """
    n, vocab, d_model = span.stop - span.start, unembed.d_vocab, final_rows.shape[-1]
    final_logits = unembed(final_rows[span], out=work.view(work.final_logits, n, vocab))
    final = row_stats(final_logits[None], final_logits.new_full((1, n, 1), torch.inf), 1,
                      None if work.fused else work.view(work.scratch, 1, n, vocab), work.fused)
    final_lse = final.lse[0]
    final_neg_entropy = final.e_z[0] / final.sum_exp[0] - final_lse           # E_f[log p_f]
    final_probs = torch.sub(final_logits, final_lse[:, None],
                            out=work.view(work.probs, n, vocab)).exp_()
    # E_{p_f}[z_l] = x_l . (W_U p_f) + b_U . p_f for every layer's normalised x_l: one
    # [n, d_vocab] @ [d_vocab, d_model] matmul per chunk instead of a pass over
    # final_probs and each layer's logits.
    # A soft cap makes the logits non-linear in x: then E_f[z_l] is read off the logits.
    linear = unembed.soft_cap is None
    final_in_model = final_probs @ unembed.W_U.T if linear else None     # [n, d_model]
    final_bias = 0.0 if unembed.b_U is None or not linear else final_probs @ unembed.b_U
    if fill_final_targets:
        flat_targets[span] = final.top_ids[0, :, 0]
    targets = None if flat_targets is None else flat_targets[span]

    def stats(logits, e_f, layers):
        scratch = None if work.fused else work.view(work.scratch, *logits.shape)
        _cell_stats(logits, scratch, e_f, final_neg_entropy, targets, k, work.fused,
                    {key: (None if value is None else value[layers, span])
                     for key, value in cells.items()})

    # Rows that are the final residual, read through an identity translation (the logit
    # lens, the tuned lens' last layer), reuse the final logits instead of a second matmul.
    todo = []
    for layer, name in enumerate(hook_names):
        piece = rows[layer][span]
        if work.final_like[layer] and translate(piece, name) is piece:
            stats(final_logits[None], (final_neg_entropy + final_lse)[None],
                  slice(layer, layer + 1))
        else:
            todo.append(layer)
    for layers in _groups(todo, max(1, chunk_size // n)):
        translated = work.view(work.translated, len(layers), n, d_model)
        for i, layer in enumerate(layers):
            translated[i] = translate(rows[layer][span], hook_names[layer])
        x = unembed.normalize(translated)
        logits = unembed.project(x, out=work.view(work.logits, len(layers), n, vocab))
        if linear:
            e_f = torch.linalg.vecdot(x, final_in_model) + final_bias      # [g, n]
        else:
            e_f = torch.linalg.vecdot(logits, final_probs[None])
        stats(logits, e_f, slice(layers.start, layers.stop))


def _groups(layers: list[int], size: int) -> list[range]:
    """Runs of consecutive layers, at most ``size`` long (so results are written to views)."""
    groups: list[range] = []
    for layer in layers:
        last = groups[-1] if groups else None
        if last is not None and last.stop == layer and len(last) < size:
            groups[-1] = range(last.start, layer + 1)
        else:
            groups.append(range(layer, layer + 1))
    return groups


def _same_view(a: Tensor, b: Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


def _cell_stats(logits, scratch, e_f, final_neg_entropy, targets, k, fused, out):
    """Top-k, entropy, KL(final || layer) and target stats of ``[layers, rows]`` logits.

    ``e_f``: ``E_{p_final}[z]`` per layer and row.
    """
    n_layers = logits.shape[0]
    if targets is None:
        chosen = logits.new_full((n_layers, logits.shape[1], 1), torch.inf)
    else:
        index = targets.clamp_min(0)[None, :, None].expand(n_layers, -1, 1)
        chosen = logits.gather(-1, index)                               # [layers, rows, 1]
    stats = row_stats(logits, chosen, k, scratch, fused)
    lse = stats.lse
    out["top_ids"].copy_(stats.top_ids)
    out["top_logits"].copy_(stats.top_values)
    out["top_probs"].copy_(torch.exp(stats.top_values - lse[..., None]))
    out["entropy"].copy_(lse - stats.e_z / stats.sum_exp)          # H = lse - E_p[z]
    # KL(f || l) = E_f[log p_f] - E_f[z_l] + lse_l. The two expectations are ~|z| in size,
    # so float32 leaves ~1e-5 nats of rounding (clamped: KL is never negative).
    out["kl_to_final"].copy_((final_neg_entropy - e_f + lse).clamp_min_(0.0))
    if out["logits"] is not None:
        out["logits"].copy_(logits)
    if targets is not None:
        valid = targets >= 0
        out["target_rank"].copy_(torch.where(valid, stats.n_above.long() + 1, -1))
        nan = torch.tensor(float("nan"), device=logits.device)
        out["target_logit"].copy_(torch.where(valid, chosen[..., 0], nan))
        out["target_prob"].copy_(torch.where(valid, torch.exp(chosen[..., 0] - lse), nan))
