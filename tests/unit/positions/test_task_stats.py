from __future__ import annotations

import pytest

from vlmflow.data.csvio import ReadResult, RowError
from vlmflow.data.sample import Box, Sample, SceneObject, TaskType
from vlmflow.positions.task_stats import task_stats


def _sample(qid: str, size: tuple[int, int], *boxes: Box | None) -> Sample:
    objects = tuple(SceneObject(f"o{k}", None if b is None else str(k), b) for k, b in enumerate(boxes))
    return Sample(qid, "img", "Q?", "yes", task=TaskType.LOGICAL_OBJ, objects=objects, image_size=size)


def test_stats_on_hand_computed_geometry():
    # view 42 px, patch 14: 3x3 tokens. A 42x14 image padded to 42x42 sits exactly in patch row 1,
    # so rows 0 and 2 (6 tokens) are padding.
    result = ReadResult(
        samples=[
            _sample("a", (42, 42), Box(0, 0, 14, 14)),  # one patch
            _sample("b", (42, 14), Box(0, 0, 42, 14), None),  # the whole middle row; object2 absent
            _sample("c", (42, 14), Box(50, 0, 5, 5)),  # outside its image: no token
        ],
        errors=[RowError(7, "bad")],
    )
    s = task_stats(result, "toy", mode="pad", view_size=42, patch_size=14)
    assert (s.rows, s.read_errors, s.n_tokens) == (3, 1, 9)
    assert (s.related_median, s.related_mean, s.related_min, s.related_max) == (1.0, pytest.approx(4 / 3), 0, 3)
    assert s.empty_related == 1
    assert s.padding_mean == pytest.approx((0 + 6 + 6) / 3)
    assert s.objects_absent == 1
    squashed = task_stats(result, "toy", mode="resize", view_size=42, patch_size=14)
    assert squashed.padding_mean == 0
    assert squashed.related_max == 9  # the full-image box of "b" covers every token once squashed
