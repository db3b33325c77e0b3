"""The result of a direct logit attribution: values per component, with labels and views."""

from __future__ import annotations

import functools
import numbers
import operator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_lenses.attribution import view as _views
from tl_lenses.attribution.attention import head_patterns
from tl_lenses.attribution.provenance import ModelStamp, check_source
from tl_lenses.viz.notebook import NotebookView


@dataclass(frozen=True, eq=False)  # fields hold tensors: == compares identity
class DLAResult(NotebookView):
    """Attributions ``values[component, batch, pos, direction]`` with one label per component.

    ``pos`` runs over ``positions``, counted within each prompt: ``columns[b, i]`` is the
    token of ``tokens`` (the whole prompts, padded) that prompt ``b`` read, and ``mask[b, i]``
    is False where it has none (a pad: NaN values). ``logits`` is the model's own value along each
    direction and ``values.sum(0)`` equals it to float rounding (while every component is
    kept); ``scale`` is the frozen final-norm scale. For a model with a final logit soft
    cap (Gemma-2), ``logits`` is the value *before* the cap (what the parts add up to) and
    ``capped_logits`` the model's own output (``cap(z_a) - cap(z_b)``; NaN for free vector
    directions); None for a model without a cap. Indexing (``result["L3H5"]``,
    ``result[["L3H5", "L7 MLP"]]``, ``result[:10]``) selects components; ``top`` and
    ``sort`` order them by one (batch, pos, direction) cell. ``source`` stamps the model
    the result came from (:mod:`tl_lenses.attribution.provenance`): ``with_attention``
    refuses another.
    """

    values: Float[Tensor, "component batch pos direction"]
    labels: Sequence[str]
    directions: list[str]
    positions: list[int]
    tokens: Int[Tensor, "batch _"]
    logits: Float[Tensor, "batch pos direction"]
    scale: Float[Tensor, "batch pos"]
    str_tokens: Sequence[Sequence[str]] | None = None  # a TokenStrings: decoded when read
    mask: Bool[Tensor, "batch pos"] | None = None
    columns: Int[Tensor, "batch pos"] | None = None
    capped_logits: Float[Tensor, "batch pos direction"] | None = None
    attention: dict | None = field(default=None, repr=False, compare=False)
    source: ModelStamp | None = field(default=None, repr=False, compare=False)
    # Which cells of ``tokens`` are tokens, not pads: the run's attention mask (None: all).
    attention_mask: Bool[Tensor, "batch _"] | None = field(default=None, repr=False,
                                                            compare=False)
    # (batch, pos, direction) that top() / sort() ranked by: the default cell after them
    focus: tuple[int, int, int] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        # Built without padding information: every prompt reads every position.
        batch, n_pos = self.values.shape[1:3]
        if self.mask is None:
            object.__setattr__(self, "mask", torch.ones(batch, n_pos, dtype=torch.bool))
        if self.columns is None:
            object.__setattr__(self, "columns",
                               torch.tensor(self.positions).expand(batch, n_pos))

    def __len__(self) -> int:
        return self.values.shape[0]

    @functools.cached_property
    def _label_index(self) -> dict[str, int] | None:
        # A dict once per result: list.index would make selecting many labels quadratic.
        if not isinstance(self.labels, list):
            return None
        return {label: i for i, label in reversed(list(enumerate(self.labels)))}

    def index(self, label: str) -> int:
        """The component index of ``label`` (``ValueError`` naming known labels if absent)."""
        try:
            if self._label_index is not None:
                return self._label_index[label]
            return self.labels.index(label)
        except (KeyError, ValueError):
            examples = ", ".join(repr(self.labels[i]) for i in range(min(4, len(self))))
            raise ValueError(
                f"unknown component label {label!r}; labels look like {examples} ..."
            ) from None

    def __getitem__(self, key) -> "DLAResult":
        if isinstance(key, str):
            key = [key]
        if isinstance(key, slice):
            key = list(range(len(self)))[key]
        elif isinstance(key, int):
            key = [key]
        elif isinstance(key, Tensor):
            key = (key.nonzero().flatten() if key.dtype == torch.bool else key).tolist()
        if not hasattr(key, "__iter__") or any(
                isinstance(k, bool) or not isinstance(k, (str, numbers.Integral)) for k in key):
            raise TypeError(f"a DLAResult is indexed by a component label, an int, a slice, "
                            f"a list of labels or ints, or a bool mask; got {key!r}")
        index = [self.index(k) if isinstance(k, str) else int(k) for k in key]
        bad = [i for i in index if not -len(self) <= i < len(self)]
        if bad:
            raise IndexError(f"component indices {bad} out of range for {len(self)} components")
        take = getattr(self.labels, "take", None)
        labels = take(index) if take else [self.labels[i] for i in index]
        return replace(self, values=self.values[index], labels=labels)

    def heads(self) -> "DLAResult":
        """Only the per-head components (``L3H5``)."""
        labels = self.labels if isinstance(self.labels, list) else []
        return self[[i for i, label in enumerate(labels) if parse_head_label(label)]]

    def per_prompt(self) -> "DLAResult":
        """Prompt i along direction i only (a different answer pair per prompt, as in IOI).

        Call it on a result computed with one direction per prompt, in batch order.
        """
        n = self.values.shape[1]
        if len(self.directions) != n:
            raise ValueError(f"per_prompt needs one direction per prompt ({n}), "
                             f"got {len(self.directions)}")
        i = torch.arange(n)
        capped = self.capped_logits
        return replace(
            self, values=self.values[:, i, :, i].permute(1, 0, 2)[..., None],
            logits=self.logits[i, :, i][..., None], directions=["per prompt"],
            capped_logits=None if capped is None else capped[i, :, i][..., None], focus=None,
        )

    def total(self) -> Float[Tensor, "batch pos direction"]:
        """The sum over components (the logit when every component is present)."""
        return self.values.sum(0)

    def cell(self, batch: int | None = None, pos: int | None = None,
             direction: int | None = None) -> Float[Tensor, " component"]:
        """One value per component at ``(batch, pos, direction)``; pos indexes ``positions``.

        Unset arguments come from the cell ``top``/``sort`` ranked by, else ``(0, -1, 0)``.
        A negative ``pos`` counts back over the prompt's own cells, so ``-1`` is its last
        token even where a longer prompt's last position is a pad for it.
        """
        batch, pos, direction = self._cell_index(batch, pos, direction)
        return self.values[:, batch, pos, direction]

    def _requested(self, batch, pos, direction) -> tuple[int, int, int]:
        """The cell asked for, unset parts from ``focus`` (else ``(0, -1, 0)``), checked.

        ``pos`` keeps its sign (a negative one is resolved per prompt by :meth:`_cell_index`).
        """
        focus = self.focus or (0, -1, 0)
        chosen = [focus[i] if v is None else v for i, v in enumerate((batch, pos, direction))]
        out = []
        for name, i, n in zip(("batch", "pos", "direction"), chosen, self.values.shape[1:]):
            try:
                index = operator.index(i)  # ints, numpy ints, 0-d int tensors; not bools
            except TypeError:
                index = None
            if index is None or isinstance(i, bool) or not -n <= index < n:
                raise ValueError(f"{name} must be an int in [-{n}, {n}), got {i!r}")
            out.append(index)
        batch, pos, direction = out
        return batch % self.values.shape[1], pos, direction % self.values.shape[3]

    def _cell_index(self, batch, pos, direction) -> tuple[int, int, int]:
        """Concrete non-negative ``(batch, pos, direction)`` indices (see :meth:`cell`)."""
        batch, pos, direction = self._requested(batch, pos, direction)
        if pos >= 0:
            return batch, pos, direction
        real = self.mask[batch].nonzero().flatten().tolist()   # the prompt's own cells
        if -pos > len(real):
            raise ValueError(f"pos={pos}: prompt {batch} has only {len(real)} of these "
                             f"positions (the others are pads)")
        return batch, real[pos], direction

    def _ranked_cell(self, batch, pos, direction) -> tuple[int, int, int]:
        """:meth:`_cell_index`, refusing a pad (no values to rank by)."""
        batch, pos, direction = self._cell_index(batch, pos, direction)
        if not bool(self.mask[batch, pos]):
            raise ValueError(f"prompt {batch} has no token at positions[{pos}] (a pad: its "
                             f"values are NaN); rank by a cell it has (pos=-1: its last token)")
        return batch, pos, direction

    def sort(self, *, batch: int | None = None, pos: int | None = None,
             direction: int | None = None, absolute: bool = True) -> "DLAResult":
        """Components ordered by value (largest first; by magnitude when ``absolute``).

        The cell (see :meth:`cell`) becomes the result's default cell (``items()``).

        Raises:
            ValueError: the cell is out of range or a pad.
        """
        at = self._ranked_cell(batch, pos, direction)
        order = _key(self.values[:, at[0], at[1], at[2]], absolute).argsort(descending=True,
                                                                             stable=True)
        return replace(self[order], focus=self._requested(batch, pos, direction))

    def top(self, k: int = 10, *, batch: int | None = None, pos: int | None = None,
            direction: int | None = None, absolute: bool = True) -> "DLAResult":
        """The ``k`` largest components (by magnitude when ``absolute``), largest first.

        The cell (see :meth:`cell`) becomes the result's default cell, so
        ``top(5, batch=2).items()`` lists prompt 2's values.

        Raises:
            ValueError: ``k`` is not an int >= 1; the cell is out of range or a pad.
        """
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an int >= 1 (components to keep), got {k!r}")
        at = self._ranked_cell(batch, pos, direction)
        k = min(k, len(self))
        order = _key(self.values[:, at[0], at[1], at[2]], absolute).topk(k).indices
        return replace(self[order], focus=self._requested(batch, pos, direction))

    def items(self, batch: int | None = None, pos: int | None = None,
              direction: int | None = None) -> list[tuple[str, float]]:
        """``(label, value)`` pairs at one cell (see :meth:`cell`), in component order."""
        column = self.cell(batch, pos, direction).tolist()
        return [(self.labels[i], v) for i, v in enumerate(column)]

    def head_matrix(self, batch: int | None = None, pos: int | None = None,
                    direction: int | None = None) -> Float[Tensor, "layer head_index"]:
        """Head attributions as [layer, head] at a cell (see :meth:`cell`).

        NaN for heads absent from this result.
        """
        labels = self.labels if isinstance(self.labels, list) else []
        heads = [(i, parse_head_label(label)) for i, label in enumerate(labels)
                 if parse_head_label(label) is not None]
        if not heads:
            raise ValueError("this result has no per-head components (labels like 'L3H5')")
        n_layers = max(l for _, (l, _) in heads) + 1
        n_heads = max(h for _, (_, h) in heads) + 1
        if self.source is not None:  # the model's whole grid, even after top() kept a few
            n_layers, n_heads = max(n_layers, self.source.shape[0]), max(n_heads,
                                                                       self.source.shape[1])
        matrix = torch.full((n_layers, n_heads), float("nan"))
        column = self.cell(batch, pos, direction)
        for i, (layer, head) in heads:
            matrix[layer, head] = column[i]
        return matrix

    def with_attention(self, model, k: int = 6, *, batch: int | None = None,
                       pos: int | None = None, direction: int | None = None) -> DLAResult:
        """This result with the attention patterns of its ``k`` top heads, for the views.

        Args:
            model: the model the result was computed on (one more cached forward pass).
            k: how many heads, by |attribution| at ``(batch, pos, direction)``.
            batch: the prompt whose cell ranks the heads.
            pos: the position (index into ``positions``) whose cell ranks the heads.
            direction: the direction whose cell ranks the heads.

        Returns:
            A copy whose ``attention`` maps head labels to ``[batch, query_pos, key_pos]``
            patterns (``blocks.{l}.attn.hook_pattern``).

        Raises:
            ValueError: if the result has no per-head components, or ``model`` is not the
                model it came from (another shape, or another model object while that one
                still exists: :mod:`tl_lenses.attribution.provenance`).
        """
        check_source(self.source, model)
        heads = self.heads()
        if not len(heads):
            raise ValueError("with_attention needs per-head components (dla(..., heads=True))")
        top = heads.top(k, batch=batch, pos=pos, direction=direction)
        pairs = [parse_head_label(label) for label in top.labels]
        patterns = head_patterns(model, self.tokens.to(model.cfg.device), pairs,
                                 attention_mask=self.attention_mask)
        return replace(self, attention=dict(zip(top.labels, patterns)))

    def _view_html(self, full: bool = False, **options) -> str:
        return _views.notebook_view(self, full, **options)

    def to_html(self, path=None, **options) -> str:
        """The report page of :func:`~tl_lenses.attribution.view.report_html`.

        Also written to ``path`` when one is given.
        """
        html = _views.report_html(self, **options)
        if path is not None:
            Path(path).write_text(html, encoding="utf-8")
        return html

    def save_png(self, path, view: str = "heads", **cell) -> Path:
        """``view="heads"``: layer × head heatmap; ``"top"``: top-k bars (``k=`` in cell).

        Returns ``Path(path)``.
        """
        if view not in ("heads", "top"):
            raise ValueError(f"view must be 'heads' or 'top', got {view!r}")
        draw = _views.head_heatmap_png if view == "heads" else _views.top_bars_png
        return draw(self, path, **cell)

    def __repr__(self) -> str:
        batch, pos, direction = self._cell_index(None, None, None)
        shown = ", ".join(f"{label}={v:+.3g}" for label, v in
                          self.items(batch, pos, direction)[:8])
        capped = "" if self.capped_logits is None else "; sums to the pre-cap logits"
        return (f"DLAResult({len(self)} components x batch {self.values.shape[1]} x "
                f"{len(self.positions)} positions x directions {self.directions}{capped}; "
                f"at batch {batch}, positions[{pos}], direction {direction}: "
                f"{shown}{' ...' if len(self) > 8 else ''})")


def _key(column: Tensor, absolute: bool) -> Tensor:
    """The ordering key: NaN (a pad, a non-finite part) sorts last, not first."""
    return (column.abs() if absolute else column).nan_to_num(nan=-torch.inf)


def parse_head_label(label: str) -> tuple[int, int] | None:
    """``"L3H5"`` -> ``(3, 5)``; None for any other label."""
    if not label.startswith("L") or "H" not in label or " " in label:
        return None
    layer, _, head = label[1:].partition("H")
    return (int(layer), int(head)) if layer.isdigit() and head.isdigit() else None


__all__ = ["DLAResult", "parse_head_label"]
