"""The ``>>>`` examples of every public entry point, run as doctests on a tiny model."""

from __future__ import annotations

import doctest

import pytest
import torch

import tl_lenses
from tl_lenses.lenses.attribute.relations import Relation, Sample
from tl_lenses.tiny import tiny_default

ENTRY_POINTS = [name for name in tl_lenses.__all__ if callable(getattr(tl_lenses, name))
                and not isinstance(getattr(tl_lenses, name), type)]


@pytest.fixture(scope="module")
def globs():
    return {"model": tiny_default("llama-gqa"), "torch": torch, "tll": tl_lenses,
            "Relation": Relation, "Sample": Sample,
            **{name: getattr(tl_lenses, name) for name in tl_lenses.__all__}}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_point_docstring(name, globs):
    function = getattr(tl_lenses, name)
    doc = function.__doc__ or ""
    for section in ("Args:", "Returns:", "Raises:", ">>>"):
        assert section in doc, f"{name}'s docstring lacks {section}"
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(function, name, globs=dict(globs)):
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} doctest example(s) of {name} failed"
