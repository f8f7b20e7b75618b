"""The size-matched random-patch control for "related vs other image patches" (not in the paper).

The paper's Related↛Question and Other↛Question flows block very different numbers of image tokens
(related patches are 5-26% of the image on GQA), so "related drops more in the middle layers" could
be a matter of which tokens, or only of how many. The control blocks, from the same target group,
as many image patches as the related group has, drawn at random from the non-related patches
(:attr:`Group.RANDOM`, seeded by the sample id and the draw index), several draws per sample.

Per sample the clean forward runs once; every draw's knockouts then go through the same engine as
the flows (:func:`~vlmflow.experiments.flows.knockout_rows`). Rows are ``flows`` rows plus the
``draw`` index, in the ``controls`` table. The settings are
:class:`~vlmflow.experiments.settings.ControlSettings`.
"""

from __future__ import annotations

from vlmflow.errors import SampleError
from vlmflow.experiments.flows import Point, baseline, clean_capture_start, knockout_plan, knockout_rows
from vlmflow.experiments.prepare import PreparedSample
from vlmflow.experiments.settings import ControlSettings
from vlmflow.loading import LoadedModel
from vlmflow.positions.build import build_position_groups
from vlmflow.results.tables import ControlRow, Row


def control_plan(loaded: LoadedModel, prepared: PreparedSample, control: ControlSettings) -> tuple[list[Point], list[int]]:
    """Every draw's knockout points, and the draw index of each.

    Raises:
        SampleError: a control flow's group is missing for this sample (or blocks nothing): the
            control needs every draw, so a missing group fails the sample.
    """
    settings = control.flow_settings
    blocks = loaded.inputs.visual_blocks(prepared.encoded)
    plan, draw_of = [], []
    for draw in range(control.draws):
        groups = prepared.groups if draw == 0 else build_position_groups(
            prepared.encoded, blocks, prepared.sample, random_draw=draw
        )
        part, errors = knockout_plan(loaded, prepared, groups, control.flows, settings)
        if errors:
            raise SampleError(errors[0].reason, stage=errors[0].stage)
        plan.extend(part)
        draw_of.extend([draw] * len(part))
    return plan, draw_of


def control_tables(loaded: LoadedModel, prepared: PreparedSample, control: ControlSettings) -> dict[str, list[Row]]:
    """Tables for one sample (:meth:`ControlSettings.analyse`): its ``samples`` row and, when kept,
    ``controls`` rows for every draw."""
    settings = control.flow_settings
    plan, draw_of = control_plan(loaded, prepared, control)
    capture_from = clean_capture_start(loaded, prepared.encoded, [p.knockout for p in plan])
    clean, row = baseline(loaded, prepared, settings, capture_from)
    tables: dict[str, list[Row]] = {"samples": [row]}
    if row.kept:
        rows = knockout_rows(loaded, prepared, clean, row, plan, settings)
        tables["controls"] = [ControlRow.of(r, draw=d) for r, d in zip(rows, draw_of, strict=True)]
    return tables
