"""What each experiment is asked to do: one frozen settings type per experiment, declared once.

:class:`FlowSettings` (the paper's knockout flows), :class:`ControlSettings` (the random-patch
control, holding a FlowSettings), :class:`LensSettings` (the logit lens) and
:class:`AttentionSettings` (group-to-group attention mass). Each field is a
:func:`~vlmflow.settings.setting`: the CLI options of ``vlmflow flows``/``lens``, the keywords of
``vlmflow.run_flows``/``run_lens``, the study config keys and each run's identity come from these
declarations. Strings given for typed fields (``"image->last"``, ``"reference"``, ``"raw"``) are
parsed once, when the object is built.

Importing this module imports no torch; :meth:`analyse` imports the experiment's code when it runs.

>>> FlowSettings(flows=["image->last"], engine="reference").engine
<Engine.REFERENCE: 'reference'>
>>> FlowSettings(window=0)
Traceback (most recent call last):
...
vlmflow.settings.SettingError: window must be >= 1, got 0
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from vlmflow.errors import ConfigError
from vlmflow.experiments.windows import WindowStyle, default_window
from vlmflow.positions.groups import Group
from vlmflow.positions.routes import PAPER_FLOWS, Flow
from vlmflow.settings import Settings, setting

if TYPE_CHECKING:
    from collections.abc import Sequence

    from vlmflow.errors import SampleError
    from vlmflow.experiments.prepare import PreparedSample
    from vlmflow.loading import LoadedModel
    from vlmflow.results.tables import Row

__all__ = [
    "DEFAULT_SOURCES",
    "DEFAULT_TARGETS",
    "AttentionSettings",
    "ControlSettings",
    "Engine",
    "FlowSettings",
    "LensSettings",
    "Metric",
    "Mode",
    "Readout",
    "WindowStyle",
]

log = logging.getLogger(__name__)

Tables = dict[str, list["Row"]]

DEFAULT_TARGETS = (Group.IMAGE, Group.QUESTION, Group.LAST)
DEFAULT_SOURCES = (Group.SYSTEM, Group.IMAGE, Group.RELATED, Group.OTHER, Group.QUESTION, Group.SUFFIX, Group.LAST)


class Engine(StrEnum):
    """The knockout engine (values are what users type); :mod:`vlmflow.experiments.engines` runs each."""

    FAST = "fast"  # exact, batched: recomputes only what a knockout can change
    REFERENCE = "reference"  # one full forward per window

    @classmethod
    def parse(cls, text: str) -> Engine:
        """``"fast"``/``"reference"`` (any case) -> :class:`Engine`.

        >>> Engine.parse("Reference")
        <Engine.REFERENCE: 'reference'>
        """
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise ConfigError(f"unknown engine {text!r}; valid: {', '.join(e.value for e in cls)}") from None


class Readout(StrEnum):
    """How a hidden state becomes logits (values are what users type)."""

    RAW = "raw"  # the paper's: no final norm for j < L; final norm at j = L
    NORMED = "normed"  # final norm at every j

    @classmethod
    def parse(cls, text: str) -> Readout:
        """``"raw"``/``"normed"`` (any case) -> :class:`Readout`.

        >>> Readout.parse("logit")
        Traceback (most recent call last):
        ...
        vlmflow.errors.ConfigError: unknown readout 'logit'; valid: raw, normed
        """
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise ConfigError(f"unknown readout {text!r}; valid: {', '.join(r.value for r in cls)}") from None


class Metric(StrEnum):
    """What a knockout's effect is measured on (values are what users type).

    Every ``flows`` row records ``p_base``, ``p_blocked`` and ``rel_change`` of its metric, and the
    KL divergence of the next-token distribution whatever the metric.
    """

    FIRST_TOKEN = "first-token"  # the paper's: probability of the first answer token at the last position
    SEQUENCE = "sequence"  # length-normalised probability of the whole greedy answer, teacher-forced (FG-TRACER)
    KL = "kl"  # KL divergence of the next-token distribution, clean || knocked out (nats)

    @property
    def column(self) -> str:
        """The ``flows`` column that holds this metric's effect (what figures plot)."""
        return "kl" if self is Metric.KL else "rel_change"

    @property
    def axis_label(self) -> str:
        """Label of a figure's effect axis."""
        return {
            Metric.FIRST_TOKEN: "Change in probability (%)",
            Metric.SEQUENCE: "Change in answer probability, length-normalised (%)",
            Metric.KL: "KL divergence, next token (nats)",
        }[self]

    @classmethod
    def parse(cls, text: str) -> Metric:
        """``"first-token"``/``"sequence"``/``"kl"`` (any case, ``_`` for ``-``) -> :class:`Metric`.

        >>> Metric.parse("First_Token")
        <Metric.FIRST_TOKEN: 'first-token'>
        """
        try:
            return cls(text.strip().lower().replace("_", "-"))
        except ValueError:
            raise ConfigError(f"unknown metric {text!r}; valid: {', '.join(m.value for m in cls)}") from None


