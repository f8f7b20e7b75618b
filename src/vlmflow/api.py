"""The Python API: run the paper's experiments and read their results from a script or notebook.

Everything here is also reachable as ``vlmflow.<name>`` (``vlmflow.run_flows``, ``vlmflow.load_run``,
``vlmflow.Run``, ``vlmflow.run_lens``; ``vlmflow.load_model`` comes from :mod:`vlmflow.loading`, the
settings types ``vlmflow.LoadSpec``, ``vlmflow.FlowSettings``, ``vlmflow.LensSettings`` from
:mod:`vlmflow.load_spec` and :mod:`vlmflow.experiments.settings`).
A run writes the same run directory as the command line (``vlmflow flows``), so a run started in a
notebook can be plotted with ``vlmflow plot`` and the other way round; rerunning the same call
resumes it and recomputes nothing already done.

>>> import vlmflow
>>> run = vlmflow.run_flows(
...     model="llava-hf/llava-1.5-7b-hf", data="gqa:ChooseAttr", images="gqa/images",
...     flows=["image->last", "question->last", "image->question"], window=9, out="runs",
... )                                                                       # doctest: +SKIP
>>> run.flows.groupby(["flow", "layer"]).rel_change.mean()                 # doctest: +SKIP
>>> run.plot()                                                              # doctest: +SKIP
>>> vlmflow.load_run(run.path).samples.correct.mean()                      # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmflow.errors import ConfigError
from vlmflow.experiments.settings import FlowSettings, LensSettings
from vlmflow.load_spec import LoadSpec, load_spec
from vlmflow.positions.routes import Flow
from vlmflow.settings import build
from vlmflow.settings_keywords import route_keywords, settings_keywords

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from vlmflow.distributed import RayOptions
    from vlmflow.experiments.runner import Experiment, RunOutcome, RunSpec
    from vlmflow.loading import LoadedModel
    from vlmflow.plots.groups import GroupsReport
    from vlmflow.results.store import RunStore

__all__ = ["Run", "load_run", "run_flows", "run_lens", "show_groups"]

#: ``progress(done, total, message)``, called after every sample.
ProgressCallback = Callable[[int, int, str], None]


class Run:
    """A run directory, read back: its spec, summary and result tables as pandas DataFrames.

    Tables are read from disk on every access, so a run still being written (by another process)
    shows its latest committed samples.

    >>> run = Run("runs/flows-llava-1.5-7b-hf-ChooseAttr-1a2b3c4d")  # doctest: +SKIP
    >>> run                                                         # doctest: +SKIP
    Run('runs/flows-llava-1.5-7b-hf-ChooseAttr-1a2b3c4d': flows, 1000 samples, 874 kept, 0 errors)
    >>> run.curves().query("flow == 'image->question'").head()       # doctest: +SKIP
    """

    def __init__(self, path: Path | str) -> None:
        from vlmflow.results.store import RunStore

        self.path = Path(path)
        self.store: RunStore = RunStore.load(self.path)  # ConfigError if it is not a run directory

    # --- what the run is ----------------------------------------------------------------------------

    @property
    def spec(self) -> dict[str, Any]:
        """The run's spec as stored in ``spec.json`` (model, data, settings, provenance)."""
        return self.store.spec

    @property
    def experiment(self) -> str:
        """``"flows"``, ``"lens"``, ... (the experiment that wrote the run)."""
        return str(self.spec.get("experiment", ""))

    @property
    def summary(self) -> dict[str, Any]:
        """Counts written when the run finished (``summary.json``; empty while it is still running)."""
        from vlmflow.results.store import SUMMARY_FILE

        path = self.path / SUMMARY_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def tables(self) -> list[str]:
        """Names of the tables holding rows, e.g. ``['errors', 'flows', 'samples']``."""
        return self.store.tables()

    def table(self, name: str) -> pd.DataFrame:
        """All rows of table ``name`` (columns: :mod:`vlmflow.results.tables`, ``docs/results.md``)."""
        return self.store.read(name)

    # --- the tables users reach for --------------------------------------------------------------------

    @property
    def samples(self) -> pd.DataFrame:
        """One row per sample: prediction, ``correct``, ``kept``, ``p_base``, group sizes, ..."""
        return self.table("samples")

    @property
    def errors(self) -> pd.DataFrame:
        """One row per sample that failed (``sample_id``, ``stage``, ``reason``); the run went on."""
        return self.table("errors")

    @property
    def flows(self) -> pd.DataFrame:
        """One row per (kept sample, flow, window centre ``layer``): ``p_base``, ``p_blocked``, ``rel_change``, ..."""
        from vlmflow.plots.flows import kept_flows

        return kept_flows(self.store)

    @property
    def lens(self) -> pd.DataFrame:
        """The lens table: probability and rank of each tracked form per (sample, readout, position, layer)."""
        return self.table("lens")

    @property
    def lens_top(self) -> pd.DataFrame:
        """The lens's top-k tokens and entropy per (sample, readout, position, layer), with the input token."""
        return self.table("lens_top")

    @property
    def controls(self) -> pd.DataFrame:
        """The random-patch control: ``flows`` rows of ``random->TARGET`` knockouts plus the random ``draw``."""
        return self.table("controls")

    @property
    def attention(self) -> pd.DataFrame:
        """Attention mass per (sample, layer, target group, source group): ``mass`` and ``mass_per_head``."""
        return self.table("attention")

    def curves(self) -> pd.DataFrame:
        """The flow figure's numbers: mean % change and 95% bootstrap band per (task, flow, layer).

        Columns ``task, flow, layer, n, mean, low, high`` (``n``: samples at that point).
        """
        import pandas as pd

        from vlmflow.plots.common import curves

        flows = self.flows
        parts = []
        for task, frame in flows.groupby("task", sort=False):
            table = curves(frame, "flow", "rel_change")
            table.insert(0, "task", task)
            parts.append(table)
        if not parts:
            return pd.DataFrame(columns=["task", "flow", "layer", "n", "mean", "low", "high"])
        return pd.concat(parts, ignore_index=True)

    # --- figures ---------------------------------------------------------------------------------------

    def plot(self, task: str | None = None, *, flows: Sequence[str | Flow] | None = None) -> Figure:
        """The run's main figure (a matplotlib Figure; a notebook shows it inline).

        A flows run gives the paper's knockout figure (one row of panels per task, or only ``task``;
        only ``flows`` if given); a lens run gives the answer-emergence figure (raw readout).
        """
        if "flows" in self.tables:
            from vlmflow.plots.flows import plot_flows

            frame = self.flows
            if task is not None:
                frame = frame[frame["task"] == task]
                if frame.empty:
                    raise ConfigError(f"run has no flow rows for task {task!r}; tasks: {sorted(set(self.flows['task']))}")
            order = [str(Flow.parse(f) if isinstance(f, str) else f) for f in flows] if flows else self._flow_order(frame)
            return plot_flows(frame, flow_order=order)
        if "lens" in self.tables:
            from vlmflow.plots.lens import plot_lens

            return plot_lens(self.lens)
        raise ConfigError(f"run {str(self.path)!r} has nothing to plot (tables: {', '.join(self.tables) or 'none'})")

    def save_figures(self, out: Path | str | None = None, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
        """Write every figure of the run (as ``vlmflow plot`` does) into ``out`` (default ``RUN_DIR/figures``)."""
        from vlmflow.plots.flows import write_flow_figures
        from vlmflow.plots.lens import write_lens_figures

        return write_flow_figures(self.path, out=out, formats=formats) + write_lens_figures(
            self.path, out=out, formats=formats
        )

    def _flow_order(self, frame: pd.DataFrame) -> list[str]:
        present = set(frame["flow"])
        stored = self.spec.get("settings", {}).get("flows") or []
        return [f for f in stored if f in present] + [f for f in dict.fromkeys(frame["flow"]) if f not in stored]

    def __repr__(self) -> str:
        summary = self.summary
        if summary:
            counts = f"{summary.get('samples')} samples, {summary.get('kept')} kept, {summary.get('errors')} errors"
        else:
            counts = "not finished"
        return f"Run({str(self.path)!r}: {self.experiment or 'unknown experiment'}, {counts})"


def load_run(path: Path | str) -> Run:
    """Open a run directory written by ``vlmflow flows``/``lens`` or :func:`run_flows`.

    >>> import vlmflow
    >>> run = vlmflow.load_run("runs/flows-llava-1.5-7b-hf-ChooseAttr-1a2b3c4d")  # doctest: +SKIP
    >>> run.flows.head()                                                     # doctest: +SKIP
    """
    return Run(path)


@settings_keywords(LoadSpec, FlowSettings)
def run_flows(
    model: str | Path | LoadSpec | LoadedModel,
    data: str | Path,
    *,
    settings: FlowSettings | None = None,
    images: str | Path | None = None,
    out: str | Path = "runs",
    name: str | None = None,
    limit: int | None = None,
    progress: bool | ProgressCallback = False,
    ray: RayOptions | str | None = None,
    **keywords: Any,
) -> Run:
    """Knock out attention flows in windows of layers over a dataset (the paper's experiment).

    How to load the model and how to run the experiment are given as typed objects
    (``model=LoadSpec(...)``, ``settings=FlowSettings(...)``) or field by field as keywords
    (``dtype="float16"``, ``window=9``, ``flows=["image->last"]``: listed below); keywords are set
    on the objects given.

    Args:
        model: a local checkpoint directory, a Hugging Face id (from the local cache unless
            ``allow_hub``), a :class:`~vlmflow.load_spec.LoadSpec`, or a model already loaded with
            :func:`vlmflow.load_model` (then the loading keywords are ignored).
        data: a task CSV in the released GQA layout, or ``"gqa:TASK"`` for a packaged file.
        settings: the experiment's :class:`~vlmflow.experiments.settings.FlowSettings` (default:
            the paper's six flows, window by model depth, the fast engine).
        images: folder of ``{img_id}.jpg``/``.png`` (default: beside the CSV).
        out: parent folder of run directories; the run goes to ``out/<name>``.
        name: run directory name (default: ``flows-MODEL-DATA-HASH``, the hash of the run's identity).
        limit: only the first ``limit`` samples.
        progress: ``True`` for a progress bar (tqdm), or a ``progress(done, total, message)`` callback.
        ray: run on a Ray cluster: ``"auto"``, ``"local"``, an address, or
            :class:`~vlmflow.distributed.RayOptions` (see ``docs/scale-out.md``); same run directory.

    Returns:
        The :class:`Run` (its directory is complete and resumable).

    Raises:
        TypeError: a keyword that names no field (the message lists the valid ones).
        ConfigError: a bad value (the message names it and what is valid).

    >>> import vlmflow
    >>> run = vlmflow.run_flows(model="tiny-llava", data="scenes/scenes_ChooseAttr.csv", window=3)   # doctest: +SKIP
    >>> run.curves().head()                                                                # doctest: +SKIP
    """
    from vlmflow.experiments.settings import FlowSettings

    load_fields, flow_fields = route_keywords("run_flows", keywords, LoadSpec, FlowSettings)
    experiment = build(FlowSettings, flow_fields, base=settings or FlowSettings())
    model_spec, loaded = _model_spec(model, load_fields)
    outcome = _run(model_spec, loaded, data, images, limit, experiment, out, name, progress, ray)
    return Run(outcome.path)


@settings_keywords(LoadSpec, LensSettings)
def run_lens(
    model: str | Path | LoadSpec | LoadedModel,
    data: str | Path,
    *,
    settings: LensSettings | None = None,
    images: str | Path | None = None,
    out: str | Path = "runs",
    name: str | None = None,
    limit: int | None = None,
    progress: bool | ProgressCallback = False,
    ray: RayOptions | str | None = None,
    **keywords: Any,
) -> Run:
    """The paper's answer-emergence readout (logit lens at the last position) over a dataset.

    ``settings`` is a :class:`~vlmflow.experiments.settings.LensSettings`; its fields, and the
    loading fields, can be given as keywords too (listed below): ``readouts`` ``"raw"`` (the
    paper's: no final norm below the top layer) and/or ``"normed"``; ``groups``: also read every
    position of these groups (e.g. ``["question"]``); ``attention``: also record group-to-group
    attention mass (``True`` for the default groups, or an ``AttentionSettings``). The other
    arguments are those of :func:`run_flows`. See ``docs/lens.md``.

    >>> run = vlmflow.run_lens(model="tiny-llava", data="scenes/scenes_ChooseAttr.csv", groups=["question"])  # doctest: +SKIP
    >>> run.plot()                                                                                  # doctest: +SKIP
    """
    from vlmflow.experiments.settings import LensSettings

    load_fields, lens_fields = route_keywords("run_lens", keywords, LoadSpec, LensSettings)
    experiment = build(LensSettings, lens_fields, base=settings or LensSettings())
    model_spec, loaded = _model_spec(model, load_fields)
    outcome = _run(model_spec, loaded, data, images, limit, experiment, out, name, progress, ray)
    return Run(outcome.path)


@settings_keywords(LoadSpec)
def show_groups(
    model: str | Path | LoadSpec | LoadedModel,
    data: str | Path,
    *,
    sample: str | None = None,
    groups: Sequence[Any] | None = None,
    images: str | Path | None = None,
    out: str | Path | None = None,
    **keywords: Any,
) -> GroupsReport:
    """One sample's position groups: positions, tokens, and the image patches of image groups.

    Args:
        model: as for :func:`run_flows`.
        data: as for :func:`run_flows`.
        sample: the sample id (default: the first sample of ``data``).
        groups: group expressions (text, :class:`~vlmflow.positions.groups.Group`, a callable from the
            prepared sample to positions; default: every named group).
        images: folder of the images (default: beside the data file).
        out: write a PNG per image group there (the image with the group's patches outlined).

    Returns:
        A :class:`~vlmflow.plots.groups.GroupsReport`: ``report.table()`` is what
        ``vlmflow groups`` prints, ``report["question"].positions`` a group's positions,
        ``report.figure("related")`` a matplotlib Figure.

    >>> report = vlmflow.show_groups("organism", "scenes/scenes_ChooseAttr.csv", groups=['text:"red"', "related"])  # doctest: +SKIP
    >>> print(report.table())                                                                            # doctest: +SKIP
    """
    from vlmflow.experiments.prepare import open_visuals, prepare_sample
    from vlmflow.experiments.runner import DataSpec, load_data
    from vlmflow.loading import load_model
    from vlmflow.plots.groups import group_report

    model_spec, loaded = _model_spec(model, keywords)
    samples, _, folder = load_data(DataSpec(str(data), str(images) if images is not None else None))
    chosen = samples[0] if sample is None else next((s for s in samples if s.sample_id == str(sample)), None)
    if chosen is None:
        shown = ", ".join(s.sample_id for s in samples[:5])
        raise ConfigError(f"no sample {sample!r} in {str(data)!r}; its samples begin {shown}")
    loaded = loaded or load_model(model_spec)
    visuals = open_visuals(chosen, folder)  # its image, its several images or its video
    prepared = prepare_sample(loaded, chosen, visuals, check_answer=False)
    return group_report(loaded, prepared, groups, visuals=visuals, out=Path(out) if out is not None else None)


# --- shared by the experiment functions and the CLI ------------------------------------------------------


def _model_spec(model: str | Path | LoadSpec | LoadedModel, fields: Mapping[str, Any]) -> tuple[LoadSpec, LoadedModel | None]:
    """The model part of a run spec, and the model itself when the caller already loaded it."""
    from vlmflow.loading import LoadedModel

    if not isinstance(model, LoadedModel):
        return load_spec(model, fields, "run"), None
    info = model.info
    impl = info.get("attn_implementation") or getattr(model.model.config, "_attn_implementation", None) or "sdpa"
    spec = LoadSpec(
        name=str(info.get("model", "in-memory")),
        dtype=str(info.get("dtype", "auto")),
        device=str(info.get("device", "auto")),
        attn_implementation=str(impl),
        revision=info.get("revision"),
        template=str(info.get("prompt_template")) if info.get("prompt_template") else None,
        options=tuple(sorted(model.options.items())),
    )
    return spec, model


def _run(
    model_spec: LoadSpec,
    loaded: LoadedModel | None,
    data: str | Path,
    images: str | Path | None,
    limit: int | None,
    settings: Experiment,
    out: str | Path,
    name: str | None,
    progress: bool | ProgressCallback,
    ray: RayOptions | str | None = None,
) -> RunOutcome:
    from vlmflow.experiments.runner import DataSpec, RunSpec

    spec = RunSpec(
        model=model_spec,
        data=DataSpec(data=str(data), images=str(images) if images is not None else None, limit=limit),
        experiment=settings,
        name=name,
    )
    if progress is True:
        with _tqdm_progress() as callback:
            return _execute(spec, out, callback, loaded, ray)
    return _execute(spec, out, progress or None, loaded, ray)


def _execute(
    spec: RunSpec,
    out: str | Path,
    progress: ProgressCallback | None,
    loaded: LoadedModel | None,
    ray: RayOptions | str | None,
) -> RunOutcome:
    """In this process, or on Ray (same run directory either way)."""
    from vlmflow.experiments.runner import run_to_store

    if ray is None:
        return run_to_store(spec, out, progress=progress, loaded=loaded)
    from vlmflow.distributed import RayOptions, execute

    if loaded is not None:
        raise ConfigError("a model already loaded in this process cannot run on Ray; pass its checkpoint path or id")
    return execute(spec, out, ray=ray if isinstance(ray, RayOptions) else RayOptions(ray), progress=progress)


class _tqdm_progress:
    """A tqdm bar (notebook-aware) driven by the runner's ``progress(done, total, message)``.

    The bar appears at the first update, when the number of samples is known (none while the data
    is read and the model loads, so an error then is not preceded by an empty bar).
    """

    def __enter__(self) -> ProgressCallback:
        self.bar: Any = None

        def update(done: int, total: int, message: str) -> None:
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=done, unit="sample", desc="vlmflow")
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()

        return update

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
