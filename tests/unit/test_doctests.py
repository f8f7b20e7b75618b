"""The examples in the docstrings run and give what they show (those not marked ``+SKIP``), in the
package and in the test scaffolding."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import support
import vlmflow

# ``vlmflow.__main__`` runs the CLI when imported; it has no examples.
_SKIP = {"vlmflow.__main__"}
MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages(vlmflow.__path__, "vlmflow.") if name not in _SKIP
)
#: The test scaffolding's examples run too (``tests/support``).
SUPPORT = sorted(name for _, name, _ in pkgutil.walk_packages(support.__path__, "support."))


@pytest.mark.parametrize("name", ["vlmflow", *MODULES, *SUPPORT])
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
