"""Any token text renders literally: in HTML, in circuitsvis's embedded JSON, and in figures.

Results are computed on a tiny model, then their tokenizer is swapped for one whose tokens
are every byte (0..255) plus the strings that broke views before: TeX (``$$x^2$$``),
HTML (``</script>``, ``<!--``, ``&``, quotes), newlines, tabs, RTL marks, emoji.
"""

from __future__ import annotations

import dataclasses
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest
import torch

import tl_lenses as tll
from tl_lenses.tiny import tiny_default
from tl_lenses.viz.html import esc, show_token

SPECIAL = ["$$x^2$$", " $$", "$$", "\\", "_", "^", "{", "}", "<", "&", "&amp;", '"', "'",
           "</script>", "</SCRIPT >", "<!--", "-->", "</", "\n", "\t", "\r\n", " \u200f",
           "\u202eabc", "😀", "\ufffd", "\u2028", "<|endoftext|>", "a\x00b", "{{x}}", "%s"]
NASTY = SPECIAL + [chr(b) for b in range(256)]


class NastyTokenizer:
    """Token id i decodes to ``NASTY[i % len(NASTY)]``."""

    def decode(self, ids):
        return "".join(NASTY[int(i) % len(NASTY)] for i in ids)


def nasty_tokens(n: int) -> torch.Tensor:
    return torch.arange(n)[None] % 257


class _Text(HTMLParser):
    """Text and attribute values as a browser's parser sees them; counts script elements."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.text, self.scripts, self._in_script = [], [], False

    def handle_starttag(self, tag, attrs):
        self.text += [v for _, v in attrs if v]
        if tag == "script":
            self._in_script = True
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data
        else:
            self.text.append(data)


def parsed(html: str) -> _Text:
    parser = _Text()
    parser.feed(html)
    parser.close()
    return parser


def assert_literal(html: str, tokens, *, n_scripts: int | None = None,
                   in_text: bool = True) -> list[dict]:
    """Each token's visible form is in the parsed text, and scripts were not split.

    Returns the props of every circuitsvis component on the page.
    """
    seen = parsed(html)
    text = "\n".join(seen.text)
    missing = [t for t in tokens if in_text and show_token(t) not in text]
    assert not missing, f"not shown literally: {missing[:5]}"
    assert "\x00" not in text
    if n_scripts is not None:
        assert len(seen.scripts) == n_scripts
    return [props for script in seen.scripts
            for props in assert_circuitsvis_props(script, tokens)]


def assert_circuitsvis_props(script: str, tokens) -> list[dict]:
    """Props JSON inside the script parse, and hold the escaped visible token strings."""
    # circuitsvis inserts tokens as HTML: escaped, they show as the visible token text.
    allowed = {esc(show_token(t)) for t in tokens}
    starts = [m.end() for m in re.finditer(r'CircuitsVis\.render\("[^"]+", CircuitsVis\.\w+, ',
                                           script)]
    assert starts, "a circuitsvis script without render calls"
    tail = script[starts[0]:]
    assert "</" not in tail and "<!--" not in tail
    found = [json.JSONDecoder().raw_decode(script, start)[0] for start in starts]
    for props in found:
        assert props["tokens"] and set(props["tokens"]) <= allowed
    return found


def svg_text(path) -> str:
    """All text drawn in an SVG written with text kept as text."""
    root = ET.parse(path).getroot()
    return "\n".join("".join(node.itertext()) for node in root.iter()
                     if node.tag.endswith("text"))


@pytest.fixture(scope="module")
def model():
    return tiny_default("gpt2", n_ctx=300)


@pytest.fixture(scope="module")
def lens_result(model):
    tokens = nasty_tokens(len(NASTY))
    result = tll.logit_lens(model, tokens, k=3, target="next")
    return dataclasses.replace(
        result, tokenizer=NastyTokenizer(),
        str_tokens=[[NASTY[i] for i in range(tokens.shape[1])]])


def test_lens_html_shows_every_byte_and_special_token(lens_result):
    assert_literal(lens_result.to_html("prob"), NASTY, n_scripts=0)
    assert_literal(lens_result._repr_html_(), NASTY[-40:], n_scripts=0)


def test_lens_report_and_token_view_are_script_safe(lens_result, tmp_path):
    from tl_lenses.readout.view import write_report

    page = write_report(tmp_path / "r.html", [lens_result], title="$$x^2$$ </script>")
    assert_literal(page.read_text(encoding="utf-8"), NASTY, n_scripts=1)


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_lens_figures_draw_tex_and_markup_literally(lens_result, tmp_path, suffix):
    path = lens_result.save_png(tmp_path / f"grid{suffix}", statistic="rank", text="top1")
    assert path.stat().st_size > 1000
    if suffix == ".svg":
        drawn = svg_text(path)
        labels = [show_token(t) for t in NASTY]
        assert [t for t in labels if t not in drawn] == []


def test_dla_views_with_an_answer_made_of_dollars(model, tmp_path):
    tokens = nasty_tokens(40)
    result = tll.dla(model, tokens, (5, 6))
    result = dataclasses.replace(result, directions=["' $$' - '$$x^2$$'"],
                                 str_tokens=[NASTY[:40]])
    for view in ("heads", "top"):
        for suffix in (".png", ".svg"):
            path = result.save_png(tmp_path / f"{view}{suffix}", view)
            assert path.stat().st_size > 1000
    assert "$$x^2$$" in svg_text(tmp_path / "top.svg")
    with_attention = result.with_attention(model, k=3)
    html = with_attention._repr_html_()
    (props,) = assert_literal(html, NASTY[:40], n_scripts=1, in_text=False)
    assert props["tokens"] == [esc(show_token(t)) for t in NASTY[:40]]
    assert props["headLabels"] == list(with_attention.attention)
    assert "' $$' - '$$x^2$$'" in "\n".join(parsed(html).text)


def test_patchscope_views_show_generations_literally(model):
    from tl_lenses.patchscopes import GenerationTable

    table = GenerationTable([0, 1], NASTY[:2], "$$x^2$$", "</script>", "a\tb")
    html = table._repr_html_()
    assert_literal(html, NASTY[:2], n_scripts=0)
    sweep = tll.patchscopes.patchscope_sweep(model, nasty_tokens(6), nasty_tokens(5),
                                            source_layers=[0, 1], target_layers=[1, 2],
                                            max_new_tokens=2)
    sweep = dataclasses.replace(sweep, tokenizer=NastyTokenizer())
    assert_literal(sweep._repr_html_(), sweep.top_tokens(), n_scripts=0)
