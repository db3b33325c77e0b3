"""Patchscope presets from Ghandeharioun et al. (2024), each a function with the paper's defaults.

* :func:`token_identity` -- next-token decoding through a few-shot identity prompt, scored by
  Precision@1 and Surprisal against the source model's own final prediction, next to the
  logit lens (and any other :class:`~tl_lenses.readout.lens.Lens`) on the same positions.
* :func:`entity_description` -- a few-shot description prompt, one generation per layer.
* :func:`attribute_extraction` -- "The capital city of x"-style prompts over (l, l*) pairs.
* :func:`chain_of_thought` -- the paper's Figure 4 multi-hop patch (two prompts, or one
  composed prompt with the two parts kept from attending to each other).

Target prompts carry a placeholder (``?`` or ``x``) whose last token is the patched position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_lenses.hooks import resolve_layer, resolve_position
from tl_lenses.inputs import decode_each, one_prompt, str_tokens, to_batch, to_tokens
from tl_lenses.lenses.logit import LogitLens
from tl_lenses.models import check_model
from tl_lenses.patchscopes import view as _view
from tl_lenses.patchscopes.core import check_generation, source_states
from tl_lenses.patchscopes.sweep import SweepResult, patchscope_sweep
from tl_lenses.readout.fingerprint import check_each_lens
from tl_lenses.readout.lens import Lens
from tl_lenses.readout.unembed import Unembed
from tl_lenses.typing import IntLike
from tl_lenses.viz.notebook import NotebookView

IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
DESCRIPTION_PROMPT = (
    "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: South "
    "Korean multinational major appliance and consumer electronics corporation, x"
)


def placeholder_position(model, prompt: str, placeholder: str, *,
                         argument: str = "target_prompt") -> int:
    """The position of the last token of the last ``placeholder`` in ``prompt``."""
    if not isinstance(prompt, str) or placeholder not in prompt:
        raise ValueError(
            f"{argument} must be text containing the placeholder {placeholder!r} (the token "
            f"the hidden state is patched into), got {prompt!r}"
        )
    end = prompt.rindex(placeholder) + len(placeholder)
    full = to_tokens(model, prompt, argument=argument)[0]
    head = to_tokens(model, prompt[:end], argument=argument)[0]
    if not torch.equal(full[: len(head)], head):
        raise ValueError(f"the placeholder {placeholder!r} in {argument} merges with the "
                         "text after it into one token; put a space or newline after it")
    return len(head) - 1


# --- token identity ----------------------------------------------------------------------

@dataclass(repr=False)
class TokenIdentityResult(NotebookView):
    """Per source layer (rows ``layer``) and source position: patched vs lens decodings.

    ``precision_at_1[layer]``: share of positions whose patched top-1 equals the source
    model's final top-1 there; ``surprisal[layer, pos]``: ``-log p_final(patched top-1)``
    (nats). ``lens_*`` hold the same numbers for each lens, keyed by the lens's name.
    """

    layers: list[int]
    positions: list[int]
    str_tokens: list[str]
    final_top1: Int[Tensor, " pos"]
    patched_top1: Int[Tensor, "layer pos"]
    precision_at_1: Float[Tensor, " layer"]
    surprisal: Float[Tensor, "layer pos"]
    lens_top1: dict[str, Tensor] = field(default_factory=dict)
    lens_precision_at_1: dict[str, Tensor] = field(default_factory=dict)
    lens_surprisal: dict[str, Tensor] = field(default_factory=dict)
    tokenizer: Any = field(default=None, repr=False)

    def decode(self, ids: Tensor) -> list:
        """Token ids (any shape) as nested lists of strings."""
        if ids.dim() > 1:
            return [self.decode(row) for row in ids]
        return decode_each(self.tokenizer, ids)

    def summary_rows(self) -> list[list]:
        """One row per layer: layer, patchscope P@1 and mean surprisal, then each lens's."""
        rows = []
        for i, layer in enumerate(self.layers):
            row = [layer, f"{self.precision_at_1[i]:.2f}", f"{self.surprisal[i].mean():.2f}"]
            for name in self.lens_top1:
                row += [f"{self.lens_precision_at_1[name][i]:.2f}",
                        f"{self.lens_surprisal[name][i].mean():.2f}"]
            rows.append(row)
        return rows

    def to_html(self, title: str = "Token identity") -> str:
        """The Precision@1 / surprisal table and the patched top-1 grid, as HTML."""
        return _view.token_identity_html(self, title)

    def save_png(self, path, title: str = "Token identity") -> Path:
        """The patched top-1 grid as a figure (PNG, SVG or PDF by the suffix of ``path``)."""
        return _view.token_identity_png(self, path, title)

    def _view_html(self, full: bool = False, **view) -> str:
        return _view.token_identity_html(self, **view)


