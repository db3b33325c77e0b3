"""dla(heads=False)'s one-stack path and its helpers equal the general paths, bit for bit."""

from __future__ import annotations

import pytest
import torch

from tl_lenses.attribution.core import (
    _component_parts,
    dla,
    logit_directions,
    needed_hooks,
    residual_readout,
)
from tl_lenses.attribution.sublayers import sublayer_components, sublayer_parts
from tl_lenses.hooks import run_cache
from tl_lenses.inputs import str_tokens, to_batch, token_pieces

PROMPTS = ["ab cd ef", "a", "abc abc abc a"]


def _readout(model):
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    return residual_readout(model, logit_directions(model, [("a", "b"), "c", vector]))[0]


@pytest.mark.parametrize("side", ["right", "left", None])
@pytest.mark.parametrize("positions", [-1, 0, None, [0, -2]])
def test_one_stack_equals_the_general_path(tiny_model, side, positions):
    """Left-, right- and un-padded batches, any positions: same labels, same bits."""
    batch = to_batch(tiny_model, PROMPTS if side else torch.randint(0, 256, (2, 7)),
                     padding_side=side)
    cache = run_cache(tiny_model, batch, needed_hooks(tiny_model, heads=False))
    selection, u = batch.select(positions), _readout(tiny_model)
    labels, parts = _component_parts(tiny_model, cache, selection, u, False, False, {})
    fast_labels, values = sublayer_parts(tiny_model, cache.cache_dict, selection, u)
    assert fast_labels == labels
    assert torch.equal(values, torch.cat(parts))


