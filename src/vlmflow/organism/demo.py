"""The whole study on a shipped organism, on CPU, in about a minute (``vlmflow demo``).

:func:`run_demo` writes a small scene set (six task CSVs in the released GQA layout, images beside),
then for every task type runs the paper's six attention-knockout flows and the logit-lens readout
with the ordinary runner (one run directory each), and writes ``summary.json`` and ``summary.md``:
per task, the organism's accuracy, the strongest drop of every flow (mean % change of the answer's
probability, and at which layer; "no drop" when it stays within
:data:`~vlmflow.analysis.stats.EFFECT_THRESHOLD`), and the layer where the answer first becomes the
lens' top-1. ``vlmflow demo`` then writes ``report.html`` (:func:`vlmflow.report.demo.write_demo_report`):
what to notice, the table, the figures.

The folder is the demo's own (:mod:`vlmflow.organism.demo_folder`): rerun with other options, the
demo replaces what it wrote there; it never writes into a folder it did not create.

By default it runs the planted-route organism (``organism-planted``), whose routes are known by
construction: its flow figures shade each flow's planted band, and the summary says, per flow and
over all tasks, which band the knockouts recover. Any model whose checkpoint declares planted
routes (``planted_routes.json``) gets the same; others (``--model organism``) get the plain figures.

Layout of the demo directory::

    OUT/
      scenes/             scenes_<Task>.csv and the PNG images
      flows_<Task>/       a flows run directory per task (figures/flows_<Task>.png: the six flows)
      lens_<Task>/        a lens run directory per task (figures/lens_raw.png, lens_normed.png,
                          flows_over_lens.png)
      summary.json, summary.md, report.html

>>> result = run_demo("runs/demo")      # doctest: +SKIP
>>> sorted(result.runs)[:1]             # doctest: +SKIP
['ChooseAttr']
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmflow.analysis.stats import EFFECT_THRESHOLD
from vlmflow.data.sample import TaskType
from vlmflow.data.scene_sets import write_scene_set
from vlmflow.experiments.flows import FlowSettings
from vlmflow.experiments.lens import LensSettings, summarise_lens
from vlmflow.experiments.runner import DataSpec, ModelSpec, RunSpec, run_path, run_to_store, stored_spec
from vlmflow.loading import LoadedModel, load_model
from vlmflow.organism import PLANTED_ALIAS
from vlmflow.plots.flows import write_flow_figures
from vlmflow.plots.lens import write_lens_figures
from vlmflow.positions.routes import PAPER_FLOWS
from vlmflow.validation.routes import PlantedRoutes, band_names, routes_for_model

log = logging.getLogger(__name__)

#: Seed of the demo's scenes (neither the training nor the held-out seed).
DEMO_SEED = 2025
#: Layers per knockout window on the organism (6 decoder layers; the paper blocks ~22% of depth).
DEMO_WINDOW = 1

ProgressCallback = Callable[[int, int, str], None]


@dataclass
class DemoResult:
    """What the demo wrote: its folder, the run directories per task and the summary."""

    path: Path
    scenes: Path
    runs: dict[str, dict[str, Path]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)

    @property
    def summary_files(self) -> tuple[Path, Path]:
        return self.path / "summary.json", self.path / "summary.md"

    @property
    def report(self) -> Path:
        """``report.html``: what to notice, the summary and the figures, in one self-contained page."""
        return self.path / "report.html"


def run_demo(
    out: str | Path,
    *,
    per_task: int = 12,
    seed: int = DEMO_SEED,
    window: int = DEMO_WINDOW,
    model: str = PLANTED_ALIAS,
    tasks: tuple[TaskType, ...] = tuple(TaskType),
    progress: ProgressCallback | None = None,
    loaded: LoadedModel | None = None,
    plot: bool = True,
) -> DemoResult:
    """Generate scenes, run flows and lens per task on ``model``, write the summary.

    Args:
        out: demo folder (created; rerunning resumes it; rerun with other options, the demo
            replaces what it wrote there; a folder the demo did not write is refused).
        per_task: scene questions per task type.
        seed: scene seed.
        window: layers per knockout window.
        model: checkpoint name or folder (default: the shipped planted-route organism).
        tasks: task types to run.
        progress: ``update(done, total, message)``, counted in samples over all runs.
        loaded: an already loaded model (then ``model`` only names it in the run specs).
        plot: write the figures (PNG) into each run's ``figures`` folder.
    """
    from vlmflow.organism.demo_folder import claim_folder
    from vlmflow.results.lock import RunLock

    out = Path(out)
    options = {"per_task": per_task, "seed": seed, "window": window, "model": model, "tasks": [t.value for t in tasks]}
    with RunLock(out):
        claim_folder(out, options)
        return _run_demo(out, per_task, seed, window, model, tasks, progress, loaded, plot)


def _run_demo(
    out: Path,
    per_task: int,
    seed: int,
    window: int,
    model: str,
    tasks: tuple[TaskType, ...],
    progress: ProgressCallback | None,
    loaded: LoadedModel | None,
    plot: bool,
) -> DemoResult:
    from vlmflow.organism.demo_folder import replace_if_other

    scenes = out / "scenes"
    files = write_scene_set(scenes, per_task, seed, tasks)
    spec_model = ModelSpec(model, dtype="float32", device="cpu")
    loaded = loaded or load_model(spec_model)
    result = DemoResult(path=out, scenes=scenes)
    routes = routes_for_model(str(loaded.info.get("model", model)))  # the loaded checkpoint's folder
    decorate = None
    if routes is not None:
        from vlmflow.validation.figure import shade_flow_figure

        bands = {str(flow): band for flow, band in routes.flows.items()}

        def decorate(fig: Any, order: list[str]) -> None:
            shade_flow_figure(fig, order, bands)

    experiments = {
        "flows": FlowSettings(flows=PAPER_FLOWS, window=window),
        "lens": LensSettings(),
    }
    total = per_task * len(files) * len(experiments)
    done = 0
    for task, csv_path in files.items():
        result.runs[task.value] = {}
        for name, experiment in experiments.items():
            spec = RunSpec(model=spec_model, data=DataSpec(str(csv_path)), experiment=experiment, name=f"{name}_{task.value}")

            def update(count: int, _total: int, _message: str, offset: int = done, label: str = f"{name} {task.value}") -> None:
                if progress:
                    progress(offset + count, total, label)

            replace_if_other(out, run_path(spec, out), stored_spec(spec, loaded))
            outcome = run_to_store(spec, out, progress=update, loaded=loaded)
            result.runs[task.value][name] = outcome.path
            done += per_task
        if plot:
            runs = result.runs[task.value]
            result.figures += write_flow_figures(runs["flows"], formats=("png",), decorate=decorate)
            result.figures += write_lens_figures(runs["lens"], flows_run=runs["flows"], formats=("png",))
    result.summary = summarise_demo(result, loaded, routes)
    json_path, md_path = result.summary_files
    json_path.write_text(json.dumps(result.summary, indent=2) + "\n")
    md_path.write_text(summary_markdown(result.summary) + "\n")
    return result


def summarise_demo(result: DemoResult, loaded: LoadedModel, routes: PlantedRoutes | None = None) -> dict[str, Any]:
    """Per task: accuracy, each flow's strongest mean drop and its layer, the lens' first top-1 layer;
    with ``routes``, per flow over all tasks: its planted band and whether the knockouts recover it."""
    from vlmflow.results.store import RunStore

    tasks: dict[str, Any] = {}
    for task, runs in result.runs.items():
        flows_summary = json.loads((runs["flows"] / "summary.json").read_text())
        entry: dict[str, Any] = {
            "samples": flows_summary["samples"],
            "correct": flows_summary["correct"],
            "flows": {flow: _drop(v) for flow, v in flows_summary.get("flows", {}).items()},
        }
        lens_store = RunStore.load(runs["lens"])
        if "lens" in lens_store.tables():
            lens = summarise_lens(lens_store.read("lens"))
            entry["lens_first_top1"] = {
                readout: (lens.get(readout, {}).get("answer_any") or {}).get("median_first_top1") for readout in ("raw", "normed")
            }
        tasks[task] = entry
    window = result.runs and json.loads(next(iter(result.runs.values()))["flows"].joinpath("spec.json").read_text())["settings"]["window"]
    summary = {
        "model": loaded.info.get("model"),
        "n_layers": loaded.n_layers,
        "window": window,
        "prompt_template": loaded.info.get("prompt_template"),
        "scenes": str(result.scenes),
        "tasks": tasks,
    }
    if routes is not None and result.runs:
        summary["planted"] = planted_recovery(result, routes, int(window), loaded.n_layers)
    return summary


def planted_recovery(result: DemoResult, routes: PlantedRoutes, window: int, n_layers: int) -> dict[str, Any]:
    """Per scored flow, over every task's kept samples: the planted band, the strongest change, the
    share of ``|change|`` inside the band (precision) and whether the strongest change lies in it."""
    import pandas as pd

    from vlmflow.plots.flows import kept_flows
    from vlmflow.results.store import RunStore
    from vlmflow.validation.benchmark import flow_curves
    from vlmflow.validation.scores import score_curves

    frames = [kept_flows(RunStore.load(runs["flows"])) for runs in result.runs.values()]
    frame = pd.concat([f for f in frames if not f.empty], ignore_index=True) if any(not f.empty for f in frames) else None
    if frame is None:
        return {}
    bands = {str(flow): band for flow, band in routes.flows.items()}
    table = score_curves(flow_curves(frame, n_layers), bands, window)
    return {
        flow: {
            "band": list(score.band),
            "band_names": band_names(routes, score.band),
            "peak": round(score.peak_value, 1),
            "peak_layer": score.peak_layer,
            "precision": None if score.precision is None else round(score.precision, 3),
            "recovered": bool(score.peak_in_band) if score.band else score.max_abs < EFFECT_THRESHOLD,
        }
        for flow, score in table.flows.items()
    }


def _drop(flow: dict[str, Any]) -> dict[str, Any]:
    """A flow's strongest mean drop; its layer only when it is a drop (at least the threshold)."""
    change = float(flow["min_mean_rel_change"])
    drop = change <= -EFFECT_THRESHOLD
    return {"min_mean_rel_change": round(change, 1), "layer": flow["layer_of_min"] if drop else None, "drop": drop}


