"""The shared, chunked readout behind every lens: residuals in, LensResult out.

Memory stays bounded by streaming ``chunk_size`` (batch x position) rows at a time through
one reused ``[chunk_size, d_vocab]`` buffer: the final layer's logits, then its
probabilities, then each layer's logits (and scratch for the eager statistics; a
soft-capped model keeps the final ones apart). ``chunk_size=None`` picks the rows per
matmul by device: 256 on the CPU (the buffers stay in cache), on a GPU as many as fit in
``GPU_BUFFER_BYTES`` (about a thousand rows at a 49k vocabulary), since there tall matmuls
and few kernel launches are what count. Nothing
``[layer, batch, pos, d_vocab]``-sized exists unless ``keep_logits=True``. The per-row
statistics (:mod:`tl_lenses.readout._row_stats`) take one C kernel call per layer group on
the CPU (two compiled passes on CUDA), and the KL's cross term is a d_model-wide dot product,
so the cost stays close to the unembedding matmul's. Everything runs on the device of the
residuals (the model's), in float32, and the result's tensors are there too.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_lenses.inputs import Batch, Selection, check_ids, single_token, str_tokens, to_batch
from tl_lenses.readout._row_stats import row_stats, stats_backend
from tl_lenses.readout.lens import Lens
from tl_lenses.readout.result import LensResult, empty_like_cells
from tl_lenses.readout.unembed import Unembed, output_vocab
from tl_lenses.typing import IntLike

Target = Union[None, str, IntLike, Tensor]
DEFAULT_CHUNK = 256
# Float32 [rows, d_vocab] buffers of a GPU readout: well under 1 GB above the cache, with
# room for the result and the top-k's temporaries.
GPU_BUFFER_BYTES = 640 * 2**20


def auto_chunk_size(device: torch.device, d_vocab: int, *, compiled: bool) -> int:
    """Rows per unembedding matmul for ``chunk_size=None``.

    The CPU keeps :data:`DEFAULT_CHUNK` (its buffers fit in cache). Elsewhere the float32
    ``[rows, d_vocab]`` buffers fill :data:`GPU_BUFFER_BYTES`, counted as the three a
    soft-capped model needs (four with the eager statistics' scratch; other models share
    one): a multiple of 64 rows, from 64 to 16384.
    """
    if device.type == "cpu":
        return DEFAULT_CHUNK
    rows = GPU_BUFFER_BYTES // ((3 if compiled else 4) * 4 * d_vocab)
    return max(64, min(16384, rows // 64 * 64))


logger = logging.getLogger("tl_lenses")


def resolve_target(model, target: Target, tokens: Tensor | Batch,
                   selection: Selection | None = None) -> tuple[str | None, Tensor | None]:
    """(description, ids[batch, pos] or None) for a target spec, at ``selection``'s cells.

    ``"final"``: the model's own final top-1 at each position (filled in by the readout);
    ``"next"``: the prompt's own next token (-1 at its last token: a pad is never a
    target; -1 too, with a warning, for a token outside the output vocabulary, which the
    model cannot predict); a one-token string or an id: that token everywhere; an int
    tensor shaped like the tokens: per-token ids (-1 for none). Pad cells get -1 in every
    case. Ids are of the output vocabulary (``W_U``'s columns, ``d_vocab_out``).
    """
    batch = tokens if isinstance(tokens, Batch) else to_batch(model, tokens, argument="tokens")
    selection = selection or batch.select(None)
    if target is None:
        return None, None
    # Targets are read off the logits: ids of the output vocabulary, which TL's algorithmic
    # models make smaller than the input one (d_vocab_out < d_vocab); an id past it was a
    # bare index error in the readout.
    d_out = output_vocab(model)
    if isinstance(target, Tensor) and target.dim() > 0:  # a 0-d tensor is one id (below)
        if target.shape != batch.tokens.shape or target.dtype.is_floating_point \
                or target.dtype == torch.bool:
            raise ValueError(
                f"target as a tensor must hold int ids shaped like the tokens "
                f"{tuple(batch.tokens.shape)}, got {target.dtype} {tuple(target.shape)}"
            )
        check_ids(model, target, "target", allow_none=True, vocab=d_out)
        description, ids = "given ids", target.to(batch.tokens.device).long()
    elif isinstance(target, str) and target == "final":
        description, ids = "final top-1", torch.full_like(batch.tokens, -1)
    elif isinstance(target, str) and target == "next":
        ids = torch.full_like(batch.tokens, -1)
        ids[:, :-1] = batch.tokens[:, 1:]
        ids[~torch.roll(batch.mask, -1, 1) | ~batch.mask] = -1   # the next cell is a pad
        ids[:, -1] = -1
        unreadable = ids >= d_out  # a next token the model cannot predict has no rank
        if unreadable.any():
            logger.warning("target='next': %d next tokens are outside the model's output "
                           "vocabulary [0, %d) and get no rank (-1)", int(unreadable.sum()), d_out)
            ids[unreadable] = -1
        description = "next token"
    else:
        token_id = single_token(model, target, argument="target", vocab=d_out)
        description = repr(model.to_string([token_id]) if model.tokenizer else token_id)
        ids = torch.full_like(batch.tokens, token_id)
    ids = ids.gather(1, selection.columns.to(ids.device))
    return description, ids.masked_fill_(~selection.mask.to(ids.device), -1)


def read_lens(
    model,
    lens: Lens | None,
    resids: Sequence[Float[Tensor, "batch pos d_model"]],
    final_resid: Float[Tensor, "batch pos d_model"],
    hook_names: Sequence[str],
    tokens: Int[Tensor, "batch _"] | Batch,
    *,
    positions: Sequence[IntLike] | Selection | None = None,
    k: int = 5,
    target: Target = "final",
    chunk_size: int | None = None,
    keep_logits: bool = False,
    progress: bool = False,
    fused: bool | None = None,
) -> LensResult:
    """Decode each residual in ``resids`` (one per hook name) through ``lens``.

    ``lens=None`` is the logit lens (the identity translation).

    ``fused``: the per-row statistics from tl_lenses' C kernel (True) or from eager torch
    passes (False); None (auto) takes the kernel for float32 on the CPU when it builds, and
    the compiled statistics on CUDA (:mod:`tl_lenses.readout._row_stats`). All give the same
    top-k and ranks, and the same sums to float rounding. ``chunk_size``: rows per
    unembedding matmul (None: by device, :func:`auto_chunk_size`).

    The residuals may sit anywhere: they are read on the model's device (that of its
    unembedding), and the result's tensors are there too.

    ``resids`` and ``final_resid`` cover the positions ``positions`` selects (a
    :class:`~tl_lenses.inputs.Selection` of ``tokens``, a list of positions, or all when
    None) of the prompts in ``tokens`` (token ids, or a :class:`~tl_lenses.inputs.Batch`
    with its padding). KL is measured against the model's own final distribution (the
    logit lens of ``final_resid``). Pad cells cost nothing: only real cells are decoded,
    and pads read as missing (ids and ranks -1, statistics NaN). A cell whose logits are
    not finite reads the same way, and the readout warns once naming its hook points.
    """
    if len(resids) != len(hook_names):
        raise ValueError(f"got {len(resids)} residuals for {len(hook_names)} hook_names")
    d_out = output_vocab(model)  # top-k of the logits: the output vocabulary
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= d_out:
        raise ValueError(f"k must be an int in [1, d_vocab={d_out}], got {k!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int)
                                   or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if not isinstance(keep_logits, bool) or not isinstance(progress, bool):
        raise ValueError(f"keep_logits and progress must be bools, got {keep_logits!r}, "
                         f"{progress!r}")
    batch = tokens if isinstance(tokens, Batch) else to_batch(model, tokens, argument="tokens")
    selection = positions if isinstance(positions, Selection) else batch.select(positions)
    if selection.columns.shape != final_resid.shape[:2]:
        raise ValueError(f"the residuals cover {tuple(final_resid.shape[:2])} [batch, pos] "
                         f"cells, but the positions select {tuple(selection.columns.shape)}")
    description, target_ids = resolve_target(model, target, batch, selection)
    unembed = Unembed.from_model(model).at_least_float32()
    translate = _identity if lens is None else lens.translate
    device = unembed.W_U.device
    final_like = [_same_view(r, final_resid) for r in resids]  # before any copy
    resids = [r.to(device) for r in resids]
    final_resid = final_resid.to(device)
    if target_ids is not None:
        target_ids = target_ids.to(device)
    backend = stats_backend(fused, device, unembed.W_U.dtype)
    if chunk_size is None:
        chunk_size = auto_chunk_size(device, unembed.d_vocab, compiled=backend != "eager")
    n_batch, n_pos = final_resid.shape[:2]
    real = selection.mask.reshape(-1).to(device)
    every = bool(real.all())
    index = None if every else real.nonzero()[:, 0]
    n_real = n_batch * n_pos if every else len(index)
    cells = empty_like_cells(
        len(resids), 1, n_real, k=k, target=target_ids is not None,
        d_vocab=unembed.d_vocab if keep_logits else None, device=final_resid.device,
    )
    flat_targets = None if target_ids is None else _real(target_ids.reshape(-1), index).clone()
    with torch.inference_mode():
        # Real rows are gathered chunk by chunk: a padded batch never holds a second copy
        # of all its residuals.
        rows = [_RealRows(r.reshape(-1, r.shape[-1]), index) for r in resids]
        final_rows = _RealRows(final_resid.reshape(-1, final_resid.shape[-1]), index)
        # A matmul never exceeds chunk_size rows (rows x stacked layers), nor all the rows.
        size = min(chunk_size, n_real * len(rows))
        work = _Workspace(size, min(chunk_size, n_real), unembed.d_vocab, final_resid.shape[-1],
                          device, backend, shared=unembed.soft_cap is None,
                          dtype=unembed.W_U.dtype)
        work.final_like = final_like
        for start in _chunks(n_real, chunk_size, progress):
            stop = min(start + chunk_size, n_real)
            _read_chunk(translate, unembed, rows, final_rows, hook_names, slice(start, stop),
                        flat_targets, isinstance(target, str) and target == "final", cells, k,
                        chunk_size, work)
    _warn_non_finite(cells["top_ids"][..., 0] < 0, hook_names)
    if target_ids is not None and flat_targets is not None:
        target_ids.view(-1)[slice(None) if every else index] = flat_targets
    shaped = {name: (None if value is None else
                     _scatter(value, index, n_batch * n_pos).reshape(
                         len(resids), n_batch, n_pos, *value.shape[2:]))
              for name, value in cells.items()}
    return LensResult(
        lens=_lens_name(lens), hook_names=list(hook_names),
        tokens=batch.tokens, positions=selection.positions,
        str_tokens=str_tokens(model, batch.tokens), target=description,
        target_ids=target_ids, tokenizer=getattr(model, "tokenizer", None),
        mask=selection.mask, columns=selection.columns, lengths=batch.lengths, **shaped,
    )


def _identity(resid: Tensor, hook_name: str) -> Tensor:
    return resid


def _lens_name(lens: Lens | None) -> str:
    return "logit lens" if lens is None else getattr(lens, "name", type(lens).__name__)


def _real(values: Tensor, index: Tensor | None) -> Tensor:
    """The rows of real cells (all rows, as they are, when there is no padding)."""
    return values if index is None else values[index.to(values.device)]


class _RealRows:
    """The real rows of flat ``[cells, d_model]`` residuals, read a span at a time.

    Without padding a span is a view; with it, only that span's real rows are gathered.
    """

    def __init__(self, flat: Tensor, index: Tensor | None):
        self.flat = flat
        self.index = None if index is None else index.to(flat.device)

    def __getitem__(self, span: slice) -> Tensor:
        return self.flat[span] if self.index is None else self.flat[self.index[span]]


def _scatter(values: Tensor, index: Tensor | None, n_cells: int) -> Tensor:
    """``[layer, n_real, ...]`` values back into ``[layer, n_cells, ...]``; pads missing."""
    if index is None:
        return values
    fill = -1 if values.dtype == torch.long else float("nan")
    full = values.new_full((values.shape[0], n_cells, *values.shape[2:]), fill)
    full[:, index] = values
    return full


def _warn_non_finite(bad: Tensor, hook_names: Sequence[str]) -> None:
    """One warning per readout naming the hook points with non-finite logits."""
    per_layer = bad.reshape(bad.shape[0], -1).sum(1).tolist()
    named = [f"{name} ({count} cells)" for name, count in zip(hook_names, per_layer) if count]
    if named:
        logger.warning("non-finite logits (NaN or inf residuals) at %s: those cells have "
                       "rank -1, NaN statistics and no top-k ids (-1)", ", ".join(named))


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
    kernel and the compiled ones don't. ``shared``: the final layer's logits and then its
    probabilities live in the layers' logits buffer (``size >= chunk`` rows), since both
    are done with before the first layer's matmul; a soft-capped model reads the final
    probabilities during every layer's statistics, so it gets buffers of its own.
    """

    def __init__(self, size: int, chunk: int, vocab: int, d_model: int, device, backend: str,
                 *, shared: bool, dtype: torch.dtype = torch.float32):
        self.backend = backend
        self.shared = shared
        self.final_like: list[bool] = []  # rows that are the final residual itself
        # in the decoder's dtype: float32, or float64 for a float64 model
        empty = functools.partial(torch.empty, device=device, dtype=dtype)
        self.logits = empty(size * vocab)
        self.scratch = empty(size * vocab) if backend == "eager" else None
        self.final_logits = self.logits if shared else empty(chunk * vocab)
        self.probs = self.logits if shared else empty(chunk * vocab)
        self.translated = empty(size * d_model)

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
    n, vocab, d_model = span.stop - span.start, unembed.d_vocab, final_rows.flat.shape[-1]
    final_logits = unembed(final_rows[span], out=work.view(work.final_logits, n, vocab))
    final = row_stats(final_logits[None], final_logits.new_full((1, n, 1), torch.inf), 1,
                      _scratch(work, 1, n, vocab), work.backend)
    final_lse = final.lse[0]
    final_neg_entropy = final.e_z[0] / final.sum_exp[0] - final_lse           # E_f[log p_f]
    if fill_final_targets:
        flat_targets[span] = final.top_ids[0, :, 0]
    targets = None if flat_targets is None else flat_targets[span]

    def stats(logits, e_f, layers):
        _cell_stats(logits, _scratch(work, *logits.shape), e_f, final_neg_entropy, targets, k,
                    work.backend,
                    {key: (None if value is None else value[layers, span])
                     for key, value in cells.items()})

    # Rows that are the final residual, read through an identity translation (the logit
    # lens, the tuned lens' last layer), reuse the final logits instead of a second matmul.
    todo = []
    for layer, name in enumerate(hook_names):
        if work.final_like[layer]:
            piece = rows[layer][span]
            if translate(piece, name) is piece:
                stats(final_logits[None], (final_neg_entropy + final_lse)[None],
                      slice(layer, layer + 1))
                continue
        todo.append(layer)
    # The final logits are done with: their probabilities overwrite them when shared.
    final_probs = torch.sub(final_logits, final_lse[:, None],
                            out=work.view(work.probs, n, vocab)).exp_()
    # E_{p_f}[z_l] = x_l . (W_U p_f) + b_U . p_f for every layer's normalised x_l: one
    # [n, d_vocab] @ [d_vocab, d_model] matmul per chunk instead of a pass over
    # final_probs and each layer's logits.
    # A soft cap makes the logits non-linear in x: then E_f[z_l] is read off the logits.
    linear = unembed.soft_cap is None
    final_in_model = final_probs @ unembed.W_U.T if linear else None     # [n, d_model]
    final_bias = 0.0 if unembed.b_U is None or not linear else final_probs @ unembed.b_U
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


