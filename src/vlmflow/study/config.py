"""The study config: the paper's whole grid (models x tasks x experiments) in one YAML or TOML file.

A config is read once, at the edge, into the frozen dataclasses below; nothing past
:func:`load_config` looks at strings from the user. Unknown keys, wrong types and bad values raise
:class:`~vlmflow.errors.ConfigError` naming where they are (``models[1].window``) and what would be
valid. Relative paths are relative to the config file; ``$VAR`` and ``~`` are expanded, and a
variable that is not set is an error naming it.

Example (YAML; TOML has the same keys)::

    name: paper
    models:
      - {label: llava-1.5-13b, model: llava-hf/llava-1.5-13b-hf, dtype: float16}
    tasks:
      - {label: ChooseAttr, data: "gqa:ChooseAttr", images: $GQA_IMAGES}
    flows: [question->last, image->last, last->last, image->question, related->question, other->question]
    windows: {32: 7, 40: 9}          # window per model depth (the paper's); default: about 22% of depth
    lens: {readouts: [raw, normed]}
    controls: {random_draws: 5}

See ``docs/study.md`` for every key.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vlmflow.analysis.claims import ClaimThresholds
from vlmflow.data.sample import TaskType
from vlmflow.errors import ConfigError
from vlmflow.experiments.runner import DataSpec
from vlmflow.experiments.settings import ControlSettings, Engine, FlowSettings, LensSettings, Readout
from vlmflow.experiments.windows import default_window
from vlmflow.load_spec import LoadSpec
from vlmflow.positions.groups import Group
from vlmflow.positions.routes import PAPER_FLOWS, Flow
from vlmflow.settings import declared, read_config, read_value

T = TypeVar("T")

FIGURE_FORMATS = ("svg", "png")
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class ModelEntry:
    """One model of the study: its label, its window and how to load it.

    Attributes:
        label: short name used for folders and in the report (letters, digits, ``_.+-``).
        spec: how to load it (:class:`~vlmflow.load_spec.LoadSpec`; its config keys are those
            declared there: ``model``, ``dtype``, ``device``, ``attn``, ...).
        window: layers per knockout window; ``None``: the study's ``windows`` for the model's depth,
            else the paper's rule (:func:`~vlmflow.experiments.windows.default_window`).
    """

    label: str
    spec: LoadSpec
    window: int | None = None

    @property
    def model(self) -> str:
        """HF id, local checkpoint directory or alias (e.g. ``organism``)."""
        return self.spec.name

    @property
    def image_mode(self) -> str | None:
        return self.spec.image_mode


@dataclass(frozen=True)
class SyntheticEntry:
    """A synthetic scene set generated into the study directory (``vlmflow.data.scenes``)."""

    task: TaskType
    n: int = 48
    seed: int = 0


@dataclass(frozen=True)
class TaskEntry:
    """One task of the study: a task CSV or ``gqa:TASK`` with its images, or a synthetic scene set.

    Exactly one of ``data`` and ``synthetic`` is set.
    """

    label: str
    data: str | None = None
    images: str | None = None
    limit: int | None = None
    synthetic: SyntheticEntry | None = None

    def data_spec(self, data: str | None = None, images: str | None = None) -> DataSpec:
        """The runner's :class:`DataSpec` (``data``/``images`` override, e.g. a generated scene set)."""
        return DataSpec(data=data or self.data or "", images=images or self.images, limit=self.limit)


@dataclass(frozen=True)
class LensEntry:
    """The answer-emergence readout (paper §6): the :class:`LensSettings` fields a study sets."""

    readouts: tuple[Readout, ...] = (Readout.RAW, Readout.NORMED)
    top_k: int = 10


@dataclass(frozen=True)
class ControlsEntry:
    """The size-matched random-patch control of every ``related->TARGET`` flow (``random_draws``:
    :attr:`ControlSettings.draws`; 0 turns the control off)."""

    random_draws: int = 5


@dataclass(frozen=True)
class StatisticsEntry:
    """Bootstrap settings of every confidence interval in the report."""

    n_boot: int = 1000
    seed: int = 0
    confidence: float = 0.95


@dataclass(frozen=True)
class ReportEntry:
    """What the HTML report shows."""

    viewer_samples: int = 6
    figure_format: str = "svg"


