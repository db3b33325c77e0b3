"""What a new user of tl_lenses hit in a notebook (audit 2), each pinned by a test.

Attention patterns drawn beside DLA must be the ones the model computed on each prompt
(padded batches included) and must not flood a notebook cell; a lens class passed where an
instance belongs, or a list where ``{name: lens}`` belongs, is refused by name; numpy token
ids work like tensors; reprs of LREs, affine maps, training results and token splits are
one short line.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from conftest import assert_no_hooks

import tl_lenses as tll
from tl_lenses.attribution.attention import head_patterns
from tl_lenses.attribution.view import MAX_INLINE_ATTENTION
from tl_lenses.tiny import tiny_default

PROMPTS = ["abc", "abcdefgh"]


def _pair(label: str) -> tuple[int, int]:
    layer, head = label[1:].split("H")
    return int(layer), int(head)


@pytest.mark.parametrize("side", ["left", "right"])
def test_attention_beside_a_padded_batch_is_each_prompts_own(tiny_model, side):
    """Patterns were taken without the mask: left-padded tokens attended to their pads."""
    dla = tll.dla(tiny_model, PROMPTS, ("a", "b"), padding_side=side).with_attention(
        tiny_model, k=3)
    paths = tll.head_path_dla(tiny_model, PROMPTS, ("a", "b"), heads=list(dla.attention),
                              padding_side=side).with_attention(tiny_model)
    width = max(map(len, PROMPTS))
    for b, prompt in enumerate(PROMPTS):
        real = torch.zeros(width, dtype=torch.bool)
        real[slice(width - len(prompt), None) if side == "left" else slice(len(prompt))] = True
        alone = tiny_model.to_tokens(prompt)
        for label in dla.attention:
            own = head_patterns(tiny_model, alone, [_pair(label)])[0, 0]
            for result in (dla, paths):
                shown = result.attention[label][b][real][:, real]
                torch.testing.assert_close(shown, own, atol=1e-5, rtol=1e-5)
        assert torch.equal(dla.attention_mask[b].cpu(), real)
    assert_no_hooks(tiny_model)


def _rendered_attention(monkeypatch) -> list[dict]:
    """The props of every AttentionPatterns view rendered from now on."""
    import circuitsvis.utils.render as render_module

    seen, render = [], render_module.render

    def spy(name, **props):
        if name == "AttentionPatterns":
            seen.append(props)
        return render(name, **props)

    monkeypatch.setattr(render_module, "render", spy)
    return seen


def test_inline_attention_shows_a_window_ending_at_the_attributed_token(monkeypatch):
    """4 heads over 500 tokens were 15 MB of notebook output; show() keeps every position."""
    model = tiny_default("gpt2", n_ctx=256)
    n = MAX_INLINE_ATTENTION + 30
    tokens = torch.arange(n)[None] + 33
    result = tll.dla(model, tokens, (5, 6), positions=[-10]).with_attention(model, k=2)
    seen = _rendered_attention(monkeypatch)
    inline = result._repr_html_()
    full = result._view_html(full=True)
    small, big = (torch.tensor(props["attention"], dtype=torch.float64) for props in seen)
    assert small.shape == (2, MAX_INLINE_ATTENTION, MAX_INLINE_ATTENTION)
    assert big.shape == (2, n, n)
    end = n - 10 + 1                                    # the attributed token, included
    label = list(result.attention)[0]
    expected = result.attention[label][0][end - MAX_INLINE_ATTENTION:end,
                                          end - MAX_INLINE_ATTENTION:end]
    torch.testing.assert_close(small[0], expected.double(), atol=5e-5, rtol=0)
    assert seen[0]["tokens"][-1] == seen[1]["tokens"][end - 1]
    assert f"of the prompt's {n}" in inline and "result.show()" in inline
    assert "of the prompt's" not in full
    assert len(inline) < len(full)


def test_attention_view_leaves_a_padded_prompts_pads_out(monkeypatch):
    model = tiny_default("gpt2")
    result = tll.dla(model, PROMPTS, ("a", "b"), padding_side="left").with_attention(model, k=1)
    seen = _rendered_attention(monkeypatch)
    result._view_html(batch=0)
    assert len(seen[0]["tokens"]) == len(PROMPTS[0])
    assert torch.tensor(seen[0]["attention"]).shape == (1, 3, 3)


@pytest.mark.parametrize("lens_class", [tll.LogitLens, tll.TunedLens])
def test_a_lens_class_instead_of_a_lens_is_refused_by_name(lens_class):
    model = tiny_default()
    with pytest.raises(TypeError, match=r"lens must be a lens instance, got the class"):
        tll.apply_lens(model, "abc", lens_class)
    with pytest.raises(TypeError, match=r"lenses\['logit'\] .*class"):
        tll.evaluate_lenses(model, torch.randint(0, 256, (2, 6)), {"logit": lens_class})
    assert_no_hooks(model)


def test_evaluate_lenses_refuses_a_list_naming_the_dict_it_needs():
    """It failed as "cannot convert dictionary update sequence element #0 to a sequence".

    The test run's jaxtyping check refuses the list before the function runs, so the
    function a user calls (no runtime type checker) is called unwrapped.
    """
    model = tiny_default()
    evaluate = inspect.unwrap(tll.evaluate_lenses)
    with pytest.raises(TypeError, match=r"lenses must be a dict name -> lens"):
        evaluate(model, torch.randint(0, 256, (2, 6)), [tll.LogitLens()])


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16])
def test_numpy_token_ids_work_as_tensors_do(dtype):
    model = tiny_default()
    tokens = torch.randint(0, 256, (2, 6))
    ids = tokens.numpy().astype(dtype)
    torch.testing.assert_close(tll.logit_lens(model, ids).top_probs,
                               tll.logit_lens(model, tokens).top_probs, rtol=0, atol=0)
    torch.testing.assert_close(tll.dla(model, ids, ("a", "b")).values,
                               tll.dla(model, tokens, ("a", "b")).values, rtol=0, atol=0)
    one = tll.logit_lens(model, ids[0])
    assert one.tokens.shape == (1, 6)


def test_reprs_of_what_users_print_are_one_short_line():
    """An LRE's repr printed its d_model x d_model weight and bias (10 kB on SmolLM2), a
    relation every sample (3 kB), a training result every step's loss."""
    from tl_lenses.patchscopes.core import AffineMap
    from tl_lenses.patchscopes.cross import AffineFit

    model = tiny_default()
    d = model.cfg.d_model
    split = tll.token_split(model, texts=["some text for a tiny lens " * 30], seq_len=16)
    trained = tll.train_tuned_lens(model, split.train, steps=12, ls_tokens=0, batch_size=2)
    lre = tll.LRE(torch.randn(d, d), torch.randn(d), relation="r", layer=1)
    fit = AffineFit(AffineMap(torch.randn(3, d), torch.randn(3)), 0.5, 10)
    relation = tll.attribute.get_relation("country_capital")
    for value in (lre, fit, fit.map, trained, split, relation):
        text = repr(value)
        assert text.startswith(type(value).__name__ + "(") and "\n" not in text, text
        assert "tensor(" not in text and len(text) < 600, text
    assert "layer=1" in repr(lre) and "weight=Tensor[" in repr(lre)
    assert "steps=12" in repr(trained) and "losses=<list of 12>" in repr(trained)


def test_python_dash_m_tl_lenses_runs_the_command_line():
    """``python -m tl_lenses`` said "'tl_lenses' is a package and cannot be directly executed"."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "tl_lenses", "--help"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "train-tuned" in out.stdout and "logit-lens" in out.stdout


@pytest.mark.parametrize("text", [["the cat sat on the mat"] * 4, "the cat sat on the mat"])
def test_training_on_text_says_how_to_make_token_rows(text):
    """The README lists strings among the tuned lens's texts; they go through token_split."""
    model = tiny_default()
    with pytest.raises(ValueError, match=r"^tokens must be .*got (list|str); .*token_split"):
        inspect.unwrap(tll.train_tuned_lens)(model, text, steps=1)
