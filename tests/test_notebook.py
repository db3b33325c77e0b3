"""demos/tour.ipynb runs top to bottom in a real Jupyter kernel, and its export renders.

The notebook walks every method on the embedded SmolLM2 (slow). The executed notebook is
exported with nbconvert and opened in headless Chromium (skipped where it is absent): the
inline views must have rendered (grids with hover text, filled circuitsvis mounts) with no
error other than nbconvert's own CDN scripts (MathJax, require.js), which an offline
browser cannot load and no cell uses.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from dom_check import chromium, page_errors, rendered_dom

ROOT = Path(__file__).resolve().parents[1]
TOUR = ROOT / "demos" / "tour.ipynb"
NBCONVERT_CDN = "cdnjs.cloudflare.com"

nbformat = pytest.importorskip("nbformat", reason="the dev extra (nbformat, nbclient, ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="the dev extra (nbclient, ipykernel)")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The tour, executed in a python3 kernel whose ``tl_lenses`` is this checkout's."""
    notebook = nbformat.read(TOUR, as_version=4)
    env = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(ROOT) + (os.pathsep + env if env else "")
    try:
        client = nbclient.NotebookClient(notebook, timeout=1800, kernel_name="python3",
                                         resources={"metadata": {"path": str(ROOT)}})
        client.execute()  # raises CellExecutionError naming the failing cell
    finally:
        if env is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = env
    out = tmp_path_factory.mktemp("tour") / "tour.ipynb"
    nbformat.write(notebook, out)
    return notebook, out


@pytest.mark.slow
def test_tour_runs_in_a_kernel_and_every_result_displays(executed):
    notebook, _ = executed
    import tl_lenses

    assert Path(tl_lenses.__file__).resolve().is_relative_to(ROOT)
    html_outputs = [o for cell in notebook.cells if cell.cell_type == "code"
                    for o in cell.get("outputs", []) if "text/html" in o.get("data", {})]
    shown = "\n".join(o["data"]["text/html"] for o in html_outputs)
    for marker in ("class='grid'", "cv-mount", "KL(final || lens)", "faithfulness",
                   "Patchscope", "head DLA"):
        assert marker in shown, marker
    assert "unpkg.com" not in shown and "<script src=" not in shown
    errors = [o for cell in notebook.cells for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert errors == []


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None,
                    reason="headless Chromium not found: apt-get install chromium")
def test_tour_export_renders_in_a_browser(executed, tmp_path):
    bs4 = pytest.importorskip("bs4")
    from nbconvert import HTMLExporter

    notebook, _ = executed
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(notebook)
    path = tmp_path / "tour.html"
    path.write_text(body, encoding="utf-8")
    soup = bs4.BeautifulSoup(rendered_dom(path, budget_ms=15000), "html.parser")
    errors = [e for e in page_errors(soup) if NBCONVERT_CDN not in e]
    assert errors == []
    grids = soup.select("table.grid")
    assert len(grids) >= 4 and all(td.get("title") for g in grids for td in g.select("td"))
    mounts = soup.select("div.cv-mount")
    assert len(mounts) >= 2 and all(m.find() for m in mounts)