def drop_cell(entry: dict[str, Any] | None) -> str:
    """One table cell: ``-67 @ 0`` (a drop of 67% at layer 0) or ``no drop``.

    >>> drop_cell({"min_mean_rel_change": -67.2, "layer": 0, "drop": True}), drop_cell({"min_mean_rel_change": -0.004, "layer": None, "drop": False})
    ('-67 @ 0', 'no drop')
    """
    if entry is None:
        return "-"
    if not entry.get("drop", entry["min_mean_rel_change"] <= -EFFECT_THRESHOLD):
        return "no drop"
    return f"{entry['min_mean_rel_change']:+.0f} @ {entry['layer']}"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table: one row per task, one column per flow (``min % @ layer``)."""
    flows = [str(f) for f in PAPER_FLOWS]
    lines = [
        f"# vlmflow demo: {Path(str(summary['model'])).name} ({summary['n_layers']} layers), window {summary['window']}",
        "",
        "Strongest mean drop of the answer's probability when a flow is blocked (%, at layer; \"no drop\": the "
        f"mean change stays within {EFFECT_THRESHOLD:g}% at every layer), and the first layer where the answer is "
        "the logit lens' top-1 (raw readout, median over samples).",
        "",
        "| task | correct | " + " | ".join(flows) + " | lens top-1 |",
        "|---" * (len(flows) + 3) + "|",
    ]
    for task, entry in summary["tasks"].items():
        cells = [drop_cell(entry["flows"].get(flow)) for flow in flows]
        first = (entry.get("lens_first_top1") or {}).get("raw")
        lens_cell = "never" if first is None else f"{first:g}"
        lines.append(f"| {task} | {entry['correct']}/{entry['samples']} | " + " | ".join(cells) + f" | {lens_cell} |")
    if summary.get("planted"):
        lines += [
            "",
            f"## Planted routes recovered (all tasks, window {summary['window']})",
            "",
            "The organism's routes are known by construction; the figures shade each flow's planted band. "
            "Precision: share of the flow's |change| inside its band.",
            "",
            "| flow | planted band | strongest change (%, at layer) | precision | recovered |",
            "|---|---|---|---|---|",
        ]
        for flow, entry in summary["planted"].items():
            precision = "-" if entry["precision"] is None else f"{entry['precision']:.2f}"
            if entry["band"]:
                verdict = f"yes: peak in the {entry['band_names']} band" if entry["recovered"] else "no: peak outside the band"
            else:
                verdict = f"yes: below {EFFECT_THRESHOLD:g}% everywhere" if entry["recovered"] else f"no: reaches {EFFECT_THRESHOLD:g}% or more"
            strongest = f"{entry['peak']:+.0f} @ {entry['peak_layer']}" if abs(entry["peak"]) >= EFFECT_THRESHOLD else "no drop"
            lines.append(f"| {flow} | {entry['band_names']} | {strongest} | {precision} | {verdict} |")
    return "\n".join(lines)