@dataclass(frozen=True)
class StudyConfig:
    """A parsed study config. Build with :func:`load_config` or :func:`parse_config`.

    >>> cfg = parse_config({"models": [{"model": "organism"}], "tasks": [{"data": "gqa:ChooseAttr"}]})
    >>> cfg.models[0].label, cfg.tasks[0].label, len(cfg.flows)
    ('organism', 'ChooseAttr', 6)
    """

    models: tuple[ModelEntry, ...]
    tasks: tuple[TaskEntry, ...]
    name: str = "study"
    flows: tuple[Flow, ...] = PAPER_FLOWS
    windows: Mapping[int, int] = field(default_factory=dict)
    engine: Engine = Engine.FAST
    keep_all: bool = False
    max_new_tokens: int = 12
    lens: LensEntry | None = field(default_factory=LensEntry)
    controls: ControlsEntry | None = field(default_factory=ControlsEntry)
    statistics: StatisticsEntry = field(default_factory=StatisticsEntry)
    claims: ClaimThresholds = field(default_factory=ClaimThresholds)
    report: ReportEntry = field(default_factory=ReportEntry)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def window_for(self, model: ModelEntry, n_layers: int) -> int:
        """Window size for ``model`` with ``n_layers`` layers: its own, the study's for that depth,
        else the paper's rule.

        >>> cfg = parse_config({"models": [{"model": "m"}], "tasks": [{"data": "gqa:QueryAttr"}], "windows": {32: 7}})
        >>> cfg.window_for(cfg.models[0], 32), cfg.window_for(cfg.models[0], 40)
        (7, 9)
        """
        if model.window is not None:
            return model.window
        return self.windows.get(n_layers, default_window(n_layers))

    @property
    def control_flows(self) -> tuple[Flow, ...]:
        """The paper flows whose source is the related patches (each gets a random-patch control)."""
        return tuple(f for f in self.flows if f.is_simple and f.source == Group.RELATED and isinstance(f.target, Group))


def describe_model(spec: LoadSpec) -> str:
    """One line of how a study loads a model: checkpoint, dtype, patch rule and the other options set.

    >>> describe_model(LoadSpec("llava-hf/llava-1.5-7b-hf", dtype="float16", patch_rule="paper"))
    'llava-hf/llava-1.5-7b-hf, dtype float16, patch rule paper'
    >>> describe_model(LoadSpec("m", image_mode="resize"))
    'm, dtype auto (bfloat16 on CUDA, else float32), patch rule overlap (default), image_mode resize'
    """
    dtype = spec.dtype if spec.dtype != "auto" else "auto (bfloat16 on CUDA, else float32)"
    rule = spec.patch_rule or "overlap (default)"
    others = [f"{key} {value}" for key, value in spec.options if key != "patch_rule"]
    return ", ".join([spec.name, f"dtype {dtype}", f"patch rule {rule}", *others])


# --- reading -----------------------------------------------------------------------------------------


