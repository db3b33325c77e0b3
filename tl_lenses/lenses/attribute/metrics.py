"""How good is an LRE: faithfulness and causality, next to two baselines, and sweeps.

Both metrics use held-out subjects that the model itself answers correctly (its top-1 at
the prompt's last token is the object's first token), with the prompt the LRE was
estimated with (:meth:`LRE.prompt`).

* faithfulness: the fraction of them for which the decoded ``LRE(s)`` (final norm +
  unembedding) has the object's first token as its top-1;
* causality: for a pair (subject with object o, another with o'), add
  ``delta = pinv_r(W) (LRE(s') - LRE(s))`` to the residual at layer l on the subject's last
  token; success when the model's answer flips to the first token of o'.

Baselines (also :class:`LRE` objects, so the same code scores them): the logit lens of
``s`` (``W = I``, ``b = 0``; its causal edit is ``s' - s``, i.e. patching the subject
token) and a least-squares affine map fitted on the same n ``(s_i, z_i)`` pairs
(minimum-norm, since n < d_model).

Every operator is scored with the same rank of the inverse. At full rank an invertible map's
edit is ``pinv(W) beta W (s' - s) = s' - s`` whatever the map, so the identity scores like
the LRE; at a low rank ``r`` the edit is ``s' - s`` projected onto the map's top-``r`` input
directions, which only a fitted map chooses well. :func:`choose_rank` picks ``r`` on
held-out pairs (Hernandez et al. 2024, sec. 4.2; see :mod:`tl_lenses.analysis.causal_lre`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_lenses.hooks import (
    final_resid_name,
    flowing_name,
    resid_names,
    resolve_layer,
    run_cache,
)
from tl_lenses.inputs import to_batch
from tl_lenses.lenses.attribute import view as _view
from tl_lenses.lenses.attribute.lre import LRE, check_lre, estimate_lre, subject_position
from tl_lenses.lenses.attribute.relations import Relation, Sample, get_relation, object_token
from tl_lenses.readout.unembed import Unembed
from tl_lenses.typing import IntLike
from tl_lenses.viz.notebook import NotebookView


@dataclass(frozen=True)
class SubjectStates:
    """Residuals of held-out prompts: ``s`` per layer, final ``z``, and what the model says."""

    subjects: list[str]
    objects: list[str]
    object_ids: Int[Tensor, " batch"]
    predicted_ids: Int[Tensor, " batch"]
    s: Float[Tensor, "layer batch d_model"]
    z: Float[Tensor, "batch d_model"]
    layers: list[int]
    tokens: Int[Tensor, "batch pos"]
    subject_positions: list[int]
    last_positions: list[int]

    @property
    def correct(self) -> Tensor:
        """Which prompts the model answers with the object's first token."""
        return self.predicted_ids == self.object_ids

    def at_layer(self, layer: int) -> Float[Tensor, "batch d_model"]:
        """The subject states ``[batch, d_model]`` collected at ``layer`` (ValueError if not)."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not collected; have {self.layers}")
        return self.s[self.layers.index(layer)]


@dataclass(repr=False)
class Score(NotebookView):
    """One row of a metrics table."""

    relation: str
    method: str
    layer: int
    n: int
    beta: float
    rank: int | None
    faithfulness: float
    causality: float
    n_test: int
    n_pairs: int

    def _view_html(self, full: bool = False, **view) -> str:
        return _view.scores_table_html([self])


def collect_states(model, template_lre: LRE, samples: Sequence[Sample],
                   layers: Sequence[int]) -> SubjectStates:
    """One batched forward over the prompts of ``samples`` (right-padded)."""
    if not samples:
        raise ValueError("samples must not be empty")
    layers = [resolve_layer(model, layer, negative=False)[0] for layer in layers]
    prompts = [template_lre.prompt(x.subject) for x in samples]
    positions = [subject_position(model, p, x.subject)[1] for p, x in zip(prompts, samples)]
    # Right padding: each subject's position within its prompt is its column, and the
    # causality runs (one padded row each) keep every real token where it was.
    batch = to_batch(model, prompts, padding_side="right", argument="prompts")
    tokens = batch.tokens
    names = [resid_names(model)[layer] for layer in layers]
    # No logits: only the last positions are decoded, not [batch, pos, d_vocab].
    cache = run_cache(model, batch, [*names, final_resid_name(model)])
    rows = torch.arange(len(samples))
    last = batch.last().cpu()
    subj = torch.tensor(positions)
    z = cache[final_resid_name(model)][rows, last]
    return SubjectStates(
        subjects=[x.subject for x in samples], objects=[x.object for x in samples],
        object_ids=torch.tensor([object_token(model, x.object) for x in samples]),
        predicted_ids=_answers(model, z),
        s=torch.stack([cache[name][rows, subj] for name in names]),
        z=z, layers=layers, tokens=tokens,
        subject_positions=positions, last_positions=last.tolist(),
    )


def _answers(model, final_resid: Float[Tensor, "batch d_model"]) -> Int[Tensor, " batch"]:
    """The model's top-1 from final residuals (the Unembed equals the model's own head)."""
    with torch.no_grad():
        return Unembed.from_model(model)(final_resid).argmax(-1).cpu()


def least_squares_lre(lre: LRE, s: Float[Tensor, "batch d_model"],
                      z: Float[Tensor, "batch d_model"]) -> LRE:
    """The minimum-norm affine map with ``W s_i + b = z_i`` fitted on the training pairs."""
    design = torch.cat([s.double(), torch.ones(len(s), 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.pinv(design) @ z.double()          # [d_model + 1, d_model]
    return replace(lre, weight=solution[:-1].T.to(s.dtype), bias=solution[-1].to(s.dtype),
                   beta=1.0, method="least squares")


def faithfulness(model, lre: LRE, s: Float[Tensor, "batch d_model"],
                 object_ids: Int[Tensor, " batch"]) -> float:
    """Fraction of rows where the decoded ``lre(s)`` ranks the object's token first."""
    check_lre(model, lre)
    if len(s) == 0:
        return float("nan")
    with torch.no_grad():
        top = Unembed.from_model(model)(lre(s)).argmax(-1).cpu()
    return (top == object_ids.cpu()).float().mean().item()


