"""Batched patchscope sweeps: many (source prompt, layer, position) x target layer cases at once.

Every source prompt runs once (``run_with_cache`` keeps all the layers asked for); the
target prompt is then repeated once per case, each batch row patched at its own
``(l*, i*)`` by one hook per target layer that writes only its own rows. Rows are grouped
by target prompt, so a batch never holds two prompts of different lengths: there is no
padding, and a negative position means the same token in the batch as alone. On a
HookedTransformer the target tokens before the earliest patched position run once and
their keys/values are shared by all rows (see :func:`tl_lenses.patchscopes.core.run_patched`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_lenses._ints import as_int, as_ints, is_int
from tl_lenses.hooks import resolve_layer, resolve_position
from tl_lenses.inputs import one_prompt
from tl_lenses.models import check_model
from tl_lenses.patchscopes import view as _view
from tl_lenses.patchscopes.core import (
    AffineMap,
    Transform,
    apply_transform,
    check_context,
    check_generation,
    run_patched,
    source_states,
)
from tl_lenses.readout.unembed import output_vocab
from tl_lenses.viz.notebook import NotebookView


@dataclass(repr=False)
class SweepResult(NotebookView):
    """One row per case (axis ``case``): where h came from, where it went, what came out.

    ``top_ids``/``top_probs``: the target's top-k next tokens after its last prompt token;
    ``generated_ids``: the greedy continuation (``new_pos`` is 0 without generation).
    Positions are stored non-negative (resolved against each prompt's own length).
    """

    source_index: Int[Tensor, " case"]
    source_layer: Int[Tensor, " case"]
    source_position: Int[Tensor, " case"]
    target_index: Int[Tensor, " case"]
    target_layer: Int[Tensor, " case"]
    target_position: Int[Tensor, " case"]
    top_ids: Int[Tensor, "case k"]
    top_probs: Float[Tensor, "case k"]
    generated_ids: Int[Tensor, "case new_pos"]
    source_prompts: list = field(default_factory=list)  # as given: text or token ids
    target_prompts: list = field(default_factory=list)
    tokenizer: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.source_index.shape[0])

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids as one string (ids as text without a tokenizer)."""
        ids = list(ids)
        return self.tokenizer.decode(ids) if self.tokenizer is not None else str(ids)

    def top_tokens(self) -> list[str]:
        """The top-1 next token of every case, as text."""
        return [self.decode([i]) if i >= 0 else "" for i in self.top_ids[:, 0].tolist()]

    def generations(self) -> list[str]:
        """Each case's greedy continuation, decoded."""
        return [self.decode(row) for row in self.generated_ids.tolist()]

    def layer_grid(self, values: Sequence, *, source_index: int = 0,
                   source_position: int | None = None):
        """``values`` (one per case) laid out as [source layer, target layer] (NaN/None gaps).

        Returns ``(grid, source_layers, target_layers)``; ``source_position`` picks one
        position when the sweep had several (default: the only one, else an error).
        """
        if len(values) != len(self):
            raise ValueError(f"values must hold one value per case ({len(self)}), got "
                             f"{len(values)}")
        sources = sorted(set(self.source_index.tolist()))
        if source_index not in sources:
            raise ValueError(f"source_index must be one of the sweep's source prompts "
                             f"{sources}, got {source_index!r}")
        keep = self.source_index == source_index
        positions = sorted(set(self.source_position[keep].tolist()))
        if source_position is None:
            if len(positions) != 1:
                raise ValueError(f"source_position must pick one of {positions} (source "
                                 f"{source_index} was read at several positions)")
            source_position = positions[0]
        keep &= self.source_position == source_position
        if not bool(keep.any()):
            raise ValueError(f"no case has source_index={source_index}, "
                             f"source_position={source_position}")
        rows = sorted(set(self.source_layer[keep].tolist()))
        cols = sorted(set(self.target_layer[keep].tolist()))
        grid = [[None] * len(cols) for _ in rows]
        for case in torch.nonzero(keep).flatten().tolist():
            grid[rows.index(int(self.source_layer[case]))][
                cols.index(int(self.target_layer[case]))] = values[case]
        return grid, rows, cols

    def to_html(self, **view) -> str:
        """Every (source, position) layer x layer grid as HTML (see ``sweep_view``)."""
        return _view.sweep_view(self, True, **view)

    def save_png(self, path, **view) -> Path:
        """One layer x layer grid as a figure (PNG, SVG or PDF by the suffix of ``path``)."""
        return _view.sweep_png(self, path, **view)

    def _view_html(self, full: bool = False, **view) -> str:
        return _view.sweep_view(self, full, **view)


def patchscope_sweep(
    model, source_prompts, target_prompts, *, source_layers: Sequence[int] | None = None,
    source_positions: Sequence[int] | int = -1, target_layers: Sequence[int] | None = None,
    target_position: int | Sequence[int] = -1, pairs: Literal["all", "same"] = "all",
    target_model=None, source_fwd_hooks: Sequence = (),
    transform: Transform | AffineMap | tuple | None = None, max_new_tokens: int = 0,
    k: int = 5, batch_size: int = 512, reuse_prefix: bool = True,
) -> SweepResult:
    r"""Patch every (source prompt, source layer, source position) into every target layer.

    Many patchscopes batched into few forward passes, sharing the target prompt's prefix
    (its keys and values are computed once). Each case equals :func:`patchscope` run alone,
    up to float rounding of batched matmuls.

    Args:
        model: the source model.
        source_prompts: one prompt or a list.
        target_prompts: one prompt (shared) or one per source prompt.
        source_layers: residual-stream layers (default all of ``[0, n_layers]``).
        source_positions: one position or several.
        target_layers: default all.
        target_position: one position or one per target prompt.
        pairs: ``"all"`` (every (l, l*)) or ``"same"`` (l* = l).
        target_model: default ``model``.
        source_fwd_hooks: hooks during the source passes (e.g. an attention mask).
        transform: as in :func:`~tl_lenses.patchscopes.core.patchscope`.
        max_new_tokens: greedy tokens per case.
        k: top-k kept per case.
        batch_size: cases per forward pass.
        reuse_prefix: share the target prompt's prefix.

    Returns:
        A :class:`SweepResult` with one row per case (layers, positions, top-k ids and
        probabilities, generations).

    Raises:
        ValueError: naming the argument, for out-of-range layers or positions, mismatched
            prompt lists, ``pairs`` or ``k`` out of range.

    >>> sweep = patchscope_sweep(model, "hello world", "cat -> cat; x", pairs="same")
    >>> len(sweep) == model.cfg.n_layers + 1
    True
    """
    check_model(model)
    target_model = model if target_model is None else target_model
    check_model(target_model, argument="target_model")
    check_generation(max_new_tokens, allow_zero=True)
    if pairs not in ("all", "same"):
        raise ValueError(f"pairs must be 'all' or 'same', got {pairs!r}")
    d_out = output_vocab(target_model)  # top-k of the logits: the output vocabulary
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_out:
        raise ValueError(f"k must be an int in [1, d_vocab={d_out}], got {k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1 (cases per forward pass), got "
                         f"{batch_size!r}")
    sources = _prompt_list(source_prompts, "source_prompts")
    targets = _prompt_list(target_prompts, "target_prompts")
    if len(targets) not in (1, len(sources)):
        raise ValueError(f"target_prompts must be one prompt or one per source prompt "
                         f"({len(sources)}), got {len(targets)}")
    s_layers = _layers(model, source_layers, "source_layers")
    t_layers = _layers(target_model, target_layers, "target_layers")
    if pairs == "same" and target_layers is not None and target_layers != source_layers:
        raise ValueError("with pairs='same' give source_layers only (l* = l)")
    positions = as_ints(source_positions)
    if positions is None:
        raise ValueError(f"source_positions must be an int or ints, got {source_positions!r}")
    t_tokens = [one_prompt(target_model, t, argument="target_prompts") for t in targets]
    one = as_int(target_position)
    wanted = [one] * len(t_tokens) if one is not None else as_ints(target_position) or []
    if len(wanted) != len(t_tokens):
        raise ValueError(f"target_position must be an int or one per target prompt "
                         f"({len(t_tokens)}), got {target_position!r}")
    t_pos = [resolve_position(p, t.shape[1], argument="target_position")
             for p, t in zip(wanted, t_tokens)]
    for t in t_tokens:
        check_context(target_model, t.shape[1], max_new_tokens, argument="target_prompts")
    with model.hooks(fwd_hooks=list(source_fwd_hooks)):
        cases, values = _source_cases(model, sources, s_layers, positions, t_layers, pairs)
    patched = apply_transform(transform, values, target_model.cfg.d_model)
    target_of = [0 if len(targets) == 1 else case[0] for case in cases]
    out = _run_cases(target_model, cases, patched, target_of, t_tokens, t_pos,
                     max_new_tokens, k, batch_size, reuse_prefix)
    columns = torch.tensor([(*c, target_of[j], t_pos[target_of[j]]) for j, c in enumerate(cases)])
    return SweepResult(columns[:, 0], columns[:, 1], columns[:, 2], columns[:, 4],
                       columns[:, 3], columns[:, 5], *out, sources, targets,
                       getattr(target_model, "tokenizer", None))


def _prompt_list(prompts, argument: str) -> list:
    if isinstance(prompts, (str, Tensor)):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"{argument} must be a prompt or a non-empty list of prompts")
    return list(prompts)