def load_config(path: Path | str) -> StudyConfig:
    """Read a ``.yaml``/``.yml`` or ``.toml`` study config.

    >>> load_config("studies/organism.yaml").models[0].model   # doctest: +SKIP
    'organism'
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study config {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise ConfigError(f"study config {str(path)!r}: unknown format {suffix!r}; valid: .yaml, .yml, .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"study config {str(path)!r} is not valid {suffix[1:].upper()}: {exc}") from None
    return parse_config(data, base=path.parent)


def parse_config(data: Any, *, base: Path | None = None) -> StudyConfig:
    """Validate a config mapping (as YAML/TOML give it) into a :class:`StudyConfig`.

    ``base`` is the folder relative paths are resolved against (default: the current one).
    """
    reader = _Reader(base)
    top = reader.mapping(data, "config")
    reader.keys(top, "config", _TOP_KEYS, required=("models", "tasks"))
    models = tuple(reader.model(m, f"models[{i}]") for i, m in enumerate(reader.items(top["models"], "models")))
    tasks = tuple(reader.task(t, f"tasks[{i}]") for i, t in enumerate(reader.items(top["tasks"], "tasks")))
    for what, labels in (("models", [m.label for m in models]), ("tasks", [t.label for t in tasks])):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ConfigError(f"{what}: labels must be unique, {', '.join(dup)} appear more than once (set 'label')")
    flows = PAPER_FLOWS
    if "flows" in top:
        flows = read_value(FlowSettings, "flows", top["flows"], "flows")
        if len(set(flows)) != len(flows):
            raise ConfigError(f"flows: duplicate flows in {[str(f) for f in flows]}")
    windows = reader.windows(top.get("windows", {}))
    lens = reader.lens(top["lens"]) if "lens" in top else LensEntry()
    controls = reader.controls(top["controls"]) if "controls" in top else ControlsEntry()
    if not flows and lens is None:
        raise ConfigError("the study runs nothing: flows is empty and lens is off")
    statistics, claims, report = analysis_settings(top)
    return StudyConfig(
        models=models,
        tasks=tasks,
        name=reader.label(top.get("name", "study"), "name"),
        flows=flows,
        windows=windows,
        **{key: read_value(FlowSettings, key, top[key], key) for key in _SHARED_KEYS if key in top},
        lens=lens,
        controls=controls,
        statistics=statistics,
        claims=claims,
        report=report,
        raw=json.loads(json.dumps(top, default=str)),
    )


def analysis_settings(raw: Mapping[str, Any]) -> tuple[StatisticsEntry, ClaimThresholds, ReportEntry]:
    """The statistics, claims and report sections of a raw config (as a study manifest stores it).

    Only these sections are read, so a report can be made where the study's data paths or
    environment variables no longer exist.

    >>> analysis_settings({"statistics": {"n_boot": 200}})[0].n_boot
    200
    """
    reader = _Reader(None)
    return (
        reader.dataclass(StatisticsEntry, raw.get("statistics", {}), "statistics", _STATS_CHECKS),
        reader.dataclass(ClaimThresholds, raw.get("claims", {}), "claims", {}),
        reader.dataclass(ReportEntry, raw.get("report", {}), "report", _REPORT_CHECKS),
    )


_TOP_KEYS = (
    "name", "models", "tasks", "flows", "windows", "engine", "keep_all", "max_new_tokens", "lens", "controls",
    "statistics", "claims", "report",
)  # fmt: skip
#: Experiment settings the study sets once for all its runs (read as FlowSettings declares them).
_SHARED_KEYS = ("engine", "keep_all", "max_new_tokens")
#: A model entry: its label and window, and the config keys of LoadSpec (model, dtype, attn, ...).
_LOAD_KEYS = tuple(d.config for d in declared(LoadSpec) if d.config is not None)
_MODEL_KEYS = ("label", "model", "window", *(k for k in _LOAD_KEYS if k != "model"))
_TASK_KEYS = ("label", "data", "images", "limit", "synthetic")
_STATS_CHECKS: dict[str, Callable[[Any], bool]] = {
    "n_boot": lambda v: v >= 100,
    "confidence": lambda v: 0.5 < v < 1.0,
}
_REPORT_CHECKS: dict[str, Callable[[Any], bool]] = {
    "viewer_samples": lambda v: v >= 0,
    "figure_format": lambda v: v in FIGURE_FORMATS,
}


class _Reader:
    """Typed access to the raw config with errors that say where and what is valid."""

    def __init__(self, base: Path | None) -> None:
        self.base = base

    # -- primitives --
    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping (key: value), got {type(value).__name__}")
        return {str(k): v for k, v in value.items()}

    def keys(self, value: Mapping[str, Any], where: str, valid: Sequence[str], required: Sequence[str] = ()) -> None:
        unknown = [k for k in value if k not in valid]
        if unknown:
            raise ConfigError(f"{where}: unknown key {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
        missing = [k for k in required if k not in value]
        if missing:
            raise ConfigError(f"{where}: missing required key {', '.join(map(repr, missing))}")

    def items(self, value: Any, where: str, *, empty: bool = False) -> list[Any]:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__}")
        if not value and not empty:
            raise ConfigError(f"{where} must not be empty")
        return value

    def integer(self, value: Any, where: str, *, minimum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{where} must be >= {minimum}, got {value}")
        return value

    def boolean(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where} must be a non-empty string, got {value!r}")
        return value.strip()

    def label(self, value: Any, where: str) -> str:
        text = self.string(value, where)
        if not _LABEL_RE.match(text):
            raise ConfigError(f"{where} {text!r} may only hold letters, digits and _ . + - (it names folders)")
        return text

    def parse(self, parser: Callable[[str], T], value: Any, where: str) -> T:
        try:
            return parser(self.string(value, where))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def path(self, value: Any, where: str) -> str:
        text = os.path.expanduser(self.string(value, where))
        for name in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", text):
            if name not in os.environ:
                raise ConfigError(f"{where}: environment variable {name!r} (in {value!r}) is not set")
        text = os.path.expandvars(text)
        if self.base is not None and not Path(text).is_absolute():
            text = str(self.base / text)
        return text

    def dataclass(self, cls: type[T], value: Any, where: str, checks: Mapping[str, Callable[[Any], bool]]) -> T:
        raw = self.mapping(value, where)
        valid = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        self.keys(raw, where, tuple(valid))
        out: dict[str, Any] = {}
        for key, val in raw.items():
            default = valid[key].default
            kind = type(default)
            if kind is bool:
                val = self.boolean(val, f"{where}.{key}")
            elif kind is int:
                val = self.integer(val, f"{where}.{key}")
            elif kind is float:
                if isinstance(val, bool) or not isinstance(val, int | float):
                    raise ConfigError(f"{where}.{key} must be a number, got {val!r}")
                val = float(val)
            elif kind is tuple:
                if not isinstance(val, list) or len(val) != len(default):  # type: ignore[arg-type]
                    raise ConfigError(f"{where}.{key} must be a list of {len(default)} numbers, got {val!r}")  # type: ignore[arg-type]
                val = tuple(float(v) for v in val)
            elif kind is str:
                val = self.string(val, f"{where}.{key}")
            check = checks.get(key)
            if check is not None and not check(val):
                raise ConfigError(f"{where}.{key}: invalid value {val!r}")
            out[key] = val
        try:
            return cls(**out)
        except (ConfigError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None

    # -- sections --
    def model(self, value: Any, where: str) -> ModelEntry:
        if isinstance(value, str):
            value = {"model": value}
        raw = self.mapping(value, where)
        self.keys(raw, where, _MODEL_KEYS, required=("model",))
        model = self.string(raw["model"], f"{where}.model")
        # A local checkpoint (relative to the config file) becomes a path; an HF id or alias stays as is.
        local = self.base / model if self.base is not None else Path(model)
        if model.startswith((".", "/", "~", "$")) or local.exists():
            model = self.path(model, f"{where}.model")
        label = raw.get("label") or Path(str(raw["model"]).rstrip("/")).name
        window = None if raw.get("window") is None else read_value(FlowSettings, "window", raw["window"], f"{where}.window")
        spec = read_config(LoadSpec, {**{k: v for k, v in raw.items() if k in _LOAD_KEYS}, "model": model}, where)
        return ModelEntry(label=self.label(label, f"{where}.label"), spec=spec, window=window)

    def task(self, value: Any, where: str) -> TaskEntry:
        if isinstance(value, str):
            value = {"data": value}
        raw = self.mapping(value, where)
        self.keys(raw, where, _TASK_KEYS)
        if ("data" in raw) == ("synthetic" in raw):
            raise ConfigError(f"{where}: give exactly one of 'data' (a task CSV or gqa:TASK) and 'synthetic'")
        limit = None if raw.get("limit") is None else self.integer(raw["limit"], f"{where}.limit", minimum=1)
        if "synthetic" in raw:
            syn = self.mapping(raw["synthetic"], f"{where}.synthetic")
            self.keys(syn, f"{where}.synthetic", ("task", "n", "seed"), required=("task",))
            synthetic = SyntheticEntry(
                task=self.parse(_task_type, syn["task"], f"{where}.synthetic.task"),
                n=self.integer(syn.get("n", 48), f"{where}.synthetic.n", minimum=1),
                seed=self.integer(syn.get("seed", 0), f"{where}.synthetic.seed"),
            )
            if "images" in raw:
                raise ConfigError(f"{where}: 'images' is not used with 'synthetic' (the scenes are generated)")
            label = raw.get("label") or f"scenes-{synthetic.task.value}"
            return TaskEntry(label=self.label(label, f"{where}.label"), limit=limit, synthetic=synthetic)
        data = self.string(raw["data"], f"{where}.data")
        if data.lower().startswith("gqa:"):
            self.parse(_task_type, data[4:], f"{where}.data")
            default_label = _task_type(data[4:]).value
        else:
            data = self.path(data, f"{where}.data")
            default_label = re.sub(r"\.csv$", "", Path(data).name)
        images = None if raw.get("images") is None else self.path(raw["images"], f"{where}.images")
        label = raw.get("label") or default_label
        return TaskEntry(label=self.label(label, f"{where}.label"), data=data, images=images, limit=limit)

    def windows(self, value: Any) -> dict[int, int]:
        raw = self.mapping(value, "windows")
        out: dict[int, int] = {}
        for depth, k in raw.items():
            if not str(depth).isdigit():
                raise ConfigError(f"windows: key {depth!r} must be a number of layers (e.g. 32: 7)")
            out[int(depth)] = self.integer(k, f"windows.{depth}", minimum=1)
        return out

    def lens(self, value: Any) -> LensEntry | None:
        if value is False or value is None:
            return None
        raw = self.mapping(value, "lens")
        self.keys(raw, "lens", ("readouts", "top_k"))
        if "readouts" in raw:
            self.items(raw["readouts"], "lens.readouts")
        values = {key: read_value(LensSettings, key, raw[key], f"lens.{key}") for key in raw}
        return LensEntry(**values)

    def controls(self, value: Any) -> ControlsEntry | None:
        if value is False or value is None:
            return None
        raw = self.mapping(value, "controls")
        self.keys(raw, "controls", ("random_draws",))
        draws = raw.get("random_draws", ControlsEntry.random_draws)
        if draws == 0 and not isinstance(draws, bool):
            return None
        return ControlsEntry(random_draws=read_value(ControlSettings, "draws", draws, "controls.random_draws"))


def _task_type(text: str) -> TaskType:
    try:
        return TaskType.parse(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
