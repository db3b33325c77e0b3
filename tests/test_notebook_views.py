"""Every result type displays itself: ``_repr_html_``, ``show()``, ``to_html``, ``save_png``."""

from __future__ import annotations

import logging
import re
import sys
import types

import pytest
import torch
from test_text_safety import parsed

import tl_lenses as tll
from tl_lenses.tiny import tiny_default
from tl_lenses.viz.notebook import display_html

FIGURE_MAGIC = {".png": b"\x89PNG\r\n\x1a\n", ".pdf": b"%PDF", ".svg": b"<?xml"}


@pytest.fixture(scope="module")
def model():
    return tiny_default("gpt2", n_ctx=256)


@pytest.fixture(scope="module")
def results(model):
    """One result of every type, on the tiny model."""
    from tl_lenses.attribution import head_path_dla
    from tl_lenses.lenses.attribute.metrics import Score, Sweep
    from tl_lenses.lenses.tuned import evaluate_lenses
    from tl_lenses.patchscopes import (
        attribute_extraction,
        entity_description,
        patchscope,
        patchscope_sweep,
        token_identity,
    )

    tokens = torch.arange(30, 60)[None]
    dla = tll.dla(model, tokens, (5, 6))
    scores = [Score("rel", method, layer, 4, 1.0, None, f, c, 3, 2)
              for layer, (f, c) in enumerate([(0.2, 0.1), (0.5, 0.4)])
              for method in ("lre", "logit lens")]
    return {
        "lens": tll.logit_lens(model, "hello world, $$x^2$$", k=3, target="next"),
        "evaluation": evaluate_lenses(model, tokens.repeat(2, 1)),
        "dla": dla.with_attention(model, k=2),
        "paths": head_path_dla(model, tokens, (5, 6), heads=["L1H0", "L2H3"])
        .with_attention(model),
        "patchscope": patchscope(model, "hello", "x is", source_layer=1, max_new_tokens=2),
        "sweep": patchscope_sweep(model, "hello", "x is", source_layers=[0, 1],
                                  target_layers=[1, 2], max_new_tokens=1),
        "identity": token_identity(model, "hello world"),
        "generations": entity_description(model, "hello", layers=[0, 1], max_new_tokens=2),
        "attribute": attribute_extraction(model, [("hi a", "x:", "a"), ("hi b", "x:", "b")],
                                          source_layers=[0, 1], target_layers=[1],
                                          max_new_tokens=2),
        "score": scores[0],
        "lre_sweep": Sweep(scores),
    }


NAMES = ["lens", "evaluation", "dla", "paths", "patchscope", "sweep", "identity",
         "generations", "attribute", "score", "lre_sweep"]


@pytest.mark.parametrize("name", NAMES)
def test_every_result_renders_inline_offline(results, name):
    html = results[name]._repr_html_()
    assert html.startswith("<div class='tll'") and "<style>" in html
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", html)  # nothing from a network
    assert "unpkg.com" not in html and "import {" not in html  # circuitsvis's CDN form
    assert len(parsed(html).scripts) == html.count("</script>")  # no script cut short


@pytest.mark.parametrize("name", NAMES)
def test_repr_is_one_short_line_naming_the_fields(results, name):
    """A console or print() shows a summary, not every tensor and token (the dataclass repr
    of a lens over 8 x 500 tokens was ~68k characters)."""
    import dataclasses

    result = results[name]
    text = repr(result)
    assert text.startswith(type(result).__name__ + "(") and "\n" not in text
    assert len(text) < 1200 and "tensor(" not in text
    if type(result).__repr__ is tll.viz.notebook.NotebookView.__repr__:
        assert all(f"{f.name}=" in text for f in dataclasses.fields(result) if f.repr)


@pytest.mark.parametrize("name", NAMES)
def test_show_outside_a_kernel_says_how_to_see_it(results, name, caplog):
    with caplog.at_level(logging.WARNING, logger="tl_lenses"):
        assert results[name].show() is None
    assert "notebook" in caplog.text and "to_html" in caplog.text


