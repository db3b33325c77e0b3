"""Does the attribute lens's causality score discriminate? The LRE paper's low-rank edit.

The LRE causality edit adds ``pinv_r(W) (LRE(s') - LRE(s)) = V_r V_r^T beta (s' - s)`` to the
subject's residual: the subject difference projected onto the top-``r`` right-singular
directions of ``W``. At full rank any invertible map (the identity baseline included)
makes it ``s' - s``, i.e. patching the other subject's token, so every operator scores the
same (0.98 for country -> capital on SmolLM2). Hernandez et al. (2024, sec. 4.2) invert at
low rank. Here the rank is chosen on held-out *validation* pairs (the LRE's best), and
then every operator (the LRE, the identity, the least-squares map) is scored at that rank
on separate *test* pairs: the question becomes "which r-dimensional subspace of s carries
the object?", which a fitted map can answer and the identity cannot.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from tl_lenses.lenses.attribute.lre import LRE, check_lre, estimate_lre
from tl_lenses.lenses.attribute.metrics import (
    causal_pairs,
    causality,
    choose_rank,
    collect_states,
    faithfulness,
    least_squares_lre,
)
from tl_lenses.lenses.attribute.relations import Relation, get_relation
from tl_lenses.viz.notebook import NotebookView

DEFAULT_RANKS = (2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(repr=False)
class LRECausalityResult(NotebookView):
    """Causality per operator (``"jacobian"`` = the LRE, ``"identity"``, ``"least squares"``).

    ``validation[method]``: causality at each of ``ranks`` on the validation pairs;
    ``chosen_rank``: the LRE's best validation rank; ``test[method]`` and ``full[method]``:
    causality on the test pairs at the chosen rank and at full rank; ``faithfulness`` on
    all held-out subjects the model answers correctly.
    """

    relation: str
    layer: int
    ranks: list[int]
    validation: dict[str, list[float]]
    chosen_rank: int
    test: dict[str, float]
    full: dict[str, float]
    faithfulness: dict[str, float]
    n_validation_pairs: int
    n_test_pairs: int
    lre: LRE | None = field(default=None, repr=False)

    def table(self) -> tuple[list[str], list[list]]:
        """(header, rows): faithfulness and causality of each operator."""
        header = ["operator", "faithfulness", f"causality, rank {self.chosen_rank}",
                  "causality, full rank"]
        rows = [[m, f"{self.faithfulness[m]:.2f}", f"{self.test[m]:.2f}", f"{self.full[m]:.2f}"]
                for m in self.test]
        return header, rows

    def to_html(self) -> str:
        """The table and the validation curve per operator."""
        from tl_lenses.analysis.view import lre_causality_html

        return lre_causality_html(self)

    def _view_html(self, full: bool = False, **view) -> str:
        return self.to_html()

    def save_png(self, path) -> Path:
        """Validation causality against the rank of the inverse, one line per operator."""
        from tl_lenses.analysis.view import lre_causality_png

        return lre_causality_png(self, path)


def default_ranks(d_model: int) -> list[int]:
    """The ranks of :data:`DEFAULT_RANKS` that fit ``d_model`` (at most ``d_model``)."""
    return [r for r in DEFAULT_RANKS if r <= d_model]


def check_ranks(ranks, d_model: int) -> list[int]:
    """``ranks`` sorted and deduplicated (None: :func:`default_ranks`), each in [1, d_model].

    Raises:
        ValueError: naming ``ranks``, for an empty list, a non-int or a rank out of range.
    """
    if ranks is None:
        return default_ranks(d_model)
    if isinstance(ranks, (str, int)) or not all(
            isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in ranks):
        raise ValueError(f"ranks must be a list of ints in [1, d_model={d_model}], got {ranks!r}")
    ranks = sorted({int(r) for r in ranks})
    if not ranks or ranks[0] < 1 or ranks[-1] > d_model:
        raise ValueError(f"ranks must be non-empty ints in [1, d_model={d_model}], got {ranks}")
    return ranks


def lre_causality(
    model, relation: Relation | str, layer: int, *, n: int = 8,
    ranks: Sequence[int] | None = None,
    seed: int = 0, lre: LRE | None = None, own_answers: bool = False, progress: bool = False,
) -> LRECausalityResult:
    """Score an LRE and its baselines with a low-rank inverse chosen on held-out pairs.

    Args:
        model: a HookedTransformer or compatibility-mode TransformerBridge.
        relation: the relation (its held-out subjects give the validation and test pairs):
            a :class:`Relation`, a starter relation's name or a relation file.
        layer: residual-stream layer of the subject (0 = embedding).
        n: training subjects for the LRE and the least-squares baseline.
        ranks: candidate ranks of the inverse (each in [1, d_model]); default those of
            :data:`DEFAULT_RANKS` (2, 4, ..., 256) that fit ``d_model``.
        seed: the train / held-out split and the validation / test split.
        lre: an LRE already estimated on ``relation.split(n, seed)[0]`` (else estimated).
        own_answers: score against the model's own top-1 answers instead of the relation's
            objects, so every held-out subject counts (for models that do not know the
            relation, e.g. tiny random ones).
        progress: log each Jacobian.

    Returns:
        An :class:`LRECausalityResult`.

    Raises:
        ValueError: on bad ranks, or too few held-out subjects the model answers correctly
            to form validation and test pairs.

    Examples:
        >>> letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN"
        >>> relation = Relation("at end", ("{}",), tuple(Sample(s, o) for s, o in
        ...                                              zip(letters[:30], letters[10:40])))
        >>> result = lre_causality(model, relation, 1, n=4, ranks=(2, 8), own_answers=True)
        >>> result.chosen_rank in (2, 8), sorted(result.test)
        (True, ['identity', 'jacobian', 'least squares'])
        >>> result.full["identity"] == result.full["jacobian"]   # full rank: s' - s for both
        True

    Source: Hernandez et al. 2024, "Linearity of Relation Decoding in Transformer LMs",
    sec. 4.2 (causality with a low-rank pseudoinverse); the identity and least-squares
    baselines as in :mod:`tl_lenses.lenses.attribute.metrics`.
    """
    relation = get_relation(relation)
    ranks = check_ranks(ranks, model.cfg.d_model)
    train, held = relation.split(n, seed=seed)
    if lre is None:
        lre = estimate_lre(model, relation, layer, train=train, progress=progress)
    else:
        check_lre(model, lre)
    train_states = collect_states(model, lre, train, [layer])
    states = collect_states(model, lre, held, [layer])
    if own_answers:
        states = replace(states, object_ids=states.predicted_ids)
    validation_keep, test_keep = split_correct(states.correct, seed)
    operators = {
        "jacobian": lre,
        "identity": LRE.identity(lre.d_model, layer=layer, relation=lre.relation,
                                 template=lre.template, train=lre.train),
        "least squares": least_squares_lre(lre, train_states.at_layer(layer), train_states.z),
    }
    val_pairs, test_pairs = causal_pairs(states, validation_keep), causal_pairs(states, test_keep)
    if not val_pairs or not test_pairs:
        raise ValueError(f"too few held-out subjects of {relation.name!r} answered correctly "
                         f"({int(states.correct.sum())}) to form validation and test pairs")
    # The LRE's validation curve is the one choose_rank computed (one forward per rank).
    chosen, lre_curve = choose_rank(model, lre, states, val_pairs, ranks)
    validation = {m: lre_curve if m == "jacobian" else
                  [causality(model, op, states, val_pairs, r) for r in ranks]
                  for m, op in operators.items()}
    s, ids = states.at_layer(layer)[states.correct], states.object_ids[states.correct]
    return LRECausalityResult(
        relation.name, layer, ranks, validation, chosen,
        {m: causality(model, op, states, test_pairs, chosen) for m, op in operators.items()},
        {m: causality(model, op, states, test_pairs, None) for m, op in operators.items()},
        {m: faithfulness(model, op, s, ids) for m, op in operators.items()},
        len(val_pairs), len(test_pairs), lre)


def split_correct(correct: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint masks halving the correctly answered rows (seeded shuffle)."""
    rows = torch.nonzero(correct).flatten()
    order = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]
    first, second = torch.zeros_like(correct), torch.zeros_like(correct)
    first[order[: len(order) // 2]] = True
    second[order[len(order) // 2:]] = True
    return first, second


__all__ = ["LRECausalityResult", "lre_causality", "split_correct", "DEFAULT_RANKS"]
