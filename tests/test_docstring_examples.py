"""Every Examples section of the package's docstrings runs and prints what it shows: one test
per module, so that an example cannot rot unnoticed."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import matplotlib
import pytest

import diffprior

matplotlib.use("Agg")


def _examples(name: str) -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [test for test in finder.find(importlib.import_module(name)) if test.examples]


NAMES = ["diffprior"] + [
    info.name
    for info in pkgutil.walk_packages(diffprior.__path__, prefix="diffprior.")
    if info.name != "diffprior.__main__"  # running it is the command line
]
MODULES = sorted(name for name in NAMES if _examples(name))


def test_the_package_has_examples():
    assert len(MODULES) >= 20, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    tests = _examples(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failures = []
    attempted = sum(runner.run(test, out=failures.append).attempted for test in tests)
    assert not failures, "".join(failures)
    assert attempted > 0  # not all skipped