def _layers(model, layers, argument: str) -> list[int]:
    if layers is None:
        return list(range(model.cfg.n_layers + 1))
    if is_int(layers) or isinstance(layers, str) or not len(layers):
        raise ValueError(f"{argument} must be a non-empty list of ints")
    return [resolve_layer(model, l, argument=argument)[0] for l in layers]


def _source_cases(model, sources, s_layers, positions, t_layers, pairs):
    """Cases ``(source_index, source_layer, source_position, target_layer)`` and their h."""
    cases, values = [], []
    for index, prompt in enumerate(sources):
        tokens = one_prompt(model, prompt, argument="source_prompts")
        pos = [resolve_position(p, tokens.shape[1], argument="source_positions")
               for p in positions]
        states = source_states(model, tokens, s_layers, pos)
        for (li, layer), (pi, p) in product(enumerate(s_layers), enumerate(pos)):
            for t_layer in (t_layers if pairs == "all" else [layer]):
                cases.append((index, layer, p, t_layer))
                values.append(states[li, pi])
    return cases, torch.stack(values)


def _run_cases(model, cases, patched, target_of, t_tokens, t_pos, max_new_tokens, k,
               batch_size, reuse_prefix):
    n = len(cases)
    top_ids = torch.zeros(n, k, dtype=torch.long)
    top_probs = torch.zeros(n, k)
    generated = torch.zeros(n, max_new_tokens, dtype=torch.long)
    names = [resolve_layer(model, c[3], argument="target_layers")[1] for c in cases]
    order = np.argsort(target_of, kind="stable")
    groups = [order[[target_of[j] == t for j in order]] for t in sorted(set(target_of))]
    for group in groups:
        for start in range(0, len(group), batch_size):
            rows = group[start:start + batch_size].tolist()
            t = target_of[rows[0]]
            logits, new = run_patched(
                model, t_tokens[t].expand(len(rows), -1), [names[r] for r in rows],
                [t_pos[t]] * len(rows), patched[rows], max_new_tokens=max_new_tokens,
                reuse_prefix=reuse_prefix,
            )
            probs, ids = logits.float().softmax(-1).topk(k, dim=-1)
            bad = ~logits.isfinite().all(-1, keepdim=True)  # no order: missing, not top-1
            probs, ids = probs.masked_fill(bad, float("nan")), ids.masked_fill(bad, -1)
            top_ids[rows], top_probs[rows], generated[rows] = ids.cpu(), probs.cpu(), new.cpu()
    return top_ids, top_probs, generated
