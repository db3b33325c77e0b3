"""Linear relational embeddings (Hernandez et al. 2024), estimated with autograd.

For a relation r and a few-shot prompt ending in ``template(subject)``, let ``s`` be the
residual at layer ``l`` on the subject's last token and ``z = F(s)`` the final residual
(``blocks.{n_layers-1}.hook_resid_post``, before the final norm) at the prompt's last token.
The LRE is the first-order approximation of F averaged over n training subjects::

    W = mean_i dF/ds (s_i)        b = mean_i (z_i - J_i s_i)        LRE(s) = beta * W s + b

Layers index the residual stream as :func:`tl_lenses.hooks.resid_names` does: ``l`` is
``blocks.{l}.hook_resid_pre`` (0 = the embeddings) and ``l = n_layers`` is the final
``resid_post`` (there J is the identity when the subject ends the prompt, else zero).

The Jacobian of a HookedTransformer runs only the tokens from the subject's last token on,
through the blocks after ``l``, against a frozen key/value cache of the prefix, with
forward-mode autograd over d_model directions in vmapped chunks (``torch.func.jvp``). Other
models (the TransformerBridge) replace ``s`` by a leaf through a hook and take d_model
reverse-mode passes over the whole prompt: exact, but slower.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_lenses._autograd import needs_autograd
from tl_lenses.hooks import final_resid_name, flowing_name, resid_names, resolve_layer
from tl_lenses.inputs import require_tokenizer, to_tokens
from tl_lenses.lenses.attribute.relations import (
    Relation,
    Sample,
    check_template,
    few_shot_prompt,
    get_relation,
)
from tl_lenses.models import check_model, is_bridge
from tl_lenses.readout.fingerprint import check_same_model, model_info
from tl_lenses.typing import IntLike
from tl_lenses.viz.brief import brief_repr

logger = logging.getLogger("tl_lenses")

METHODS = ("auto", "kv-cache", "hooks")
JVP_CHUNK = 128


@dataclass(frozen=True)
class LRE:
    """An affine map ``s -> beta * W s + b`` from a layer's residual to the final residual.

    ``weight`` is ``W`` laid out as ``[out, in]`` (``z = W @ s``). ``train`` and
    ``template`` rebuild the few-shot prompts it was estimated with (:meth:`prompt`);
    ``method`` says what made it: ``"jacobian"``, or a baseline (``"identity"``,
    ``"least squares"``). ``model_info`` is the fingerprint of the model it was estimated
    on (:func:`tl_lenses.readout.fingerprint.model_info`; empty when unknown): every use on a
    model checks it, so an LRE of another model is an error.
    """

    weight: Float[Tensor, "d_model d_model"]
    bias: Float[Tensor, " d_model"]
    beta: float = 1.0
    layer: int = 0
    relation: str = ""
    template: str = "{}"
    train: tuple[Sample, ...] = ()
    method: str = "jacobian"
    model_info: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    __repr__ = brief_repr  # one line: tensors by shape, lists by length

    def __call__(self, s: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows d_model"]:
        """``beta * W s + b`` for every row of ``s`` (``[*rows, d_model]``)."""
        weight, bias = self.weight.to(s), self.bias.to(s)         # s's device and dtype
        return self.beta * (s @ weight.T) + bias

    @property
    def n(self) -> int:
        """How many training subjects the map was fitted on."""
        return len(self.train)

    @property
    def d_model(self) -> int:
        """Residual width the map reads and writes."""
        return self.weight.shape[0]

    def with_beta(self, beta: float) -> "LRE":
        """The same map with another ``beta`` (the paper's scale on ``W s``)."""
        if not isinstance(beta, (int, float)) or isinstance(beta, bool):
            raise TypeError(f"beta must be a number, got {beta!r}")
        return dataclasses.replace(self, beta=float(beta))

    def low_rank(self, rank: int) -> "LRE":
        """``W`` replaced by its rank-``rank`` truncated SVD (``b`` and ``beta`` kept)."""
        u, sigma, vh = torch.linalg.svd(self.weight.double())
        k = _check_rank(rank, self.d_model)
        weight = (u[:, :k] * sigma[:k]) @ vh[:k]
        return dataclasses.replace(self, weight=weight.to(self.weight.dtype))

    def pinv(self, rank: int | None = None) -> Float[Tensor, "d_model d_model"]:
        """The rank-``rank`` pseudoinverse of ``W`` (all non-zero singular values if None)."""
        u, sigma, vh = torch.linalg.svd(self.weight.double())
        # numpy's rule, with the eps of the stored dtype (a float32 W has float32 noise)
        keep = sigma > sigma.max() * max(self.weight.shape) * torch.finfo(self.weight.dtype).eps
        if rank is not None:
            keep &= torch.arange(len(sigma)) < _check_rank(rank, self.d_model)
        inverse = (vh[keep].T / sigma[keep]) @ u[:, keep].T
        return inverse.to(self.weight.dtype)

    def prompt(self, subject: str) -> str:
        """The few-shot prompt for ``subject``: the training facts as demonstrations."""
        return few_shot_prompt(self.template, subject,
                               [d for d in self.train if d.subject != subject])

    @classmethod
    def identity(cls, d_model: int, **fields) -> "LRE":
        """``W = I``, ``b = 0``: as a lens it is the logit lens (the baseline operator)."""
        fields.setdefault("method", "identity")
        return cls(torch.eye(d_model), torch.zeros(d_model), **fields)


def check_lre(model, lre, *, argument: str = "lre") -> None:
    """An :class:`LRE` of ``model``'s width, estimated on ``model`` when it says which.

    Raises:
        TypeError: naming ``argument``: not an LRE (its ``weight`` tensor, say).
        ValueError: naming ``argument``: another width, or a ``model_info`` fingerprint of
            another model (:func:`~tl_lenses.readout.fingerprint.check_same_model`).
    """
    if not isinstance(lre, LRE):
        raise TypeError(f"{argument} must be an LRE (from estimate_lre or load_lre), got "
                        f"{type(lre).__name__}")
    if lre.d_model != model.cfg.d_model:
        raise ValueError(f"{argument} has d_model={lre.d_model} but the model has "
                         f"d_model={model.cfg.d_model}: it was estimated on another model")
    if lre.model_info:
        check_same_model(lre.model_info, model, source=argument)


@dataclass(frozen=True)
class JacobianSample:
    """One subject's linearisation: ``s``, ``z = F(s)`` and ``J = dz/ds``."""

    s: Float[Tensor, " d_model"]
    z: Float[Tensor, " d_model"]
    jacobian: Float[Tensor, "d_model d_model"]
    subject_position: int
    hook_name: str


def _check_rank(rank, d_model: int) -> int:
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= d_model:
        raise ValueError(f"rank must be an int in [1, d_model={d_model}], got {rank!r}")
    return rank


def subject_position(model, prompt: str, subject: str) -> tuple[Int[Tensor, "batch pos"], int]:
    """(tokens of ``prompt``, position of the last token of the LAST ``subject`` in it).

    The prefix up to the end of the subject must tokenize to a prefix of the prompt's
    tokens, so the position is a token that ends exactly where the subject does.
    """
    if not isinstance(subject, str) or not subject:
        raise ValueError(f"subject must be non-empty text, got {subject!r}")
    start = prompt.rfind(subject)
    if start < 0:
        raise ValueError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    tokens = to_tokens(model, prompt, argument="prompt")
    prefix = to_tokens(model, prompt[:start + len(subject)], argument="prompt")
    n = prefix.shape[1]
    if n > tokens.shape[1] or not torch.equal(tokens[0, :n], prefix[0]):
        raise ValueError(
            f"subject {subject!r} does not end on a token boundary of the tokenized prompt "
            f"{prompt!r}; rephrase the template so a space or punctuation follows the subject"
        )
    return tokens, n - 1


@needs_autograd
def relation_jacobian(model, prompt: str, subject: str, layer: IntLike, *,
                      method: str = "auto") -> JacobianSample:
    """``s``, ``z`` and ``dz/ds`` for one prompt (see the module docstring for s, z, l).

    >>> sample = relation_jacobian(model, "The capital of France is", "France", 8)  # doctest: +SKIP
    >>> sample.jacobian.shape                                                    # doctest: +SKIP
    torch.Size([576, 576])
    """
    layer = _check_layer_and_method(model, layer, method)
    shortformer = model.cfg.positional_embedding_type == "shortformer"
    tokens, pos = subject_position(model, prompt, subject)
    use_cache = method == "kv-cache" or (method == "auto" and not is_bridge(model)
                                         and not shortformer)
    s, z, jac = (_jacobian_kv_cache if use_cache else _jacobian_hooks)(model, tokens, layer, pos)
    return JacobianSample(s.detach(), z.detach(), jac.detach(), pos, resid_names(model)[layer])


def _check_layer_and_method(model, layer, method: str) -> int:
    """The checked layer index; refuses a ``method`` the model cannot run."""
    check_model(model)
    layer = resolve_layer(model, layer, negative=False)[0]
    if method not in METHODS:
        raise ValueError(f"method must be 'auto', 'kv-cache' or 'hooks', got {method!r}")
    if method == "kv-cache" and is_bridge(model):
        raise ValueError("method='kv-cache' needs a HookedTransformer; use 'hooks' or 'auto'")
    # TL's forward(start_at_layer=...) drops the shortformer position embedding that each
    # block adds to its queries and keys, so the kv-cache path would differentiate another
    # function there.
    if method == "kv-cache" and model.cfg.positional_embedding_type == "shortformer":
        raise ValueError("method='kv-cache' cannot run a shortformer model from a middle "
                         "layer (TL drops its position embedding there); use 'hooks' or 'auto'")
    return layer


def _jacobian_kv_cache(model, tokens: Tensor, layer: int, pos: int):
    """HookedTransformer: forward-mode Jacobian of the suffix against a frozen prefix cache."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    n_layers = model.cfg.n_layers
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
    with torch.no_grad():
        if pos > 0:
            model(tokens[:, :pos], past_kv_cache=cache, return_type=None)
        cache.freeze()
        suffix = model(tokens[:, pos:], past_kv_cache=cache, stop_at_layer=layer)

    def final_residual(s: Tensor) -> Tensor:
        # no_grad inside: torch.func transforms turn grad mode back on, and the weights
        # require grad, so autograd kept every vmapped activation of every chunk for a
        # backward pass that never comes (12 GB on SmolLM2). Forward-mode tangents do not
        # depend on grad mode.
        with torch.no_grad():
            resid = torch.cat([s[None, None], suffix[:, 1:]], dim=1)
            out = model(resid, start_at_layer=layer, stop_at_layer=n_layers,
                        past_kv_cache=cache)
        return out[0, -1]

    s = suffix[0, 0].clone()
    with torch.no_grad():
        z = final_residual(s)
    # Columns J e_j by forward mode, JVP_CHUNK directions per vmapped pass: all d_model
    # at once costs several GB on SmolLM2 for no speed-up.
    column = torch.func.vmap(lambda e: torch.func.jvp(final_residual, (s,), (e,))[1])
    eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    jac = torch.cat([column(eye[i:i + JVP_CHUNK]) for i in range(0, len(eye), JVP_CHUNK)]).T
    return s, z, jac


def _jacobian_hooks(model, tokens: Tensor, layer: int, pos: int, n_rows: int | None = None):
    """Any backend: s becomes a leaf through a hook; d_model reverse passes give dz/ds.

    ``n_rows`` stops after the first rows of the Jacobian (the benchmark times a few).
    """
    seen: dict[str, Tensor] = {}

    def swap_in_leaf(resid, hook):
        seen["s"] = resid[0, pos].detach().clone().requires_grad_(True)
        return torch.cat([resid[:, :pos], seen["s"][None, None], resid[:, pos + 1:]], dim=1)

    def keep_final(resid, hook):
        seen["z"] = resid[0, -1]

    hooks = [(flowing_name(model.hook_dict, name), fn) for name, fn in
             [(resid_names(model)[layer], swap_in_leaf), (final_resid_name(model), keep_final)]]
    with torch.enable_grad():
        model.run_with_hooks(tokens, fwd_hooks=hooks, return_type=None)
        s, z = seen["s"], seen["z"]
        if not z.requires_grad:  # z cannot depend on s (e.g. l = n_layers, s not last)
            return s, z, torch.zeros(z.shape[0], s.shape[0], dtype=z.dtype, device=z.device)
        eye = torch.eye(z.shape[0], dtype=z.dtype, device=z.device)[:n_rows]
        rows = [torch.autograd.grad(z, s, e, retain_graph=True, allow_unused=True)[0]
                for e in eye]
    rows = [torch.zeros_like(s) if r is None else r for r in rows]
    return s, z, torch.stack(rows)


def lre_from_jacobians(samples: Sequence[JacobianSample], *, beta: float = 1.0,
                       **fields) -> LRE:
    """``W = mean J_i``, ``b = mean (z_i - J_i s_i)``, accumulated in float64."""
    if not samples:
        raise ValueError("samples must hold at least one JacobianSample")
    jac = torch.stack([x.jacobian.double() for x in samples])
    s = torch.stack([x.s.double() for x in samples])
    z = torch.stack([x.z.double() for x in samples])
    bias = (z - torch.einsum("nij,nj->ni", jac, s)).mean(0)
    dtype = samples[0].jacobian.dtype
    return LRE(jac.mean(0).to(dtype), bias.to(dtype), beta=float(beta), **fields)


@needs_autograd
def estimate_lre(
    model, relation: Relation | str, layer: IntLike, *, n: int | None = None,
    train: Sequence[Sample] | None = None,
    beta: float = 1.0, rank: int | None = None, template: int = 0, seed: int = 0,
    method: str = "auto", progress: bool = False,
) -> LRE:
    """Estimate the linear relational embedding (Hernandez et al. 2024, eq. 3) of ``relation``.

    ``LRE(s) = beta W s + b`` with ``W = E[dz/ds]`` and ``b = E[z - W s]`` over ``n``
    training subjects, where ``s`` is the subject's last token at ``layer`` and ``z`` the
    final residual (before the norm) at the prompt's last token. Each prompt shows the other
    training facts as demonstrations, as in the paper. Averages are taken in float64.

    Args:
        model: the model.
        relation: a :class:`~tl_lenses.lenses.attribute.relations.Relation`, or a starter
            relation's name or a relation file (as :func:`~tl_lenses.lenses.attribute.
            relations.get_relation` reads them).
        layer: residual-stream layer of ``s`` (0 = embedding, ``n_layers`` = final; no
            negatives).
        n: the number of training subjects, drawn with ``seed`` (default 8); with ``train``
            it must be None or ``len(train)``.
        train: explicit training samples (then ``seed`` draws nothing).
        beta: the scale of ``W s``.
        rank: truncate ``W`` to this rank (SVD), or None.
        template: which of the relation's prompt templates.
        seed: the draw of training subjects.
        method: ``"auto"``, ``"kv-cache"`` (forward mode over a KV-cached prefix; a
            HookedTransformer only) or ``"hooks"`` (re-runs the prompt with a hook); ``"auto"``
            takes ``"kv-cache"`` where it can.
        progress: log each Jacobian.

    Returns:
        An :class:`LRE` (``weight [d_model, d_model]``, ``bias [d_model]``).

    Raises:
        ValueError: naming the argument: ``layer``, ``n`` or ``rank`` out of range, ``n``
            contradicting ``train``, a non-finite ``beta``, an unknown ``method``, a subject
            missing from its prompt.
        TypeError: naming the argument: a ``relation``, ``beta``, ``seed`` or ``progress``
            of the wrong type.

    >>> facts = tuple(Sample(s, o) for s, o in zip("abcdef", "uvwxyz"))
    >>> relation = Relation("toy", ("{} =",), facts)
    >>> lre = estimate_lre(model, relation, layer=1, n=3)
    >>> lre.weight.shape == (model.cfg.d_model, model.cfg.d_model)
    True
    """
    relation = get_relation(relation)
    _check_scalars(beta=beta, seed=seed, progress=progress)
    train = _training_samples(relation, n, train, seed)
    template_text = _template(relation, template)
    _check_layer_and_method(model, layer, method)  # before the prompts' lengths
    _check_prompts_fit(model, template_text, train)
    demo_lre = LRE.identity(1, template=template_text, train=tuple(train))
    samples = []
    for i, sample in enumerate(train):
        if progress:
            logger.info("Jacobian %d/%d: %r", i + 1, len(train), sample.subject)
        samples.append(relation_jacobian(model, demo_lre.prompt(sample.subject),
                                         sample.subject, layer, method=method))
    lre = lre_from_jacobians(samples, beta=beta, layer=layer, relation=relation.name,
                             template=template_text, train=tuple(train))
    lre = dataclasses.replace(lre, model_info=model_info(model))
    return lre if rank is None else lre.low_rank(rank)


def _check_prompts_fit(model, template: str, train: Sequence[Sample]) -> None:
    """Refuse few-shot prompts longer than n_ctx, naming n and the largest n that fits.

    The prompts are built here, not written by the user, so the message says what they are.
    ``relation.split(k, seed)`` draws the first ``k`` of the same order as ``n``, so
    ``train[:k]`` is what ``n=k`` would use.
    """
    require_tokenizer(model)
    n_ctx = model.cfg.n_ctx

    def longest(k: int) -> int:
        demo = LRE.identity(1, template=template, train=tuple(train[:k]))
        return max(model.to_tokens(demo.prompt(s.subject), truncate=False).shape[-1]
                   for s in train[:k])

    length = longest(len(train))
    if length <= n_ctx:
        return
    fits = next((k for k in range(len(train) - 1, 0, -1) if longest(k) <= n_ctx), None)
    advice = (f"pass a smaller n (n={fits} fits)" if fits else
              "even one example's prompt does not fit; use a model with a longer context "
              "or a shorter template")
    raise ValueError(
        f"the few-shot prompts of n={len(train)} training examples (each shows the others "
        f"as demonstrations before its subject) are up to {length} tokens long, more than "
        f"the model's n_ctx={n_ctx}; {advice}"
    )


def _check_scalars(*, beta, seed, progress) -> None:
    if not isinstance(beta, (int, float)) or isinstance(beta, bool):
        raise TypeError(f"beta must be a number, got {beta!r}")
    if not math.isfinite(beta):
        raise ValueError(f"beta must be finite, got {beta!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {progress!r}")


def _training_samples(relation: Relation, n: int | None, train, seed: int) -> list[Sample]:
    if train is not None:
        train = list(train)
        if not train or not all(isinstance(x, Sample) for x in train):
            raise ValueError("train must be a non-empty sequence of relations.Sample")
        if n is not None and n != len(train):  # never silently one or the other
            raise ValueError(f"n={n!r} contradicts train, which holds {len(train)} samples: "
                             "pass one of them")
        return train
    n = 8 if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n < len(relation.samples):
        raise ValueError(
            f"n must be an int in [1, {len(relation.samples)}) for relation "
            f"{relation.name!r} with {len(relation.samples)} samples (some must be held "
            f"out), got {n!r}"
        )
    return relation.split(n, seed=seed)[0]


def _template(relation: Relation, template: int) -> str:
    if isinstance(template, bool) or not isinstance(template, int) \
            or not 0 <= template < len(relation.prompt_templates):
        raise ValueError(f"template must index relation.prompt_templates "
                         f"(0..{len(relation.prompt_templates) - 1}), got {template!r}")
    return check_template(relation.prompt_templates[template])