def test_heads_false_from_a_cache_equals_running_and_each_prompt_alone(tiny_model):
    batch = to_batch(tiny_model, PROMPTS, padding_side="left")
    cache = run_cache(tiny_model, batch, needed_hooks(tiny_model, heads=False, left_padded=True))
    ran = dla(tiny_model, batch, ("a", "b"), heads=False)
    cached = dla(tiny_model, batch, ("a", "b"), heads=False, cache=cache)
    assert torch.equal(ran.values, cached.values) and list(ran.labels) == list(cached.labels)
    for i, prompt in enumerate(PROMPTS):
        alone = dla(tiny_model, prompt, ("a", "b"), heads=False)
        torch.testing.assert_close(ran.values[:, i], alone.values[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ran.total(), ran.logits, atol=1e-5, rtol=1e-5)


def test_values_of_many_rows_are_projected_one_by_one_to_the_same_numbers():
    """Past PER_VALUE_ELEMENTS each value is projected alone (no stacked copy): the same
    numbers as one stacked matmul to float rounding, whatever dtype each value has."""
    from tl_lenses.attribution.sublayers import PER_VALUE_ELEMENTS, project_stacked

    gen = torch.Generator().manual_seed(0)
    rows = PER_VALUE_ELEMENTS // 64 + 1
    values = [torch.randn(rows, 1, 64, generator=gen) for _ in range(5)]
    values[2] = values[2].half()
    u = torch.randn(64, 3, generator=gen)
    one_by_one = project_stacked(values, u)
    stacked = torch.stack([v.float() for v in values]) @ u
    assert one_by_one.shape == stacked.shape == (5, rows, 1, 3)
    torch.testing.assert_close(one_by_one, stacked, atol=1e-5, rtol=1e-5)
    small = project_stacked([v[:2] for v in values], u)            # below: one stack
    assert torch.equal(small, torch.stack([v[:2].float() for v in values]) @ u)


def test_sublayer_labels_follow_the_model_shape():
    labels, names = sublayer_components(2, True, False)
    assert labels == ("embed", "pos_embed", "L0 attn", "L0 MLP", "L1 attn", "L1 MLP")
    assert names[1:3] == ("hook_pos_embed", "blocks.0.hook_attn_out")
    assert sublayer_components(2, False, True)[0] == ("embed", "L0 attn", "L1 attn")


@pytest.mark.parametrize("positions", [-1, 0, None, [3, -1, 0], [-7, 6]])
def test_unpadded_selection_equals_the_per_prompt_one(tiny_model, positions):
    batch = to_batch(tiny_model, torch.randint(0, 256, (3, 7)))
    longest = batch.tokens.shape[1]
    wanted = list(range(longest)) if positions is None else (
        [positions] if isinstance(positions, int) else positions)
    shared, general = batch._shared(wanted, longest), batch._per_prompt(wanted, longest)
    assert shared.positions == general.positions
    assert torch.equal(shared.columns, general.columns)
    assert torch.equal(shared.mask, general.mask)
    assert batch.select(positions).positions == general.positions


def test_token_strings_are_remembered_per_tokenizer_and_core(tiny_model):
    """Memoised strings equal TL's own, and a new Rust core (another decoder) is re-read."""
    import copy

    tokenizer, tokens = tiny_model.tokenizer, torch.tensor([[10, 97, 98, 97], [256, 10, 0, 1]])
    for _ in range(2):
        assert str_tokens(tiny_model, tokens) == [tiny_model.to_str_tokens(row) for row in tokens]
    assert token_pieces(tokenizer, [10])[10] == "\n"
    core = copy.deepcopy(tokenizer._tokenizer)
    core.decoder = None  # byte-level pieces come out as their printable stand-ins
    tokenizer._tokenizer = core
    assert token_pieces(tokenizer, [10])[10] == tokenizer.decode([10]) != "\n"


def test_token_strings_are_decoded_when_first_read(tiny_model, monkeypatch):
    """DLA's strings equal TL's own; a TokenStrings decodes nothing before it is read.

    (The DLA result itself is built here under the test run's runtime type checks, which
    read one row of each sequence field: its laziness is checked on TokenStrings alone.)
    """
    from tl_lenses import token_strings

    tokens = torch.tensor([[10, 97, 98, 97], [256, 10, 0, 1]])
    expected = [tiny_model.to_str_tokens(row) for row in tokens]
    assert dla(tiny_model, tokens, ("a", "b"), heads=False).str_tokens == expected
    decoded = []
    real = token_strings._decode_rows
    monkeypatch.setattr(token_strings, "_decode_rows",
                        lambda *args: decoded.append(1) or real(*args))
    strings = token_strings.TokenStrings(tiny_model, tokens)
    assert decoded == [] and len(strings) == 2 and bool(strings)
    assert list(strings[1]) == expected[1] and strings == expected and decoded == [1]
    assert strings != [["x"]] and strings != "not a list"
    for bad in (tokens[0], tokens.float()):
        with pytest.raises(TypeError, match="tokens must be int token ids"):
            token_strings.TokenStrings(tiny_model, bad)


def _float64_dots(values, u):
    """The reference: every row's dot with ``u`` in float64, rounded once to float32."""
    return (torch.stack(values).double() @ u.double()).float()


@pytest.mark.parametrize("d", [64, 37, 576])
def test_the_row_dot_kernel_is_the_float64_dot_rounded(d):
    """C kernel (float32 CPU values of one layout) == float64 reference to 1 ulp, contiguous
    or not, any width (lanes of 8 plus a tail), several directions; torch's path agrees."""
    from tl_lenses.attribution.sublayers import project_stacked
    from tl_lenses.readout import _native as native

    assert native.row_dots_kernel() is not None, native.build_error()  # gcc is a test need
    gen = torch.Generator().manual_seed(d)
    base = [torch.randn(3, 9, d, generator=gen) * 10 for _ in range(6)]
    u = torch.randn(d, 3, generator=gen)
    for values in (base, [b[:, 2:7] for b in base], [b.transpose(0, 1) for b in base],
                   [b[1] for b in base]):
        out = project_stacked(values, u)
        assert out.shape == (6, *values[0].shape[:-1], 3)
        reference = _float64_dots(values, u)
        ulp = torch.finfo(torch.float32).eps * reference.abs()
        assert bool(((out - reference).abs() <= ulp + 1e-30).all())
        # torch's float32 sums: within their own rounding (d * eps of the terms' size)
        size = torch.stack(values).abs() @ u.abs()
        assert bool(((torch.stack(values) @ u - out).abs() <= d * 1.2e-7 * size).all())


def test_values_the_kernel_cannot_read_take_the_torch_path():
    """Half precision, autograd, mixed layouts: no kernel (None), and the right numbers."""
    from tl_lenses.attribution.sublayers import _row_offsets, native_dots, project_stacked

    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(2, 5, 16, generator=gen) for _ in range(3)]
    u = torch.randn(16, 1, generator=gen)
    offsets = _row_offsets((2, 5, 16), values[0].stride())
    assert native_dots(values, offsets, u) is not None
    shorter = [*values[:2], values[2][:, :3]]       # a shorter value would be read past its end
    wider = [*values[:2], torch.randn(2, 5, 32)[..., ::2]]       # same shape, other strides
    for odd in (shorter, wider, [v.bfloat16() for v in values],
                [values[0].requires_grad_(), *values[1:]]):
        assert native_dots(odd, offsets, u) is None
    values[0].requires_grad_(False)
    # a direction with autograd or in float64: torch keeps the graph and the precision
    assert native_dots(values, offsets, u.clone().requires_grad_()) is None
    assert native_dots(values, offsets, u.double()) is None
    u64 = u.double()
    torch.testing.assert_close(project_stacked(values, u64),
                               torch.stack(values).double() @ u64, atol=0, rtol=1e-12)
    assert project_stacked(values, u.clone().requires_grad_()).requires_grad
    with pytest.raises(ValueError, match="u must be"):
        native_dots(values, offsets, u[:8])
    torch.testing.assert_close(project_stacked(wider, u), _float64_dots(wider, u))
    with torch.no_grad():
        grad = torch.randn(2, 5, 16, requires_grad=True)
    projected = project_stacked([grad, *values[1:]], u)
    assert projected.requires_grad          # the torch path keeps autograd
    torch.testing.assert_close(projected, _float64_dots([grad.detach(), *values[1:]], u))


def test_dla_without_the_kernel_agrees_with_it(tiny_model, monkeypatch):
    """No compiler (or a GPU): torch projects, to the kernel's numbers at float32 rounding."""
    from tl_lenses.readout import _native as native

    batch = to_batch(tiny_model, PROMPTS, padding_side="right")
    with_kernel = dla(tiny_model, batch, [("a", "b"), "c"], heads=False)
    monkeypatch.setattr(native, "row_dots_kernel", lambda: None)
    without = dla(tiny_model, batch, [("a", "b"), "c"], heads=False)
    assert with_kernel.labels == without.labels
    torch.testing.assert_close(with_kernel.values, without.values, atol=1e-5, rtol=1e-5,
                               equal_nan=True)
    assert torch.equal(with_kernel.logits, without.logits)
