"""The size-matched random-patch control for "related vs other image patches" (not in the paper).

The paper's Related↛Question and Other↛Question flows block very different numbers of image tokens
(related patches are 5-26% of the image on GQA), so "related drops more in the middle layers" could
be a matter of which tokens, or only of how many. The control blocks, from the same target group,
as many image patches as the related group has, drawn at random from the non-related patches
(:attr:`Group.RANDOM`, seeded by the sample id and the draw index), several draws per sample.

Per sample the clean forward runs once; every draw's knockouts then go through the same engine as
the flows (:func:`~vlmflow.experiments.flows.knockout_rows`). Rows are ``flows`` rows plus the
``draw`` index, in the ``controls`` table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmflow.errors import ConfigError
from vlmflow.experiments.flows import (
    ENGINES,
    Engine,
    FlowSettings,
    baseline,
    clean_capture_start,
    knockout_plan,
    knockout_rows,
)
from vlmflow.experiments.prepare import PreparedSample
from vlmflow.knockout.fast import DEFAULT_FOLD_QUERIES
from vlmflow.loading import LoadedModel
from vlmflow.positions.build import build_position_groups
from vlmflow.positions.groups import Flow, Group
from vlmflow.results.tables import ControlRow, Row


@dataclass(frozen=True)
class ControlSettings:
    """How to run the random-patch control (implements the runner's experiment protocol).

    Attributes:
        targets: target groups; the control flow is ``random->TARGET`` (the paper's related flow
            targets the question).
        draws: random draws per sample (each a different size-matched set of non-related patches).
        window, keep_all, engine, max_new_tokens, max_fold_queries: as :class:`FlowSettings`; use
            the flows run's values so both describe the same samples and windows.

    >>> ControlSettings(draws=3).flows
    (Flow(source=<Group.RANDOM: 'random'>, target=<Group.QUESTION: 'question'>),)
    """

    targets: tuple[Group, ...] = (Group.QUESTION,)
    draws: int = 5
    window: int | None = None
    keep_all: bool = False
    engine: Engine = "fast"
    max_new_tokens: int = 12
    max_fold_queries: int = DEFAULT_FOLD_QUERIES

    name = "controls"

    def __post_init__(self) -> None:
        if self.draws < 1:
            raise ConfigError(f"the random-patch control needs at least 1 draw, got {self.draws}")
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"control targets must be distinct and non-empty, got {[t.value for t in self.targets]}")
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}; valid: {', '.join(ENGINES)}")

    @property
    def flows(self) -> tuple[Flow, ...]:
        return tuple(Flow(Group.RANDOM, target) for target in self.targets)

    def flow_settings(self) -> FlowSettings:
        """The flows settings this control shares (window, engine, keep-all, baseline decoding)."""
        return FlowSettings(
            flows=self.flows,
            window=self.window,
            keep_all=self.keep_all,
            engine=self.engine,
            max_new_tokens=self.max_new_tokens,
            max_fold_queries=self.max_fold_queries,
        )

    def identity(self) -> dict[str, Any]:
        """JSON-able settings that define the run."""
        return {
            "flows": [str(f) for f in self.flows],
            "draws": self.draws,
            "window": self.window,
            "keep_all": self.keep_all,
            "engine": self.engine,
            "max_new_tokens": self.max_new_tokens,
        }

    def analyse(self, loaded: LoadedModel, prepared: PreparedSample) -> dict[str, list[Row]]:
        """Tables for one sample: its ``samples`` row and, when kept, ``controls`` rows for every draw."""
        settings = self.flow_settings()
        k = settings.window_for(loaded.n_layers)
        layout = loaded.adapter.image_layout(loaded.model, loaded.processor, prepared.encoded, loaded.options)
        image_token_id = loaded.adapter.image_token_id(loaded.model)
        plan, draw_of = [], []
        for draw in range(self.draws):
            groups = prepared.groups if draw == 0 else build_position_groups(
                prepared.encoded, image_token_id, layout, prepared.sample, random_draw=draw
            )
            part = knockout_plan(loaded, prepared, groups, self.flows, k)
            plan.extend(part)
            draw_of.extend([draw] * len(part))
        capture_from = clean_capture_start(loaded, prepared, [knockout for _, _, knockout in plan])
        clean, row = baseline(loaded, prepared, settings, capture_from)
        tables: dict[str, list[Row]] = {"samples": [row]}
        if row.kept:
            rows = knockout_rows(loaded, prepared, clean, row, plan, settings)
            tables["controls"] = [ControlRow.of(r, draw=d) for r, d in zip(rows, draw_of, strict=True)]
        return tables

