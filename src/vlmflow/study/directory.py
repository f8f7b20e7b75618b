"""The study directory: one folder holding every run of a study, its manifest and its report.

Layout::

    STUDY_DIR/
      study.json                    manifest: the config, and per run its path, status and summary
      data/<task>/                  generated synthetic scene sets (CSV + images)
      runs/<model>/<task>/<experiment>/   one run directory (:mod:`vlmflow.results.store`) each:
                                          experiment = flows, controls or lens
      viewer/<model>/<task>/        sample viewer: thumbnails, related-patch overlays, records.json
      figures/<model>/<task>/       static figures (PNG, PDF, SVG); figures/ for study-wide ones
      analysis.json                 per-flow summaries, controls and the claims checklist
      report.html                   the self-contained report

The manifest is rewritten atomically after every run, so an interrupted study shows what finished.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vlmflow.errors import ConfigError
from vlmflow.results.atomic import atomic_write_bytes

STUDY_FILE = "study.json"
EXPERIMENTS = ("flows", "controls", "lens")


@dataclass(frozen=True)
class StudyDir:
    """Paths inside a study directory, and its manifest.

    >>> StudyDir(Path("s")).run_path("organism", "ChooseAttr", "flows").as_posix()
    's/runs/organism/ChooseAttr/flows'
    """

    path: Path

    @classmethod
    def open(cls, path: Path | str) -> StudyDir:
        """An existing study directory (it has a manifest); :class:`ConfigError` otherwise."""
        path = Path(path)
        if not (path / STUDY_FILE).is_file():
            raise ConfigError(f"{str(path)!r} is not a study directory: {STUDY_FILE} is missing (run `vlmflow reproduce` first)")
        return cls(path)

    def run_path(self, model: str, task: str, experiment: str) -> Path:
        return self.path / "runs" / model / task / experiment

    def data_dir(self, task: str) -> Path:
        return self.path / "data" / task

    def viewer_dir(self, model: str, task: str) -> Path:
        return self.path / "viewer" / model / task

    def figures_dir(self, model: str | None = None, task: str | None = None) -> Path:
        folder = self.path / "figures"
        return folder / model / task if model and task else folder

    # --- manifest ---------------------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        path = self.path / STUDY_FILE
        if not path.is_file():
            return {}
        return json.loads(path.read_text(encoding="utf-8"))

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = {**manifest, "updated": datetime.now(UTC).isoformat(timespec="seconds")}
        atomic_write_bytes(self.path / STUDY_FILE, json.dumps(manifest, indent=2, default=str).encode())

    def record(self, key: str, entry: dict[str, Any]) -> None:
        """Set ``runs[key]`` in the manifest (read, update, write atomically)."""
        manifest = self.manifest()
        manifest.setdefault("runs", {})[key] = entry
        self.write_manifest(manifest)

    def runs(self) -> list[dict[str, Any]]:
        """The manifest's run entries (model, task, experiment, path, status, ...), in run order."""
        return list(self.manifest().get("runs", {}).values())


def run_key(model: str, task: str, experiment: str) -> str:
    """Manifest key of a run.

    >>> run_key("organism", "ChooseAttr", "lens")
    'organism/ChooseAttr/lens'
    """
    return f"{model}/{task}/{experiment}"