def causal_pairs(states: SubjectStates, keep: Tensor) -> list[tuple[int, int]]:
    """(source, target) rows: each kept row with the next kept row whose object differs."""
    rows = torch.nonzero(keep).flatten().tolist()
    pairs = []
    for k, i in enumerate(rows):
        for j in rows[k + 1:] + rows[:k]:
            if int(states.object_ids[j]) != int(states.object_ids[i]):
                pairs.append((i, j))
                break
    return pairs


def causality(model, lre: LRE, states: SubjectStates, pairs: Sequence[tuple[int, int]],
              rank: int | None = None) -> float:
    """Fraction of pairs whose answer flips to the target's object after the edit."""
    check_lre(model, lre)
    if not pairs:
        return float("nan")
    s = states.at_layer(lre.layer)
    src, dst = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    inverse = lre.pinv(rank).to(s.dtype)
    delta = (lre(s[dst]) - lre(s[src])) @ inverse.T            # pinv_r(W) (o' - o)
    subj = torch.tensor(states.subject_positions)[src]
    rows = torch.arange(len(pairs))

    def add_delta(resid, hook):
        resid = resid.clone()
        resid[rows, subj] += delta.to(resid.dtype)
        return resid

    seen = {}

    def keep_final(resid, hook):
        seen["z"] = resid[rows, last]

    last = torch.tensor(states.last_positions)[src]
    hooks = [(flowing_name(model.hook_dict, name), fn) for name, fn in
             [(resid_names(model)[lre.layer], add_delta), (final_resid_name(model), keep_final)]]
    tokens = states.tokens[src]
    mask = torch.arange(tokens.shape[1])[None, :] <= last[:, None]  # right padding
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=hooks, return_type=None,
                             attention_mask=mask.long().to(tokens.device))
    answers = _answers(model, seen["z"])
    return (answers == states.object_ids[dst]).float().mean().item()


def choose_rank(model, lre: LRE, states: SubjectStates, pairs: Sequence[tuple[int, int]],
                ranks: Sequence[int]) -> tuple[int, list[float]]:
    """The rank of the inverse maximising ``lre``'s causality on held-out ``pairs``.

    Args:
        model: the model the LRE was estimated on.
        lre: the map whose inverse is truncated.
        states: held-out subjects (:func:`collect_states`) the pairs index.
        pairs: (source, target) rows of ``states`` kept apart from the final scoring.
        ranks: candidate ranks, each in [1, d_model].

    Returns:
        (the best rank, causality at each of ``ranks``); ties go to the smallest rank, so
        the edit stays as narrow as the data allow.

    Raises:
        ValueError: when ``ranks`` is empty or holds a rank outside [1, d_model].

    Source: Hernandez et al. 2024, sec. 4.2 (a low-rank pseudoinverse for the causal edit).
    """
    ranks = list(ranks)
    if not ranks:
        raise ValueError("ranks must name at least one rank")
    scores = [causality(model, lre, states, pairs, rank) for rank in ranks]
    best = max(range(len(ranks)), key=lambda i: (scores[i], -ranks[i]))
    return ranks[best], scores


