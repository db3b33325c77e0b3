"""The views in a real browser: headless Chromium, offline, DOM read after scripts ran.

Skipped with a message where Chromium is absent (``apt-get install chromium``; .ci/run
installs it). Checks that the grids carry their hover top-k, that every circuitsvis mount
point was filled by its component (not left empty), that tokens show literally, and that
the page logged no error and loaded nothing from the network.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dom_check import chromium, page_errors, rendered_dom
from test_text_safety import NASTY, NastyTokenizer

import tl_lenses as tll
from tl_lenses.tiny import tiny_default
from tl_lenses.viz.html import page, show_token
from tl_lenses.viz.notebook import notebook_html

bs4 = pytest.importorskip("bs4", reason="bs4 (installed with nbconvert, the dev extra)")
pytestmark = pytest.mark.skipif(chromium() is None,
                                reason="headless Chromium not found: apt-get install chromium")

PROMPT = NASTY[:24]


def _visible(node) -> str:
    return node.get_text().replace("\xa0", " ")


def check_grids(soup, n_grids: int) -> None:
    grids = soup.select("table.grid")
    assert len(grids) >= n_grids
    for grid in grids:
        cells = grid.select("td")
        assert cells and all(td.get("title") for td in cells)


def check_circuitsvis(soup, n_mounts: int) -> list:
    mounts = soup.select("div.cv-mount")
    assert len(mounts) >= n_mounts
    empty = [m["id"] for m in mounts if not m.find()]
    assert not empty, f"circuitsvis mount points left empty: {empty}"
    return mounts


@pytest.fixture(scope="module")
def model():
    return tiny_default("gpt2")


@pytest.fixture(scope="module")
def results(model):
    tokens = torch.arange(len(PROMPT))[None] + 40
    lens = tll.logit_lens(model, tokens, k=3, target="next")
    lens = dataclasses.replace(lens, tokenizer=NastyTokenizer(), str_tokens=[PROMPT])
    dla = tll.dla(model, tokens, (5, 6))
    dla = dataclasses.replace(dla, str_tokens=[PROMPT]).with_attention(model, k=3)
    return lens, dla


def test_gallery_of_inline_views_renders(results, tmp_path):
    lens, dla = results
    path = tmp_path / "gallery.html"
    path.write_text(page("gallery", notebook_html(lens._view_html(full=True)),
                         dla._repr_html_()), encoding="utf-8")
    soup = bs4.BeautifulSoup(rendered_dom(path), "html.parser")
    assert page_errors(soup) == []
    check_grids(soup, 3)
    tips = [td["title"] for td in soup.select("table.grid td")]
    assert any("1. " in tip and "2. " in tip and "3. " in tip for tip in tips)  # hover top-k
    mounts = check_circuitsvis(soup, 2)  # settle-layer tokens, DLA attention patterns
    shown = [_visible(span) for span in mounts[0].select(".colored-tokens span > span")]
    assert shown == [show_token(t) for t in PROMPT]
    assert "Attention Patterns" in _visible(mounts[1])
    assert "L" in _visible(mounts[1]) and "H" in _visible(mounts[1])  # head labels


def test_reports_render(results, tmp_path):
    from tl_lenses.readout.view import write_report

    lens, dla = results
    report = write_report(tmp_path / "lens.html", [lens, lens], title="lens report")
    dla_page = tmp_path / "dla.html"
    dla.to_html(dla_page)
    for path, grids, mounts in ((report, 6, 1), (dla_page, 1, 1)):
        soup = bs4.BeautifulSoup(rendered_dom(path), "html.parser")
        assert page_errors(soup) == [], path.name
        check_grids(soup, grids)
        check_circuitsvis(soup, mounts)
