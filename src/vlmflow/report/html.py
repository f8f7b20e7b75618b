"""``report.html``: one self-contained HTML file for a study directory (works offline).

Everything is inline: the CSS, a few lines of JavaScript (the sample viewer), the figures (SVG, or
PNG as ``data:`` URIs) and the sample images (``data:`` URIs). Nothing is fetched, so the file can
be mailed, archived or opened from a USB stick. The static figures are also written as PNG, PDF and
SVG under ``figures/``.

Sections (their element ids): ``overview``, ``checklist``, ``flows``, ``lens``, ``statistics``,
``controls``, ``cross-model``, ``samples``, ``metadata``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from vlmflow.analysis.claims import STUDY_CLAIMS
from vlmflow.report.figures import FORMATS
from vlmflow.report.markup import _e
from vlmflow.report.sections import SectionBuilder
from vlmflow.report.style import CSS, JS
from vlmflow.study.analysis import StudyAnalysis, analyse_study, require_cells

SECTIONS: tuple[tuple[str, str], ...] = (
    ("overview", "Overview"),
    ("checklist", "Claims checklist"),
    ("flows", "Information flows"),
    ("lens", "Answer emergence"),
    ("statistics", "Per-flow summary"),
    ("controls", "Random-patch control"),
    ("cross-model", "Cross-model comparison"),
    ("samples", "Sample viewer"),
    ("metadata", "Run metadata"),
)
REPORT_FILE = "report.html"


def write_report(
    path: Path | str,
    *,
    out: Path | str | None = None,
    formats: Sequence[str] = FORMATS,
    analysis: StudyAnalysis | None = None,
) -> Path:
    """Analyse the study directory ``path`` and write its report; return the HTML file's path.

    Also writes ``analysis.json`` and the static figures (``formats``) under ``figures/``.

    >>> write_report("studies/organism")   # doctest: +SKIP
    PosixPath('studies/organism/report.html')
    """
    analysis = analysis or analyse_study(path)
    require_cells(analysis)
    study = analysis.study
    target = Path(out) if out is not None else study.path / REPORT_FILE
    (study.path / "analysis.json").write_text(json.dumps(analysis.as_dict(), indent=2, default=str), encoding="utf-8")
    builder = SectionBuilder(analysis, formats)
    target.write_text(_page(builder), encoding="utf-8")
    return target


def _page(builder: SectionBuilder) -> str:
    name = builder.a.manifest.get("name") or builder.a.study.path.name
    sections = {
        "overview": builder.overview,
        "checklist": builder.checklist,
        "flows": builder.flows,
        "lens": builder.lens,
        "statistics": builder.statistics,
        "controls": builder.controls,
        "cross-model": builder.cross_model,
        "samples": builder.samples,
        "metadata": builder.metadata,
    }
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title in SECTIONS)
    body = "".join(
        f'<section id="{sid}" data-section="{sid}"><h2>{_e(title)}</h2>{sections[sid]()}</section>' for sid, title in SECTIONS
    )
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>vlmflow study: {_e(name)}</title>"
        f"<style>{CSS}</style></head><body>"
        f"<header><h1>vlmflow study: {_e(name)}</h1><div class=\"muted\">{len(builder.a.models)} model(s) × "
        f"{len(builder.a.tasks)} task(s) · report generated {generated}</div></header>"
        f"<nav>{nav}</nav><main>{body}</main><script>{JS}</script></body></html>\n"
    )


__all__ = ["REPORT_FILE", "SECTIONS", "STUDY_CLAIMS", "write_report"]
