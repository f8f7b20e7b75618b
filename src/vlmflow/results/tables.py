"""Every result table of a run, declared once: one typed row class per table.

This module is the single place where tables are declared; the store, ``load_run`` and the docs
know every table from here, whichever experiment writes it, without importing that experiment (so
without torch). Each row class is a frozen dataclass whose fields, in order, are the table's
columns; the Arrow schema and the column docs are derived from it (:mod:`vlmflow.results.schema`).

To add a table: declare its row class here (each column with a one-line ``column(doc)``), add its
:class:`~vlmflow.results.schema.TableSpec` to :data:`TABLES`, and regenerate ``docs/results.md``
(:func:`tables_markdown`). The experiment then builds rows of that class and commits them.

>>> row = ErrorRow(sample_id="q1", stage="image", reason="no file")
>>> table = build_table("errors", [row])
>>> table.num_rows, table.column_names
(1, ['sample_id', 'stage', 'reason', 'flow'])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import TYPE_CHECKING

from vlmflow.errors import ConfigError
from vlmflow.positions.routes import Flow
from vlmflow.results.schema import ORIGINAL, Int32, Int64, TableSpec, arrow_table, column

if TYPE_CHECKING:
    import pyarrow as pa

_SAMPLE_ID = "Sample identifier (the dataset's question id)."
_TASK = "Task name of the sample; '' when unknown."


@dataclass(frozen=True, kw_only=True, slots=True)
class SampleRow:
    """A row of ``samples``: one per computed sample, its baseline answer and whether it is kept."""

    sample_id: str = column(_SAMPLE_ID)
    task: str = column(_TASK)
    image_id: str = column("Image identifier (the image file's stem).")
    question: str = column("Question text as given to the model.")
    answer: str = column("Gold answer from the dataset.")
    prediction: str = column("The model's greedy answer, decoded and stripped.")
    correct: bool = column("prediction.lower() == answer.lower() (the paper's exact-match filter).")
    kept: bool = column("The sample enters the analyses: correct, or every sample with keep-all.")
    answer_token_id: Int64 = column("Vocabulary id of the first generated answer token.")
    answer_token: str = column("That token as the tokenizer spells it (e.g. '▁red').")
    p_base: float = column("Probability of the first answer token without knockout (0..1).")
    seq_len: Int32 = column("Length of the language-model input sequence (tokens, image tokens expanded).")
    n_image_tokens: Int32 = column("Number of image-token positions in the sequence.")
    group_sizes: str = column("JSON object: position group name -> number of positions.")


@dataclass(frozen=True, kw_only=True, slots=True)
class ErrorRow:
    """A row of ``errors``: a sample, one flow of a sample, or a data-file line that could not be computed, and why."""

    sample_id: str = column(
        "Sample identifier ('line:N' for a malformed line of the data file, 'task:NAME' for a flow no sample "
        "of task NAME can resolve)."
    )
    stage: str = column("Where it failed: read, image, prepare, groups, route, forward, knockout, ...")
    reason: str = column("Human-readable reason.")
    flow: str = column(
        "The flow that failed for this sample ('' when the whole sample failed); the sample's other flows "
        "were computed.",
        added="",
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class FlowRow:
    """A row of ``flows``: one knockout of one flow in one window of layers, for one kept sample."""

    sample_id: str = column(_SAMPLE_ID)
    task: str = column("Task name of the sample (e.g. 'ChooseAttr'); '' when unknown.")
    flow: Flow = column("Knocked-out flow 'source->target' (targets may not attend to sources).")
    layer: Int32 = column(
        "The sweep point, 0-based; the figure's x axis: the window's centre (centred, inverse styles), its "
        "first layer (start), its last (cumulative-up) or first (cumulative-down); A of a fixed range @A-B."
    )
    layers_blocked: Sequence[Int32] = column(
        "Layers actually knocked out (0-based, ascending); a centred window is clipped at both ends."
    )
    window: Int32 = column(
        "Requested window size k (layers) of the centred, start and inverse styles; 0 for the cumulative "
        "styles (no size); B - A + 1 for a fixed range @A-B."
    )
    p_base: float = column(
        "Without knockout, the probability the metric reads (0..1): first-token and kl: the baseline's "
        "first answer token at the last position, softmax over the full vocabulary; sequence: the "
        "greedy answer's length-normalised probability (geometric mean over its tokens)."
    )
    p_blocked: float = column("The same probability with the knockout applied (0..1).")
    rel_change: float = column(
        "Relative change of that probability in percent: 100 * (p_blocked - p_base) / p_base "
        "(the paper's metric; >= -100, unbounded above)."
    )
    logprob_diff: float = column("log(p_blocked) - log(p_base), natural log (nats).")
    answer_changed: bool = column(
        "True when the greedy token under knockout differs from the baseline token (sequence: at any "
        "token of the teacher-forced answer)."
    )
    answer_token_id: Int64 = column("Vocabulary id of the baseline's first answer token.")
    blocked_token_id: Int64 = column("Vocabulary id of the greedy (argmax) token under knockout at the last position.")
    n_source: Int32 = column("Number of source positions of the flow for this sample (its routes' together).")
    n_target: Int32 = column("Number of target positions of the flow for this sample (its routes' together).")
    engine: str = column("Knockout engine that computed the row: 'fast' or 'reference'.")
    metric: str = column(
        "The run's metric: 'first-token' (the paper's), 'sequence' or 'kl' (its effect is in column kl).",
        added="first-token",
    )
    window_style: str = column(
        "How the point's layers were chosen: centred (the paper's), start, cumulative-up, cumulative-down, "
        "inverse, or fixed (a flow's @A-B range).",
        added="centred",
    )
    kl: float = column(
        "KL divergence of the next-token distribution at the last position, clean || knocked out (nats).",
        added=float("nan"),
    )
    n_answer_tokens: Int32 = column("Answer tokens the metric reads (sequence: the greedy answer's; else 1).", added=1)


@dataclass(frozen=True, kw_only=True, slots=True)
class ControlRow(FlowRow):
    """A row of ``controls``: a ``flows`` row of the random-patch control, plus its draw."""

    draw: Int32 = column("Index of the random draw of size-matched non-related patches (0-based).")

    @classmethod
    def of(cls, row: FlowRow, draw: int) -> ControlRow:
        """The control row of flows row ``row`` computed on random draw ``draw``.

        >>> flows_row = FlowRow(
        ...     sample_id="q1", task="", flow=Flow.parse("random->question"), layer=0, layers_blocked=[0, 1],
        ...     window=3, p_base=0.5, p_blocked=0.25, rel_change=-50.0, logprob_diff=-0.69, answer_changed=False,
        ...     answer_token_id=7, blocked_token_id=7, n_source=4, n_target=5, engine="fast",
        ... )
        >>> ControlRow.of(flows_row, draw=2).draw
        2
        """
        return cls(**{f.name: getattr(row, f.name) for f in fields(FlowRow)}, draw=draw)


@dataclass(frozen=True, kw_only=True, slots=True)
class LensPlace:
    """Where a lens readout was taken: the columns ``lens`` and ``lens_top`` begin with."""

    sample_id: str = column(_SAMPLE_ID)
    task: str = column(_TASK)
    readout: str = column(
        "'raw' (the paper's: no final norm below the last layer) or 'normed' (final norm at every layer)."
    )
    group: str = column(
        "Position group read: 'last' (the final prompt position) or a requested group such as 'question'."
    )
    position: Int32 = column("0-based position in the language-model sequence.")
    layer: Int32 = column(
        "Layer boundary j = 0..L: 0 = embedding output, j = output of decoder layer j-1 (0-based), "
        "L = last layer's output."
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class LensRow(LensPlace):
    """A row of ``lens``: probability and rank of one tracked token at one place."""

    form: str = column(
        "Tracked form: answer, answer_capitalized, false_option, false_option_capitalized or generated."
    )
    final_norm: bool = column(
        "True when the final norm was applied before unembedding (normed: always; raw: only at j = L)."
    )
    word: str = column("The word whose first sub-token is tracked (e.g. 'Red').")
    token_id: Int64 = column("Vocabulary id of the tracked first sub-token.")
    token: str = column("That token as the tokenizer spells it (e.g. '▁Red').")
    prob: float = column("Its probability, softmax over the full vocabulary (0..1).")
    log_prob: float = column("Natural log of prob.")
    rank: Int32 = column("1 + number of tokens with a strictly larger logit (1 = top-1).")


@dataclass(frozen=True, kw_only=True, slots=True)
class LensTopRow(LensPlace):
    """A row of ``lens_top``: the top-k tokens of the readout at one place."""

    final_norm: bool = column("True when the final norm was applied before unembedding.")
    input_token: str = column("The input token at this position (e.g. '▁square', '<image>').")
    top_token_ids: Sequence[Int64] = column("Ids of the top-k tokens, most probable first.")
    top_tokens: Sequence[str] = column("The top-k tokens as the tokenizer spells them.")
    top_probs: Sequence[float] = column("Their probabilities (0..1).")
    entropy: float = column("Entropy of the readout distribution (nats).")


@dataclass(frozen=True, kw_only=True, slots=True)
class AttentionRow:
    """A row of ``attention``: attention mass from one target group to one source group in one layer."""

    sample_id: str = column(_SAMPLE_ID)
    task: str = column(_TASK)
    layer: Int32 = column("Decoder layer, 0-based.")
    target: str = column("Query group (the positions that attend).")
    source: str = column("Key group (the positions attended to).")
    mass: float = column(
        "Attention probability the target's queries put on the source's keys: summed over the keys, "
        "averaged over the target's queries, then over heads (0..1)."
    )
    mass_per_head: Sequence[float] = column("The same before averaging over heads, one value per head.")
    n_target: Int32 = column("Number of target positions.")
    n_source: Int32 = column("Number of source positions.")


#: Every result table, by name (the order of ``docs/results.md``); read-only.
TABLES: Mapping[str, TableSpec] = MappingProxyType({
    spec.name: spec
    for spec in (
        TableSpec("samples", SampleRow, ("sample_id",), core=True),
        TableSpec("errors", ErrorRow, ("sample_id", "flow"), core=True),
        TableSpec("flows", FlowRow, ("sample_id", "flow", "layer")),
        TableSpec("controls", ControlRow, ("sample_id", "flow", "draw", "layer")),
        TableSpec("lens", LensRow, ("sample_id", "readout", "group", "position", "layer", "form")),
        TableSpec("lens_top", LensTopRow, ("sample_id", "readout", "group", "position", "layer")),
        TableSpec("attention", AttentionRow, ("sample_id", "layer", "target", "source")),
    )
})

#: Any row of a result table.
Row = SampleRow | ErrorRow | FlowRow | ControlRow | LensRow | LensTopRow | AttentionRow


def table_spec(name: str) -> TableSpec:
    """The :class:`TableSpec` of table ``name``; :class:`ConfigError` listing the valid ones.

    >>> table_spec("samples").key
    ('sample_id',)
    """
    try:
        return TABLES[name]
    except KeyError:
        raise ConfigError(f"unknown result table {name!r}; tables: {', '.join(TABLES)}") from None


def build_table(name: str, rows: Sequence[Row]) -> pa.Table:
    """The pyarrow Table of table ``name`` from its typed rows (strictly checked, see
    :func:`~vlmflow.results.schema.arrow_table`).

    >>> build_table("errors", [ErrorRow(sample_id="q1", stage="image", reason=None)])
    Traceback (most recent call last):
    ...
    vlmflow.results.schema.RowError: table 'errors', row 0 (sample_id 'q1'): column 'reason' (string): is None (columns are not nullable)
    """
    return arrow_table(table_spec(name), rows)


def empty_table(name: str) -> pa.Table:
    """A zero-row table with the schema of table ``name``.

    >>> empty_table("flows").num_rows
    0
    """
    return table_spec(name).schema.empty_table()


def flows_of(values: Iterable[str]) -> dict[str, Flow]:
    """The :class:`~vlmflow.positions.groups.Flow` of each distinct value of a ``flow`` column.

    The one place where the column is read back into flows (it stores ``str(flow)``); each distinct
    value is parsed once.

    >>> flows_of(["image->last", "image->last", "related->question"])["related->question"].target
    <Group.QUESTION: 'question'>
    """
    return {value: Flow.parse(value) for value in dict.fromkeys(values)}


def tables_markdown() -> str:
    """The reference of every table and column, as ``docs/results.md`` holds it (generated from here).

    >>> tables_markdown().splitlines()[0]
    '# Result tables'
    """
    lines = [
        "# Result tables",
        "",
        "<!-- Generated from vlmflow.results.tables by tables_markdown(); do not edit by hand. -->",
        "",
        "Each table of a run directory is a Parquet file `<table>.parquet` (and batches under `parts/`",
        "while a run is being written). Every column is non-nullable; its description below is also",
        "stored in the Parquet schema metadata (`doc`). The key columns identify a row: a run never",
        "holds two rows with the same key. A column added after runs were written says what those runs'",
        "rows read back with. `errors` shows the current errors: a sample or flow computed by a later",
        "rerun (`--retry-errors`) no longer shows its old error.",
    ]
    for spec in TABLES.values():
        lines += ["", f"## `{spec.name}`", "", spec.row.__doc__.strip().splitlines()[0], ""]
        lines += [f"Row class: `{spec.row.__name__}`. Key: {', '.join(f'`{k}`' for k in spec.key)}.", ""]
        lines += ["| column | type | description |", "| --- | --- | --- |"]
        for c in spec.columns:
            doc = c.doc + ("" if c.added is ORIGINAL else f" (Added later: older runs read `{c.added!r}`.)")
            lines.append(f"| `{c.name}` | `{str(c.type).replace('item: ', '')}` | {doc.replace('|', '&#124;')} |")
    return "\n".join(lines) + "\n"