def _scratch(work: _Workspace, *shape: int) -> Tensor | None:
    return None if work.scratch is None else work.view(work.scratch, *shape)


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


def _cell_stats(logits, scratch, e_f, final_neg_entropy, targets, k, backend, out):
    """Top-k, entropy, KL(final || layer) and target stats of ``[layers, rows]`` logits.

    ``e_f``: ``E_{p_final}[z]`` per layer and row.
    """
    n_layers = logits.shape[0]
    if targets is None:
        chosen = logits.new_full((n_layers, logits.shape[1], 1), torch.inf)
    else:
        index = targets.clamp_min(0)[None, :, None].expand(n_layers, -1, 1)
        chosen = logits.gather(-1, index)                               # [layers, rows, 1]
    stats = row_stats(logits, chosen, k, scratch, backend)
    lse, finite = stats.lse, stats.finite
    out["top_ids"].copy_(stats.top_ids)
    out["top_logits"].copy_(stats.top_values)
    out["top_probs"].copy_(torch.exp(stats.top_values - lse[..., None]))
    # H = lse - E_p[z]
    out["entropy"].copy_(torch.where(finite, lse - stats.e_z / stats.sum_exp, torch.nan))
    # KL(f || l) = E_f[log p_f] - E_f[z_l] + lse_l. The two expectations are ~|z| in size,
    # so float32 leaves ~1e-5 nats of rounding (clamped: KL is never negative). A NaN in
    # the final distribution's terms stays NaN.
    out["kl_to_final"].copy_(torch.where(finite, (final_neg_entropy - e_f + lse).clamp_min_(0.0),
                                         torch.nan))
    if out["logits"] is not None:
        out["logits"].copy_(logits)
    if targets is not None:
        valid = (targets >= 0) & finite
        out["target_rank"].copy_(torch.where(valid, stats.n_above.long() + 1, -1))
        # A scalar NaN: torch.tensor(nan, device=cuda) would wait for the GPU every chunk.
        out["target_logit"].copy_(torch.where(valid, chosen[..., 0], torch.nan))
        out["target_prob"].copy_(torch.where(valid, torch.exp(chosen[..., 0] - lse),
                                             torch.nan))
