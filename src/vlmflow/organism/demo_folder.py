"""The demo's folder is the demo's own: rerun with other options, it replaces what it wrote there.

``vlmflow demo --quick`` then ``vlmflow demo`` must just work, and a student should never meet a
hash. So the demo folder belongs to the demo, and the demo tells its folder from anyone else's:

* a folder that does not exist, or is empty, becomes the demo's (it writes the marker file
  ``.vlmflow-demo.json`` there, with the options it was run with);
* a folder holding that marker is the demo's;
* a folder written by an older vlmflow (before the marker) is recognised by holding nothing but what
  the demo writes: ``scenes/``, ``flows_<Task>/``, ``lens_<Task>/``, ``summary.json``, ``summary.md``,
  ``report.html``;
* anything else (a user's folder) is refused, and nothing in it is touched.

In its own folder, the demo removes what an earlier demo wrote when the options differ (another
``--per-task``, ``--seed``, ``--window`` or ``--model``), and any run directory whose identity
differs from the one it is about to compute (e.g. written by another vlmflow version), and says so
(a notice). With the same options, it resumes. While it runs it holds the folder's lock
(:class:`~vlmflow.results.lock.RunLock`), so two demos never write one folder.

>>> from pathlib import Path
>>> owned_names(["scenes", "flows_ChooseAttr", "summary.md", "notes.txt"])
['scenes', 'flows_ChooseAttr', 'summary.md']
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vlmflow.errors import ConfigError
from vlmflow.notices import notice

__all__ = ["MARKER", "claim_folder", "owned_names", "replace_if_other"]

#: The file that says a folder is a demo's, and with which options it was run.
MARKER = ".vlmflow-demo.json"
#: What the demo writes into its folder (besides the marker and its lock).
_OWN = re.compile(r"^(scenes|summary\.json|summary\.md|report\.html|(flows|lens)_[A-Za-z]+)$")


def owned_names(names: Iterable[str]) -> list[str]:
    """Which of ``names`` (entries of a folder) are the demo's own, in their order."""
    return [name for name in names if _OWN.match(name)]


def claim_folder(out: Path, options: Mapping[str, Any]) -> None:
    """Make ``out`` the demo's folder for a run with ``options``, or refuse a folder that is not the demo's.

    When ``out`` holds an earlier demo run with other options, what that demo wrote is removed.

    Raises:
        ConfigError: ``out`` is a file, or a folder the demo did not write.
    """
    from vlmflow.experiments.runner import check_folder

    check_folder(out, "demo folder")
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    options = dict(options)
    if marker.is_file():
        earlier = _read(marker)
        if earlier != options:
            changed = ", ".join(f"{k} {earlier.get(k)!r} -> {v!r}" for k, v in options.items() if earlier.get(k) != v)
            notice("%s: replacing the earlier demo there (it ran with other options: %s)", out, changed or "unknown")
            _remove(out, owned_names(entries))
    elif entries:
        strangers = [name for name in entries if name not in owned_names(entries)]
        if strangers or "scenes" not in entries:
            shown = ", ".join(repr(n) for n in (strangers or entries)[:3])
            raise ConfigError(
                f"{str(out)!r} is not empty and was not written by vlmflow demo (it holds {shown}); the demo only "
                "writes into a folder of its own: pass --out with a new or empty folder"
            )
    marker.write_text(json.dumps(options, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def replace_if_other(out: Path, run_dir: Path, stored: Mapping[str, Any]) -> None:
    """Remove the demo's run directory ``run_dir`` when it holds another run than ``stored`` would be.

    ``stored`` is what :func:`~vlmflow.experiments.runner.stored_spec` gives for the run about to
    start; a run directory of the same identity is kept (the run resumes it).
    """
    from vlmflow.results.identity import canonical_spec, identity_of, read_spec, spec_differences
    from vlmflow.results.store import SPEC_FILE

    spec_path = run_dir / SPEC_FILE
    if run_dir.parent != out or not owned_names([run_dir.name]) or not spec_path.is_file():
        return
    diffs = spec_differences(identity_of(read_spec(spec_path)), identity_of(canonical_spec(stored)))
    if diffs:
        notice("%s: replacing the demo's earlier run there (%s)", run_dir, "; ".join(diffs[:2]))
        shutil.rmtree(run_dir)


def _read(marker: Path) -> dict[str, Any]:
    try:
        value = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _remove(out: Path, names: Iterable[str]) -> None:
    for name in names:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