def token_identity(
    model, prompt, *, layers: Sequence[IntLike] | None = None,
    positions: Sequence[IntLike] | None = None,
    target_prompt: str = IDENTITY_PROMPT, placeholder: str = "?", lenses: Sequence[Lens] = (),
    batch_size: int = 512,
) -> TokenIdentityResult:
    """Decode each layer's next-token belief with the identity prompt (l* = l), vs lenses.

    The logit lens is always included; pass e.g. a tuned lens in ``lenses`` to add it.

    >>> r = token_identity(model, "The Eiffel Tower is in the city of")   # doctest: +SKIP
    >>> r.precision_at_1                                                   # doctest: +SKIP
    """
    check_model(model)
    check_each_lens(model, lenses)
    tokens = one_prompt(model, prompt, argument="prompt")
    n_pos = tokens.shape[1]
    pos = [resolve_position(p, n_pos, argument="positions")
           for p in (range(n_pos) if positions is None else positions)]
    layer_ids = [resolve_layer(model, l, argument="layers")[0]
                 for l in (range(model.cfg.n_layers + 1) if layers is None else layers)]
    i_star = placeholder_position(model, target_prompt, placeholder)
    sweep = patchscope_sweep(model, tokens, target_prompt, source_layers=layer_ids,
                             source_positions=pos, target_position=i_star, pairs="same", k=1,
                             batch_size=batch_size)
    with torch.no_grad():
        # All real tokens, said explicitly: TL masks pad-id tokens when padding left.
        kwargs = to_batch(model, tokens).forward_kwargs(model)
        final_logprobs = model(tokens, **kwargs)[0, pos].float().log_softmax(-1)
    final_top1 = final_logprobs.argmax(-1)
    patched = sweep.top_ids[:, 0].view(len(layer_ids), len(pos))  # cases run layer-major
    result = TokenIdentityResult(
        layer_ids, pos, [str_tokens(model, tokens)[0][p] for p in pos], final_top1, patched,
        *_score(patched, final_top1, final_logprobs), tokenizer=getattr(model, "tokenizer", None))
    states = source_states(model, tokens, layer_ids, pos)
    unembed = Unembed.from_model(model)
    for lens in [LogitLens(), *lenses]:
        with torch.no_grad():
            top1 = torch.stack([
                unembed(lens.translate(states[i], resolve_layer(model, l)[1])).argmax(-1)
                for i, l in enumerate(layer_ids)])
        result.lens_top1[lens.name] = top1
        result.lens_precision_at_1[lens.name], result.lens_surprisal[lens.name] = \
            _score(top1, final_top1, final_logprobs)
    return result


def _score(top1: Tensor, final_top1: Tensor, final_logprobs: Tensor):
    precision = (top1 == final_top1).float().mean(-1)
    surprisal = -final_logprobs.gather(-1, top1.T).T
    return precision, surprisal


# --- generations: entity description, attribute extraction, chain of thought ------------

@dataclass(repr=False)
class GenerationTable(NotebookView):
    """One generation per source layer (the paper's "Diana, Princess of Wales" table)."""

    layers: list[int]
    generations: list[str]
    source_prompt: str
    source_token: str
    target_prompt: str

    def rows(self) -> list[list]:
        """``[layer, generation]`` rows for a table."""
        return [[layer, text] for layer, text in zip(self.layers, self.generations)]

    def to_html(self, title: str | None = None) -> str:
        """The table of generations per layer, as HTML."""
        return _view.generation_table_html(self, title)

    def _view_html(self, full: bool = False, **view) -> str:
        return _view.generation_table_html(self, **view)


def entity_description(
    model, prompt, *, position: IntLike = -1, layers: Sequence[IntLike] | None = None,
    target_prompt: str = DESCRIPTION_PROMPT, placeholder: str = "x", max_new_tokens: int = 20,
    batch_size: int = 512,
) -> GenerationTable:
    """Describe the entity at ``position`` of ``prompt`` from each layer (l* = l).

    >>> entity_description(model, "Diana, Princess of Wales").rows()   # doctest: +SKIP
    """
    check_model(model)
    check_generation(max_new_tokens)
    tokens = one_prompt(model, prompt, argument="prompt")
    i_star = placeholder_position(model, target_prompt, placeholder)
    sweep = patchscope_sweep(model, tokens, target_prompt, source_layers=layers,
                             source_positions=position, target_position=i_star, pairs="same",
                             k=1, max_new_tokens=max_new_tokens, batch_size=batch_size)
    token = str_tokens(model, tokens)[0][int(sweep.source_position[0])]
    return GenerationTable(sweep.source_layer.tolist(), sweep.generations(),
                           prompt if isinstance(prompt, str) else str(prompt), token,
                           target_prompt)