class Mode(StrEnum):
    """How a flow's routes are applied (values are what users type)."""

    KNOCKOUT = "knockout"  # block the routes' edges (the paper's)
    KEEP_ONLY = "keep-only"  # the targets may read only the routes' sources and themselves

    @classmethod
    def parse(cls, text: str) -> Mode:
        """``"knockout"``/``"keep-only"`` (any case, ``_`` for ``-``) -> :class:`Mode`.

        >>> Mode.parse("keep_only")
        <Mode.KEEP_ONLY: 'keep-only'>
        """
        try:
            return cls(text.strip().lower().replace("_", "-"))
        except ValueError:
            raise ConfigError(f"unknown mode {text!r}; valid: {', '.join(m.value for m in cls)}") from None


def _keep_all() -> Any:
    return setting(False, help="Keep wrongly answered samples too (the paper drops them).")


def _max_new_tokens() -> Any:
    return setting(12, minimum=1, help="Greedy tokens for the baseline answer.")


def _retry_errors() -> Any:
    return setting(
        False,
        identity=False,  # which samples are (re)computed, not what
        help="Recompute what the run recorded as errors (samples, and single flows of a sample).",
    )


def _check_distinct(what: str, values: tuple[Any, ...]) -> None:
    if len(set(values)) != len(values):
        raise ConfigError(f"duplicate {what} in {[str(v) for v in values]}")


