"""Synthetic videos (a shape moving left or right) and the task-CSV columns of several images and videos."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vlmflow.data.csvio import read_task_csv, write_task_csv
from vlmflow.data.sample import Box, Sample, SceneObject, TaskType
from vlmflow.data.scene_video import mover_columns, video_question, write_video_set
from vlmflow.experiments.prepare import open_visuals
from vlmflow.inputs import Visuals


def test_video_questions_are_deterministic_balanced_and_the_mover_really_moves():
    questions = [video_question(seed=1, index=i, n_frames=3) for i in range(60)]
    assert video_question(seed=1, index=7, n_frames=3) == questions[7]
    answers = Counter(q.sample.answer for q in questions)
    assert 20 < answers["left"] < 40
    for q in questions:
        mover = [frame.objects[0] for frame in q.frames]
        assert len({(m.shape, m.row, m.color, m.size) for m in mover}) == 1  # only the column changes
        first, last = q.sample.objects
        assert (last.box.x > first.box.x) == (q.sample.answer == "right")
        assert (first.image, last.image) == (0, 2)
        assert q.sample.question == f"Did the {first.name} move to the left or to the right?"
        others = [frame.objects[1:] for frame in q.frames]
        assert all(o == others[0] for o in others)  # the other shapes stand still
        # The mover's boxes are where its pixels are in the rendered frames.
        rendered = np.asarray(q.frames[-1].render())
        x, y = int(last.box.x), int(last.box.y)
        assert (rendered[y : y + int(last.box.h), x : x + int(last.box.w)] != (245, 245, 245)).any()


def test_mover_columns_step_evenly_from_start_to_end():
    assert mover_columns(3, 0, 4) == [3, 2, 1, 0]
    assert mover_columns(1, 2, 2) == [1, 2]
    with pytest.raises(ValueError, match="at least 2 frames"):
        video_question(0, 0, n_frames=1)


def test_a_written_video_set_reads_back_with_its_frames(tmp_path):
    path = write_video_set(tmp_path, 3, seed=2, n_frames=4)
    result = read_task_csv(path)
    assert result.errors == [] and result.task is TaskType.CHOOSE_REL
    expected = [video_question(2, i, 4).sample for i in range(3)]
    assert [s for s in result.samples] == expected
    visuals = open_visuals(result.samples[0], tmp_path)
    assert isinstance(visuals, Visuals) and len(visuals.video.frames) == 4 and visuals.video.fps == 2.0
    assert visuals.video.frames[0].size == (64, 64)


def test_several_images_and_per_object_image_columns_round_trip(tmp_path):
    sample = Sample(
        "q1", "a", "Is the square red or blue?", "red", task=TaskType.CHOOSE_ATTR, true_option="red", false_option="blue",
        objects=(SceneObject("square", "1", Box(1, 2, 3, 4), image=1),), image_size=(8, 8), images=("a", "b"),
    )
    write_task_csv([sample], tmp_path / "x_ChooseAttr.csv")
    assert read_task_csv(tmp_path / "x_ChooseAttr.csv").samples == [sample]
    for name, color in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        Image.new("RGB", (8, 8) if name == "a" else (6, 10), color).save(tmp_path / f"{name}.png")
    visuals = open_visuals(sample, tmp_path)
    assert [im.size for im in visuals.images] == [(8, 8), (6, 10)]  # only the first image has the recorded size


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [("central object image", "x", "not an image or frame index"), ("fps", "0", "not positive"), ("frames", "clip", "not both")],
)
def test_bad_visual_columns_are_row_errors_naming_the_value(tmp_path, column, value, reason):
    sample = Sample(
        "q1", "a", "What color is it?", "red", task=TaskType.QUERY_ATTR, objects=(SceneObject("it", "1", Box(1, 2, 3, 4)),),
        image_size=(8, 8), images=("a", "b"), extra={"question word": "color"},
    )
    path = tmp_path / "x_QueryAttr.csv"
    write_task_csv([sample], path)
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    if column not in header:
        header.append(column)
        lines = [",".join(header), lines[1] + ","]
    row = lines[1].split(",")
    row[header.index(column)] = value
    path.write_text(lines[0] + "\n" + ",".join(row) + "\n")
    result = read_task_csv(path)
    assert result.samples == [] and reason in result.errors[0].reason