def score(model, lre: LRE, train_states: SubjectStates, test_states: SubjectStates,
          rank: int | None = None, *, baselines: bool = True) -> list[Score]:
    """Faithfulness and causality of ``lre`` (and both baselines) at ``lre.layer``.

    Every operator's causal edit uses the same ``rank`` of its inverse (see the module
    docstring: at full rank the identity would score like any invertible map).
    """
    check_lre(model, lre)
    keep = test_states.correct
    pairs = causal_pairs(test_states, keep)
    s_test = test_states.at_layer(lre.layer)[keep]
    ids = test_states.object_ids[keep]
    operators = [
        lre,
        LRE.identity(lre.d_model, layer=lre.layer, relation=lre.relation,
                     template=lre.template, train=lre.train),
        least_squares_lre(lre, train_states.at_layer(lre.layer), train_states.z),
    ][:3 if baselines else 1]
    return [Score(lre.relation, op.method, lre.layer, lre.n, op.beta, rank,
                  faithfulness(model, op, s_test, ids),
                  causality(model, op, test_states, pairs, rank),
                  int(keep.sum()), len(pairs)) for op in operators]


@dataclass(repr=False)
class Sweep(NotebookView):
    """Rows of :class:`Score` from a sweep (the LRE and its baselines)."""

    rows: list[Score] = field(default_factory=list)
    lres: list[LRE] = field(default_factory=list)

    def table(self) -> tuple[list[str], list[list]]:
        """(header, rows) for :func:`tl_lenses.viz.html.table_html`."""
        return _view.score_table(self.rows)

    def to_html(self) -> str:
        """The plot against the swept knob (when one knob varies) and the table, as HTML."""
        return _view.sweep_view(self.rows, True)

    def save_png(self, path, x: str = "layer", title: str = "") -> Path:
        """Faithfulness and causality against ``x`` (PNG, SVG or PDF by suffix)."""
        return _view.sweep_png(path, self.rows, x=x, title=title)

    def _view_html(self, full: bool = False, **view) -> str:
        return _view.sweep_view(self.rows, full)


def sweep(model, relation: Relation | str, layers: Sequence[IntLike], *, n: int = 8,
          betas: Sequence[float] = (1.0,), ranks: Sequence[int | None] = (None,),
          seed: int = 0, progress: bool = False) -> Sweep:
    """Estimate at each layer once; score every (beta, rank) with the baselines.

    ``relation`` is a :class:`Relation`, a starter relation's name or a relation file
    (read by :func:`~tl_lenses.lenses.attribute.relations.get_relation`).
    """
    relation = get_relation(relation)
    train, test = relation.split(n, seed=seed)
    result = Sweep()
    prompts = LRE.identity(1, template=relation.prompt_templates[0], train=tuple(train))
    train_states = collect_states(model, prompts, train, layers)
    test_states = collect_states(model, prompts, test, layers)
    for layer in layers:
        lre = estimate_lre(model, relation, layer, train=train, progress=progress)
        result.lres.append(lre)
        scored = set()        # the baselines ignore beta but not the rank of the inverse
        for beta in betas:
            for rank in ranks:
                rows = score(model, lre.with_beta(beta), train_states, test_states, rank,
                             baselines=rank not in scored)
                scored.add(rank)
                result.rows += rows
    return result


def sweep_n(model, relation: Relation | str, layer: IntLike, ns: Sequence[int], *,
            beta: float = 1.0, seed: int = 0, progress: bool = False) -> Sweep:
    """Faithfulness and causality as the number of training subjects grows."""
    relation = get_relation(relation)
    result = Sweep()
    for n in ns:
        one = sweep(model, relation, [layer], n=n, betas=[beta], seed=seed, progress=progress)
        result.rows += one.rows
        result.lres += one.lres
    return result