@dataclass(frozen=True)
class FlowSettings(Settings):
    """How to run the flow experiment (implements the runner's experiment protocol).

    >>> FlowSettings(window=9).flows[0]
    Flow.parse('question->last')
    """

    flows: tuple[Flow, ...] = setting(
        PAPER_FLOWS,
        flags=("--flow", "-f"),
        identity="grows",  # a rerun with more flows computes only the new ones
        help="Flow 'SOURCE->TARGET' of group expressions, e.g. 'text:\"red\"->last' (repeatable; docs/routes.md). "
        "Default: the paper's six flows.",
    )
    window: int | None = setting(
        None, flags=("--window", "-k"), minimum=1, help="Layers per window. Default: 7 for 32 layers, 9 for 40."
    )
    window_style: WindowStyle = setting(
        WindowStyle.CENTRED,
        identity="if-set",
        help="Layers each point blocks: centred (the paper's), start, cumulative-up (0..l), "
        "cumulative-down (l..L-1) or inverse (outside the centred window).",
    )
    metric: Metric = setting(
        Metric.FIRST_TOKEN,
        identity="if-set",
        help="first-token (the paper's), sequence (the whole greedy answer, length-normalised, teacher-forced) "
        "or kl (next-token KL divergence).",
    )
    mode: Mode = setting(
        Mode.KNOCKOUT,
        identity=False,  # recorded in the flows (a keep-only flow reads 'keep-only:...')
        help="knockout (block the routes) or keep-only (the targets read only the sources and themselves), "
        "for every flow not marked 'keep-only:' itself.",
    )
    keep_all: bool = _keep_all()
    engine: Engine = setting(Engine.FAST, help="fast (exact, batched) or reference (one forward per window).")
    max_new_tokens: int = _max_new_tokens()
    max_fold_queries: int | None = setting(
        None,
        flags=None,
        config=False,
        identity=False,  # how the work is cut, not what is computed
        minimum=1,
        help="Query rows per folded layer call of the fast engine (memory/speed trade-off); default: the engine's.",
    )
    batch_size: int | None = setting(
        None,
        minimum=1,
        identity=False,  # how the work is cut, not what is computed: every sample's rows are its batch-1 rows
        help="Samples computed together (their clean passes and folded knockouts share each layer call). "
        "Default: 1 on CPU; on CUDA as many as fit the free memory.",
    )
    retry_errors: bool = _retry_errors()

    name = "flows"
    #: Written even when empty.
    tables = ("flows",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.flows:
            raise ConfigError("no flows given; pass at least one flow such as 'image->last'")
        if self.mode is Mode.KEEP_ONLY and not all(f.keep_only for f in self.flows):
            object.__setattr__(self, "flows", tuple(f.with_mode(True) for f in self.flows))
        _check_distinct("flows", self.flows)

    def window_for(self, n_layers: int) -> int:
        """The window size for a model of ``n_layers`` (the paper's rule unless ``window`` is set)."""
        return self.window if self.window is not None else default_window(n_layers)

    def check_depth(self, n_layers: int) -> None:
        """Refuse a window or a flow's fixed layer range that does not fit ``n_layers``, naming the valid range."""
        from vlmflow.experiments.windows import check_layer_range, check_window

        check_window(self.window_style, self.window_for(n_layers), n_layers)
        for flow in self.flows:
            if flow.layers is not None:
                check_layer_range(flow.layers, n_layers, f"flow {flow}: layer range")

    def check_model(self, loaded: LoadedModel) -> None:
        """Before any sample: refuse settings the loaded model cannot run (see :meth:`check_depth`)."""
        self.check_depth(loaded.n_layers)

    def with_flows(self, flows: tuple[Flow, ...]) -> FlowSettings:
        """The same settings for ``flows`` only (a rerun computing the flows a sample lacks)."""
        return replace(self, flows=flows, mode=Mode.KNOCKOUT)

    def analyse(self, loaded: LoadedModel, prepared: PreparedSample) -> Tables:
        """Tables for one sample: its ``samples`` row and its ``flows`` rows."""
        from vlmflow.experiments.flows import flow_tables

        return flow_tables(loaded, prepared, self)

    def analyse_batch(self, loaded: LoadedModel, prepared: Sequence[PreparedSample]) -> list[Tables | SampleError]:
        """Per sample, what :meth:`analyse` gives (or its :class:`SampleError`), computed together."""
        from vlmflow.experiments.batched_flows import flow_tables_batch

        return flow_tables_batch(loaded, prepared, self)


@dataclass(frozen=True)
class ControlSettings(Settings):
    """How to run the size-matched random-patch control (implements the runner's experiment protocol).

    It holds the :class:`FlowSettings` it shares with the flows run (window, engine, keep-all,
    baseline decoding; pass the flows run's so both describe the same samples and windows); their
    flows become the control flows ``random->TARGET``.

    >>> ControlSettings(draws=3, flow_settings=FlowSettings(window=5)).flow_settings.flows
    (Flow.parse('random->question'),)
    """

    targets: tuple[Group, ...] = setting(
        (Group.QUESTION,),
        identity=False,  # recorded as the control flows
        help="Target groups; the control flow is random->TARGET (the paper's related flow targets the question).",
    )
    draws: int = setting(
        5,
        minimum=1,
        config="random_draws",
        help="Random draws per sample (each a different size-matched set of non-related patches).",
    )
    flow_settings: FlowSettings = setting(
        FlowSettings(),
        flags=None,
        config=False,
        keyword=False,
        identity="inline",
        help="Window, engine, keep-all and baseline decoding, as in the flows run.",
    )

    name = "controls"
    tables = ("controls",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.targets:
            raise ConfigError("the random-patch control needs at least one target group")
        _check_distinct("control targets", self.targets)
        object.__setattr__(self, "flow_settings", replace(self.flow_settings, flows=self.flows))

    @property
    def flows(self) -> tuple[Flow, ...]:
        """The control flows, ``random->TARGET`` per target."""
        return tuple(Flow(Group.RANDOM, target) for target in self.targets)

    @property
    def engine(self) -> Engine:
        return self.flow_settings.engine

    @property
    def batch_size(self) -> int | None:
        """Samples computed together (the flow settings' :attr:`FlowSettings.batch_size`)."""
        return self.flow_settings.batch_size

    def analyse_batch(self, loaded: LoadedModel, prepared: Sequence[PreparedSample]) -> list[Tables | SampleError]:
        """Per sample, what :meth:`analyse` gives (or its :class:`SampleError`), computed together."""
        from vlmflow.experiments.batched_flows import control_tables_batch

        return control_tables_batch(loaded, prepared, self)

    @property
    def retry_errors(self) -> bool:
        return self.flow_settings.retry_errors

    def check_model(self, loaded: LoadedModel) -> None:
        """Before any sample: refuse a window the loaded model cannot run."""
        self.flow_settings.check_depth(loaded.n_layers)

    def analyse(self, loaded: LoadedModel, prepared: PreparedSample) -> Tables:
        """Tables for one sample: its ``samples`` row and, when kept, ``controls`` rows for every draw."""
        from vlmflow.experiments.controls import control_tables

        return control_tables(loaded, prepared, self)


@dataclass(frozen=True)
class AttentionSettings(Settings):
    """Which group-to-group attention masses to record (one per layer, target and source group).

    Groups may overlap (``related`` lies inside ``image``).

    >>> AttentionSettings().identity()["targets"]
    ['image', 'question', 'last']
    """

    targets: tuple[Group, ...] = setting(
        DEFAULT_TARGETS,
        flags=("--attention-target",),
        help="Query group of the attention summaries (repeatable). Default: image, question, last.",
    )
    sources: tuple[Group, ...] = setting(
        DEFAULT_SOURCES,
        flags=("--attention-source",),
        help="Key group of the attention summaries (repeatable). Default: system, image, related, other, question, suffix, last.",
    )
    max_chunk_queries: int = setting(
        256,
        flags=None,
        config=False,
        identity=False,  # does not change results
        minimum=1,
        help="Query rows recomputed per layer call; bounds the [head, chunk, seq] probabilities held at once.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.targets or not self.sources:
            raise ConfigError("attention summaries need at least one target and one source group")
        _check_distinct("targets", self.targets)
        _check_distinct("sources", self.sources)


@dataclass(frozen=True)
class LensSettings(Settings):
    """How to run the lens experiment (implements the runner's experiment protocol).

    ``skip_blank`` (the flag ``--literal-first-piece`` negated): skip a leading whitespace-only piece
    when taking a word's first sub-token (see :func:`~vlmflow.experiments.answer_tokens.first_subtoken`);
    ``False`` is the paper's literal ``encode(word)[0]``. The last position is always read, as
    group ``last``.

    >>> LensSettings(groups=(Group.QUESTION,)).identity()["groups"]
    ['question']
    """

    readouts: tuple[Readout, ...] = setting(
        (Readout.RAW, Readout.NORMED),
        flags=("--readout", "-r"),
        help="raw (the paper's: no final norm below the top layer) or normed (repeatable). Default: both.",
    )
    top_k: int = setting(10, minimum=1, help="Top tokens kept per position and layer.")
    groups: tuple[Group, ...] = setting(
        (), flags=("--group", "-g"), help="Also read every position of this group, e.g. question (repeatable)."
    )
    keep_all: bool = _keep_all()
    max_new_tokens: int = _max_new_tokens()
    skip_blank: bool = setting(
        True,
        key="literal_first_piece",
        invert=True,
        help="Track encode(word)[0] even when it is a bare word-boundary piece such as '▁'.",
    )
    attention: AttentionSettings | None = setting(
        None, flags=("--attention/--no-attention",), help="Also record group-to-group attention mass per layer."
    )
    retry_errors: bool = _retry_errors()

    name = "lens"
    tables = ("lens", "lens_top")
    #: The engine of the runner's start-up self-test (the lens knocks nothing out itself).
    engine = Engine.FAST

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.readouts:
            raise ConfigError(f"no readout given; valid: {', '.join(r.value for r in Readout)}")
        _check_distinct("readouts", self.readouts)
        _check_distinct("groups", self.groups)

    def positions(self, prepared: PreparedSample) -> dict[str, tuple[int, ...]]:
        """Positions read, by group label: ``last``, then each requested group this sample has.

        A requested group the sample lacks (e.g. ``related`` without boxes) is skipped and logged.
        """
        groups = prepared.groups
        out = {Group.LAST.value: groups[Group.LAST]}
        for group in self.groups:
            if group in groups:
                out[group.value] = groups[group]
            else:
                log.info("sample %s has no %s positions; lens skips them", prepared.sample.sample_id, group.value)
        return out

    def capture_from(self, prepared: PreparedSample) -> int:
        """First position whose hidden states the clean run must keep for this experiment."""
        from vlmflow.experiments.attention import attention_capture_from

        start = min(min(p) for p in self.positions(prepared).values() if p)
        if self.attention is not None:
            start = min(start, attention_capture_from(prepared.groups, self.attention))
        return start

    def analyse(self, loaded: LoadedModel, prepared: PreparedSample) -> Tables:
        """Tables for one sample: ``samples``, and for kept samples ``lens``, ``lens_top``
        (and ``attention``)."""
        from vlmflow.experiments.lens import lens_sample_tables

        return lens_sample_tables(loaded, prepared, self)
