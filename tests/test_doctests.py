"""The examples in the docstrings, run as doctests.

Every module of the installed package is searched, the optional ones
(``fastxent.torch``, ``fastxent.jax``, ...) included: a module whose
dependencies are not installed is skipped. The examples see ``np`` and
``fastxent`` as a user's session would have them imported.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import numpy as np
import pytest

import fastxent

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _module_names():
    names = [fastxent.__name__]
    for info in pkgutil.walk_packages(fastxent.__path__, prefix="fastxent."):
        # walk_packages imports packages to find their children; an optional
        # package whose dependency is missing is listed by name and skipped
        # in its test.
        names.append(info.name)
    return sorted(set(names))


def _import(name):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.skip(f"{name} needs a dependency that is not installed: {exc}")


def _examples(module):
    finder = doctest.DocTestFinder(exclude_empty=True)
    # Only the module's own objects: names it re-exports are tested where
    # they are defined.
    return [t for t in finder.find(module, module.__name__,
                                   extraglobs={"np": np, "fastxent": fastxent})
            if t.examples]


@pytest.mark.parametrize("name", _module_names())
def test_docstring_examples(name):
    module = _import(name)
    tests = _examples(module)
    if not tests:
        pytest.skip(f"{name} has no docstring examples")
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed (output above)"


def test_the_public_api_has_examples():
    assert _examples(fastxent), "no docstring example in the fastxent module"
