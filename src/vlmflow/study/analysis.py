"""Analyse a whole study directory: per model x task evidence, flow summaries, controls, claims, and
the cross-model comparison on the questions every model answers correctly.

Each model keeps its own correctly answered samples (the paper's filter), so per-model curves are
over different questions. The cross-model comparison restricts every model to the *common set* of
each task (kept by every model that ran the task's flows) and recomputes the summaries there; the
study-level consistency claim uses those.

>>> analysis = analyse_study("studies/organism")          # doctest: +SKIP
>>> analysis.cells[("organism", "ChooseAttr")].claims[0].status   # doctest: +SKIP
<Status.HOLDS: 'holds'>
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from vlmflow.analysis.claims import ClaimResult, ClaimThresholds, evaluate_cell, evaluate_study
from vlmflow.analysis.evidence import CellEvidence, cell_evidence
from vlmflow.analysis.stats import Bootstrap, CurveSummary, common_samples, summarise_curve
from vlmflow.errors import ConfigError
from vlmflow.positions.routes import Flow
from vlmflow.results.store import RunStore
from vlmflow.study.config import ReportEntry, analysis_settings
from vlmflow.study.directory import StudyDir

log = logging.getLogger(__name__)


@dataclass
class RunInfo:
    """One run of the study as the report shows it (manifest entry, stored spec, tables)."""

    key: str
    entry: dict[str, Any]
    spec: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    errors: pd.DataFrame | None = None


@dataclass
class CellAnalysis:
    """One model on one task."""

    model: str
    task: str
    evidence: CellEvidence
    summaries: dict[Flow, CurveSummary | None]
    claims: list[ClaimResult]
    runs: dict[str, RunInfo]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)


@dataclass
class CommonSet:
    """The cross-model comparison of one task on the questions every model keeps."""

    task: str
    models: list[str]
    sample_ids: set[str]
    evidence: dict[str, CellEvidence]
    summaries: dict[str, dict[Flow, CurveSummary | None]]  # model -> flow -> summary


@dataclass
class StudyAnalysis:
    """Everything the report shows, computed once."""

    study: StudyDir
    manifest: dict[str, Any]
    boot: Bootstrap
    thresholds: ClaimThresholds
    report: ReportEntry
    models: list[str]
    tasks: list[str]
    cells: dict[tuple[str, str], CellAnalysis]
    common: dict[str, CommonSet]
    study_claims: list[ClaimResult]
    failed: dict[str, str]

    def as_dict(self) -> dict[str, Any]:
        """JSON-able summary (written as ``analysis.json``)."""

        def summaries(items: Mapping[Flow | str, CurveSummary | None]) -> dict[str, Any]:
            return {str(flow): (s.as_dict() if s else None) for flow, s in items.items()}

        return {
            "name": self.manifest.get("name"),
            "bootstrap": self.boot.__dict__,
            "thresholds": {k: v for k, v in self.thresholds.__dict__.items()},
            "cells": {
                f"{m}/{t}": {
                    "flow_summaries": summaries(c.summaries),
                    "claims": [r.as_dict() for r in c.claims],
                    "controls": {
                        str(target): {
                            "draws": cmp.draws,
                            "n_tokens": cmp.n_related_tokens,
                            "difference": summaries({"difference": summarise_curve(cmp.difference, self.boot.confidence)})["difference"],
                        }
                        for target, cmp in c.evidence.control.items()
                    },
                }
                for (m, t), c in self.cells.items()
            },
            "common": {
                task: {"models": cs.models, "n": len(cs.sample_ids), "summaries": {m: summaries(s) for m, s in cs.summaries.items()}}
                for task, cs in self.common.items()
            },
            "study_claims": [r.as_dict() for r in self.study_claims],
            "failed": self.failed,
        }


def _read(path: Path, table: str) -> pd.DataFrame | None:
    store = RunStore.load(path)
    return store.read(table) if table in store.tables() else None


def _load_run(study: StudyDir, key: str, entry: dict[str, Any]) -> tuple[RunInfo, dict[str, pd.DataFrame]]:
    import json

    path = study.path / entry["path"]
    info = RunInfo(key=key, entry=entry)
    tables: dict[str, pd.DataFrame] = {}
    if not (path / "spec.json").is_file():
        return info, tables
    info.spec = json.loads((path / "spec.json").read_text(encoding="utf-8"))
    if (path / "summary.json").is_file():
        info.summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    for table in ("samples", "errors", "flows", "controls", "lens"):
        frame = _read(path, table)
        if frame is not None:
            tables[table] = frame
    info.errors = tables.get("errors")
    return info, tables


def analyse_study(path: Path | str, *, boot: Bootstrap | None = None, thresholds: ClaimThresholds | None = None) -> StudyAnalysis:
    """Analyse the study directory ``path`` (see the module docstring).

    ``boot`` and ``thresholds`` default to the study config's ``statistics`` and ``claims``.
    """
    study = StudyDir.open(path)
    manifest = study.manifest()
    stats, config_thresholds, report = analysis_settings(manifest.get("config", {}))
    boot = boot or Bootstrap(n_boot=stats.n_boot, seed=stats.seed, confidence=stats.confidence)
    th = thresholds or config_thresholds
    runs = manifest.get("runs", {})
    models = list(dict.fromkeys(e["model"] for e in runs.values()))
    tasks = list(dict.fromkeys(e["task"] for e in runs.values()))
    failed = {k: e.get("reason", "") for k, e in runs.items() if e.get("status") == "failed"}
    cells: dict[tuple[str, str], CellAnalysis] = {}
    for model in models:
        for task in tasks:
            infos: dict[str, RunInfo] = {}
            tables: dict[str, dict[str, pd.DataFrame]] = {}
            for key, entry in runs.items():
                if entry["model"] == model and entry["task"] == task:
                    infos[entry["experiment"]], tables[entry["experiment"]] = _load_run(study, key, entry)
            if not any(tables.values()):
                continue
            merged = _merge_tables(tables)
            ev = cell_evidence(model, task, boot=boot, **merged)
            summaries = {flow: summarise_curve(curve, boot.confidence) for flow, curve in ev.flows.items()}
            cells[(model, task)] = CellAnalysis(model, task, ev, summaries, evaluate_cell(ev, th), infos, merged)  # type: ignore[arg-type]
    common = _common_sets(cells, tasks, boot)
    # Cross-model claims use the common-set evidence where there is one (a fair comparison).
    comparable = [ev for cs in common.values() for ev in cs.evidence.values()] or [c.evidence for c in cells.values()]
    results = {key: cell.claims for key, cell in cells.items()}
    variants = _variants(runs)
    study_claims = evaluate_study(comparable, results, th, variants)
    return StudyAnalysis(study, manifest, boot, th, report, models, tasks, cells, common, study_claims, failed)


def _merge_tables(tables: dict[str, dict[str, pd.DataFrame]]) -> dict[str, pd.DataFrame | None]:
    """The tables the evidence needs; ``samples`` from the flows run, else lens, else controls."""
    samples = None
    for experiment in ("flows", "lens", "controls"):
        frame = tables.get(experiment, {}).get("samples")
        if frame is not None and not frame.empty:
            samples = frame
            break
    return {
        "samples": samples,
        "flows": tables.get("flows", {}).get("flows"),
        "lens": tables.get("lens", {}).get("lens"),
        "controls": tables.get("controls", {}).get("controls"),
    }


def _common_sets(cells: dict[tuple[str, str], CellAnalysis], tasks: list[str], boot: Bootstrap) -> dict[str, CommonSet]:
    out = {}
    for task in tasks:
        with_flows = {m: c for (m, t), c in cells.items() if t == task and c.evidence.flows}
        if len(with_flows) < 2:
            continue
        ids = common_samples({m: c.evidence.kept_ids for m, c in with_flows.items()})
        evidence = {m: cell_evidence(m, task, boot=boot, only=ids, **c.tables) for m, c in with_flows.items()}  # type: ignore[arg-type]
        summaries = {m: {f: summarise_curve(cv, boot.confidence) for f, cv in ev.flows.items()} for m, ev in evidence.items()}
        out[task] = CommonSet(task, list(with_flows), ids, evidence, summaries)
    return out


def _variants(runs: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """Pairs of model labels with the same checkpoint and different ``image_mode``."""
    seen: dict[str, dict[str, str | None]] = {}
    for entry in runs.values():
        seen.setdefault(entry.get("model_name", ""), {})[entry["model"]] = entry.get("image_mode")
    pairs = []
    for labels in seen.values():
        items = sorted(labels.items())
        pairs += [(a, b) for i, (a, ma) in enumerate(items) for b, mb in items[i + 1 :] if ma != mb]
    return pairs


def require_cells(analysis: StudyAnalysis) -> None:
    """:class:`ConfigError` when the study has no finished run to report on."""
    if not analysis.cells:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(analysis.failed.items())[:3])
        raise ConfigError(f"study {str(analysis.study.path)!r} has no finished run" + (f" ({reasons})" if reasons else ""))