def test_show_hands_the_full_view_to_ipython(results, monkeypatch):
    shown = []
    display = types.ModuleType("IPython.display")
    display.HTML = lambda html: ("HTML", html)
    display.display = shown.append
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: object()
    ipython.display = display
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    results["lens"].show()
    assert len(shown) == 1 and shown[0][0] == "HTML"
    assert "KL(final || layer)" in shown[0][1]  # the full view adds the KL grid
    assert display_html("<p>x</p>") is True


def test_a_long_prompt_shows_a_window_inline_and_everything_in_full(model):
    from tl_lenses.readout.view import MAX_INLINE_POSITIONS

    n = MAX_INLINE_POSITIONS + 25
    result = tll.logit_lens(model, torch.arange(n)[None] + 33, k=2)
    inline, full = result._repr_html_(), result._view_html(full=True)
    assert f"last {MAX_INLINE_POSITIONS} of {n} positions" in inline
    assert "result.show()" in inline
    first_row = lambda html: html.split("<tr>")[1]  # noqa: E731  (the column header row)
    assert first_row(inline).count("<th>") == MAX_INLINE_POSITIONS + 1
    assert first_row(full).count("<th>") == n + 1


FIGURES = [("lens", {}), ("dla", {"view": "heads"}), ("dla", {"view": "top"}),
           ("paths", {}), ("evaluation", {}), ("sweep", {}), ("identity", {}),
           ("attribute", {}), ("lre_sweep", {})]


@pytest.mark.parametrize("name,options", FIGURES)
@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_every_figure_writer_takes_the_format_from_the_suffix(results, tmp_path, name, options,
                                                              suffix):
    path = results[name].save_png(tmp_path / f"figure{suffix}", **options)
    assert path == tmp_path / f"figure{suffix}"
    assert path.read_bytes()[:len(FIGURE_MAGIC[suffix])] == FIGURE_MAGIC[suffix]


def test_a_figure_path_with_another_suffix_is_refused(results, tmp_path):
    with pytest.raises(ValueError, match="path must end in one of"):
        results["lens"].save_png(tmp_path / "grid.jpg")
    assert not (tmp_path / "grid.jpg").exists()


def test_to_html_is_text_for_every_result(results):
    for name in NAMES:
        result = results[name]
        if hasattr(result, "to_html"):
            assert isinstance(result.to_html(), str) and result.to_html()


def test_attention_patterns_agree_across_backends_and_are_causal():
    from tl_lenses.attribution.attention import head_patterns
    from tl_lenses.tiny import tiny_pair

    hooked, bridge = tiny_pair("llama-gqa")
    tokens = torch.arange(40, 52)[None]
    heads = [(1, 2), (0, 3), (2, 0)]
    a, b = head_patterns(hooked, tokens, heads), head_patterns(bridge, tokens, heads)
    assert a.shape == (3, 1, 12, 12)
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 1, 12))
    assert float(torch.triu(a, diagonal=1).abs().max()) == 0.0
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="heads must be"):
        head_patterns(hooked, tokens, [(3, 0)])


def test_with_attention_keeps_the_top_heads_and_changes_nothing_else(model, results):
    dla = results["dla"]
    plain = tll.dla(model, dla.tokens, (5, 6))
    assert plain.attention is None
    assert list(dla.attention) == list(plain.heads().top(2).labels)
    assert torch.equal(dla.values, plain.values) and dla.labels == plain.labels
    for label, pattern in dla.attention.items():
        assert pattern.shape == (1, dla.tokens.shape[1], dla.tokens.shape[1])


@pytest.mark.parametrize("name,options", FIGURES)
def test_no_figure_shows_raw_mathtext(results, tmp_path, name, options):
    # Math parsing is off for token text, so axis formatters must not emit mathtext either.
    from test_text_safety import svg_text

    drawn = svg_text(results[name].save_png(tmp_path / "figure.svg", **options))
    assert "\\mathdefault" not in drawn and "\\times" not in drawn
