"""The examples in the docstrings run and give what they show (those not marked ``+SKIP``)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import vlmflow

# ``vlmflow.__main__`` runs the CLI when imported; it has no examples.
_SKIP = {"vlmflow.__main__"}
MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages(vlmflow.__path__, "vlmflow.") if name not in _SKIP
)


@pytest.mark.parametrize("name", ["vlmflow", *MODULES])
def test_docstring_examples(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # an optional dependency (e.g. ray) is not installed
        pytest.skip(f"{name} needs {exc.name}")
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name, globs=vars(module).copy()):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed (see output)"
