"""The planted-route benchmark (``vlmflow validate``): does vlmflow find routes that are really there?

On a model whose checkpoint declares its planted bands (``planted_routes.json``,
:mod:`vlmflow.validation.routes`), :func:`run_validation` writes held-out scene questions, runs the
paper's six flows for every window size and the logit lens with the attention-weight summary,
through the public API (:func:`vlmflow.api.run_flows`, :func:`vlmflow.api.run_lens`), and scores
them against the bands (:mod:`vlmflow.validation.scores`): knockouts per window size, attention
weights per layer, and whether the answer appears in the lens only after the question->last band.
Curves are pooled over every task type (each sample counts once). It writes::

    OUT/
      scenes/                 the held-out questions (task CSVs and images)
      runs/                   flows_w<K>_<Task>/ and lens_<Task>/ run directories
      validation.json         per window size: overall and per-flow scores (and per task); attention; lens
      validation.png          the curves with the planted bands shaded

>>> result = run_validation("organism-planted", "runs/validate")     # doctest: +SKIP
>>> result.report["windows"]["1"]["overall"]["precision"]           # doctest: +SKIP
0.97
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from vlmflow.data.sample import TaskType
from vlmflow.data.scene_sets import write_scene_set
from vlmflow.errors import ConfigError
from vlmflow.loading import LoadedModel, load_model
from vlmflow.positions.groups import PAPER_FLOWS, Flow, Group
from vlmflow.validation.routes import ROUTES_FILE, PlantedRoutes, routes_for_model
from vlmflow.validation.scores import ScoreTable, lens_score, score_curves

log = logging.getLogger(__name__)

#: Seed of the benchmark's scenes (not the training seeds, the held-out accuracy seed or the demo's).
VALIDATION_SEED = 4242
REPORT_FILE = "validation.json"
FIGURE_STEM = "validation"

ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ValidationSettings:
    """What the benchmark runs.

    Attributes:
        windows: window sizes of the knockouts (layers per window).
        per_task / seed: held-out scene questions per task type, and their seed.
        tasks: task types.
        keep_all: score every sample (the routes exist whatever the answer); ``False``: the paper's
            filter (correctly answered samples only).
        readouts: also score the attention weights and the logit lens.

    >>> ValidationSettings().windows
    (1, 3)
    """

    windows: tuple[int, ...] = (1, 3)
    per_task: int = 12
    seed: int = VALIDATION_SEED
    tasks: tuple[TaskType, ...] = tuple(TaskType)
    keep_all: bool = True
    readouts: bool = True

    def __post_init__(self) -> None:
        if not self.windows or any(k < 1 for k in self.windows) or len(set(self.windows)) != len(self.windows):
            raise ConfigError(f"windows must be distinct positive layer counts, got {list(self.windows)}")
        if self.per_task < 1:
            raise ConfigError(f"per_task must be >= 1, got {self.per_task}")


@dataclass
class ValidationResult:
    """What the benchmark wrote and found."""

    path: Path
    routes: PlantedRoutes
    report: dict[str, Any]
    tables: dict[int, ScoreTable] = field(default_factory=dict)
    attention: ScoreTable | None = None
    curves: dict[int, dict[str, list[float]]] = field(default_factory=dict)
    attention_curves: dict[str, list[float]] = field(default_factory=dict)
    figure: Path | None = None


def routes_of(model: str | Path) -> PlantedRoutes:
    """The planted routes a model's checkpoint folder declares.

    Raises:
        ConfigError: the model is not a local folder, or its folder declares no routes.
    """
    routes = routes_for_model(model)
    if routes is None:
        raise ConfigError(
            f"model {str(model)!r} declares no planted routes (no {ROUTES_FILE} in its checkpoint folder); "
            "vlmflow validate needs a model whose routes are known, e.g. 'organism-planted'"
        )
    return routes


def run_validation(
    model: str | Path,
    out: str | Path,
    settings: ValidationSettings = ValidationSettings(),
    *,
    loaded: LoadedModel | None = None,
    progress: ProgressCallback | None = None,
    plot: bool = True,
    device: str = "cpu",
    dtype: str = "float32",
) -> ValidationResult:
    """Run the benchmark on ``model`` (a checkpoint folder or alias with planted routes) into ``out``.

    ``loaded``: the model already loaded from that folder (``model`` then only locates its routes).
    """
    from vlmflow.api import run_flows, run_lens
    from vlmflow.experiments.attention import AttentionSettings

    routes = routes_of(model)
    loaded = loaded or load_model(model, device=device, dtype=dtype)
    if loaded.n_layers != routes.n_layers:
        raise ConfigError(f"{ROUTES_FILE} is for {routes.n_layers} layers, the model has {loaded.n_layers}")
    out = Path(out)
    files = write_scene_set(out / "scenes", settings.per_task, settings.seed, settings.tasks)
    total = settings.per_task * len(files) * (len(settings.windows) + int(settings.readouts))
    done = 0

    def step(label: str) -> Callable[[int, int, str], None]:
        offset = done

        def update(count: int, _total: int, _message: str) -> None:
            if progress:
                progress(offset + count, total, label)

        return update

    flows: dict[int, list[pd.DataFrame]] = {k: [] for k in settings.windows}
    samples: list[pd.DataFrame] = []
    for window in settings.windows:
        for task, csv in files.items():
            run = run_flows(
                loaded, csv, flows=PAPER_FLOWS, window=window, keep_all=settings.keep_all, out=out / "runs",
                name=f"flows_w{window}_{task.value}", progress=step(f"flows window {window} {task.value}"),
            )  # fmt: skip
            flows[window].append(run.flows)
            if window == settings.windows[0]:
                samples.append(run.samples)
            done += settings.per_task
    attention, lens = [], []
    if settings.readouts:
        summary = AttentionSettings(targets=(Group.QUESTION, Group.LAST), sources=(Group.IMAGE, Group.RELATED, Group.OTHER, Group.QUESTION, Group.LAST))
        for task, csv in files.items():
            run = run_lens(
                loaded, csv, readouts=("raw", "normed"), attention=summary, keep_all=settings.keep_all,
                out=out / "runs", name=f"lens_{task.value}", progress=step(f"lens {task.value}"),
            )  # fmt: skip
            attention.append(run.table("attention"))
            lens.append(run.lens)
            done += settings.per_task
    result = _score(out, routes, settings, flows, attention, lens, pd.concat(samples, ignore_index=True))
    result.report["model"] = str(loaded.info.get("model", model))
    if plot:
        from vlmflow.validation.figure import plot_validation

        fig = plot_validation(result.curves, result.attention_curves, routes, title=f"{Path(result.report['model']).name}: planted-route benchmark")
        path = out / f"{FIGURE_STEM}.png"
        fig.savefig(path, dpi=120)
        result.figure = path
        result.report["figure"] = path.name
    (out / REPORT_FILE).write_text(json.dumps(result.report, indent=2) + "\n")
    return result


def flow_curves(frame: pd.DataFrame, n_layers: int) -> dict[str, list[float]]:
    """Mean ``rel_change`` per flow and window centre (layers ``0..n_layers-1``; a layer without rows reads 0)."""
    means = frame.groupby(["flow", "layer"])["rel_change"].mean()
    return {
        str(flow): [float(means.get((flow, layer), 0.0)) for layer in range(n_layers)]
        for flow in dict.fromkeys(frame["flow"])
    }


def attention_curves(frame: pd.DataFrame, flows: Sequence[Flow], n_layers: int) -> dict[str, list[float]]:
    """Mean attention mass per flow (source -> target) and layer, from the ``attention`` table."""
    means = frame.groupby(["source", "target", "layer"])["mass"].mean()
    out = {}
    for flow in flows:
        key = (flow.source.value, flow.target.value)
        if any(k[:2] == key for k in means.index):
            out[str(flow)] = [float(means.get((*key, layer), 0.0)) for layer in range(n_layers)]
    return out


def answer_probability(lens: pd.DataFrame, readout: str, after: int) -> dict[str, float]:
    """Mean probability of the answer (the likelier of its two forms) at the last position, on the
    layer boundaries just before (``after - 1``) and just after (``after``) the question->last band."""
    frame = lens[(lens["group"] == Group.LAST.value) & (lens["readout"] == readout) & lens["form"].isin(["answer", "answer_capitalized"])]
    best = frame.groupby(["sample_id", "layer"])["prob"].max().groupby("layer").mean()
    return {"p_before": float(best.get(after - 1, float("nan"))), "p_after": float(best.get(after, float("nan")))}


def _score(
    out: Path,
    routes: PlantedRoutes,
    settings: ValidationSettings,
    flows: dict[int, list[pd.DataFrame]],
    attention: list[pd.DataFrame],
    lens: list[pd.DataFrame],
    samples: pd.DataFrame,
) -> ValidationResult:
    from vlmflow.experiments.lens import first_top1_layers

    n = routes.n_layers
    bands = {str(flow): band for flow, band in routes.flows.items()}
    report: dict[str, Any] = {
        "routes": routes.to_json(),
        "samples": {
            "n": len(samples),
            "correct": int(samples["correct"].sum()),
            "kept": int(samples["kept"].sum()),
            "per_task": settings.per_task,
            "seed": settings.seed,
            "keep_all": settings.keep_all,
        },
        "windows": {},
    }
    result = ValidationResult(path=out, routes=routes, report=report)
    for window, frames in flows.items():
        frame = pd.concat(frames, ignore_index=True)
        result.curves[window] = flow_curves(frame, n)
        table = score_curves(result.curves[window], bands, window)
        result.tables[window] = table
        entry = table.as_dict()
        entry["tasks"] = {
            str(task): score_curves(flow_curves(part, n), bands, window).as_dict()["overall"]
            for task, part in frame.groupby("task", sort=False)
        }
        report["windows"][str(window)] = entry
    if attention:
        result.attention_curves = attention_curves(pd.concat(attention, ignore_index=True), PAPER_FLOWS, n)
        result.attention = score_curves(result.attention_curves, bands, 1)
        report["attention"] = result.attention.as_dict()
    question_last = routes.flows.get(Flow(Group.QUESTION, Group.LAST))
    if lens and question_last:
        frame = pd.concat(lens, ignore_index=True)
        firsts = first_top1_layers(frame)
        answer = firsts[firsts["form"] == "answer_any"]
        after = max(question_last) + 1
        report["lens"] = {
            readout: {**lens_score(part["first_top1"].tolist(), after=after), **answer_probability(frame, readout, after)}
            for readout, part in answer.groupby("readout")
        }
    return result
