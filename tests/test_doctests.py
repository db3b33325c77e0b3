"""The ``>>>`` examples of every public entry point, run as doctests on a tiny model."""

from __future__ import annotations

import doctest

import pytest
import torch

import tl_lenses
from tl_lenses import analysis
from tl_lenses.lenses.attribute.relations import Relation, Sample
from tl_lenses.tiny import tiny_default


def _functions(module) -> list[str]:
    return [name for name in module.__all__ if callable(getattr(module, name))
            and not isinstance(getattr(module, name), type)]


ENTRY_POINTS = _functions(tl_lenses)
ANALYSIS_ENTRY_POINTS = _functions(analysis)


@pytest.fixture(scope="module")
def globs():
    return {"model": tiny_default("llama-gqa"), "torch": torch, "tll": tl_lenses,
            "Relation": Relation, "Sample": Sample,
            **{name: getattr(tl_lenses, name) for name in tl_lenses.__all__},
            **{name: getattr(analysis, name) for name in analysis.__all__}}


@pytest.mark.parametrize("module, name", [pytest.param(tl_lenses, n, id=n) for n in ENTRY_POINTS]
                         + [pytest.param(analysis, n, id=f"analysis.{n}")
                            for n in ANALYSIS_ENTRY_POINTS])
def test_entry_point_docstring(module, name, globs):
    function = getattr(module, name)
    doc = function.__doc__ or ""
    for section in ("Args:", "Returns:", "Raises:", ">>>"):
        assert section in doc, f"{name}'s docstring lacks {section}"
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(function, name, globs=dict(globs)):
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} doctest example(s) of {name} failed"