@dataclass(repr=False)
class AttributeResult(NotebookView):
    """Success rate over samples for each (source layer, target layer) pair."""

    source_layers: list[int]
    target_layers: list[int]
    success: Float[Tensor, "source_layer target_layer"]
    sweep: SweepResult
    objects: list[str]

    def to_html(self, title: str = "Attribute extraction") -> str:
        """The success-rate grid over (l, l*), as HTML."""
        return _view.attribute_html(self, title)

    def save_png(self, path, title: str = "Attribute extraction") -> Path:
        """The success-rate grid as a figure (PNG, SVG or PDF by the suffix of ``path``)."""
        return _view.attribute_png(self, path, title)

    def _view_html(self, full: bool = False, **view) -> str:
        return _view.attribute_html(self, **view)


def attribute_extraction(
    model, samples: Sequence[tuple[str, str, str]], *, source_layers=None, target_layers=None,
    placeholder: str = "x", max_new_tokens: int = 5, batch_size: int = 512,
) -> AttributeResult:
    """Zero-shot attribute extraction: does the object appear in the first N tokens?

    Each sample is ``(source_prompt, target_prompt, object)``: h is read at the last token
    of the source prompt (the subject), patched into the placeholder of the target prompt
    (e.g. ``("France", "The capital city of x", "Paris")``); success means ``object``
    appears (case-insensitive) in the first ``max_new_tokens`` generated tokens.
    """
    check_model(model)
    check_generation(max_new_tokens)
    if not samples or any(not isinstance(s, (tuple, list)) or len(s) != 3 for s in samples):
        raise ValueError("samples must be a non-empty list of (source_prompt, target_prompt, "
                         "object) triples")
    sources, targets, objects = (list(x) for x in zip(*samples))
    positions = [placeholder_position(model, t, placeholder) for t in targets]
    sweep = patchscope_sweep(model, sources, targets, source_layers=source_layers,
                             target_layers=target_layers, target_position=positions,
                             max_new_tokens=max_new_tokens, k=1, batch_size=batch_size)
    hits = [objects[j].strip().lower() in text.lower()
            for j, text in zip(sweep.source_index.tolist(), sweep.generations())]
    rows = sorted(set(sweep.source_layer.tolist()))
    cols = sorted(set(sweep.target_layer.tolist()))
    success = torch.zeros(len(rows), len(cols))
    for case, hit in enumerate(hits):
        success[rows.index(int(sweep.source_layer[case])),
                cols.index(int(sweep.target_layer[case]))] += hit / len(samples)
    return AttributeResult(rows, cols, success, sweep, objects)


def chain_of_thought(
    model, outer: str = "The current CEO of",
    inner: str = "the company that created Visual Basic Script", *, composed: bool = True,
    source_layers=None, target_layers=None, max_new_tokens: int = 5, batch_size: int = 512,
) -> SweepResult:
    """Figure 4's multi-hop patch: h of ``inner``'s last token into ``outer``'s last token.

    With ``composed``, S is ``outer + " " + inner`` run once, with every ``inner`` query
    barred from attending to ``outer`` keys (a hook on each ``attn.hook_attn_scores`` sets
    those scores to -inf; a prepended BOS stays visible), so h depends on ``inner`` alone
    while sitting at its composed positions. Otherwise S is ``inner`` on its own (so
    ``composed=False`` with ``" " + inner`` sees the same tokens as the composed run). The
    target is ``outer`` (the composed prompt's prefix), patched at its last token, from
    where the model generates.
    """
    check_model(model)
    check_generation(max_new_tokens)
    for name, text in (("outer", outer), ("inner", inner)):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{name} must be a non-empty string, got {text!r}")
    outer_tokens = one_prompt(model, outer, argument="outer")
    if not composed:
        source, hooks = inner, []
    else:
        tail = model.to_tokens(" " + inner, prepend_bos=False)[:1].to(outer_tokens.device)
        source = torch.cat([outer_tokens, tail], dim=1)
        bos = 1 if getattr(model.cfg, "default_prepend_bos", False) else 0
        hooks = [(f"blocks.{l}.attn.hook_attn_scores",
                  block_attention(range(outer_tokens.shape[1], source.shape[1]),
                                  range(bos, outer_tokens.shape[1])))
                 for l in range(model.cfg.n_layers)]
    return patchscope_sweep(model, source, outer, source_layers=source_layers,
                            target_layers=target_layers, max_new_tokens=max_new_tokens, k=1,
                            source_fwd_hooks=hooks, batch_size=batch_size)


def block_attention(queries: Sequence[int], keys: Sequence[int]):
    """A hook on ``attn.hook_attn_scores`` ([batch head q k]) setting (queries, keys) to -inf."""
    q = torch.as_tensor(list(queries), dtype=torch.long)
    k = torch.as_tensor(list(keys), dtype=torch.long)

    def hook(scores: Tensor, hook) -> Tensor:
        scores = scores.clone()
        scores[:, :, q[:, None], k[None, :]] = float("-inf")
        return scores

    return hook
