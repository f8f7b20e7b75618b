"""Synthetic scenes: deterministic, exact boxes, one object per grid cell, answers right and balanced."""

from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest

from vlmflow.data.csvio import LAYOUTS, read_task_csv
from vlmflow.data.sample import TaskType
from vlmflow.data.scene_questions import ANSWERS, scene_question
from vlmflow.data.scene_sets import task_questions, write_scene_set
from vlmflow.data.scenes import BACKGROUND, COLORS, SHAPES, Scene, SceneShape, random_scene

TASKS = list(TaskType)


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_and_index_give_the_same_question_and_pixels(task):
    a, b = scene_question(task, 5, 17), scene_question(task, 5, 17)
    assert a.sample == b.sample and dict(a.sample.extra) == dict(b.sample.extra)
    assert a.scene.render().tobytes() == b.scene.render().tobytes()
    others = {scene_question(task, 6, 17).scene.render().tobytes(), scene_question(task, 5, 18).scene.render().tobytes()}
    assert a.scene.render().tobytes() not in others


def test_questions_do_not_depend_on_how_many_were_generated():
    assert task_questions(TaskType.CHOOSE_REL, 3, seed=1)[2].sample == task_questions(TaskType.CHOOSE_REL, 10, seed=1)[2].sample


def _drawn_extent(pixels: np.ndarray, x0: int, y0: int, size: int) -> tuple[int, int, int, int] | None:
    """(x, y, w, h) of the non-background pixels in the size x size block at (x0, y0)."""
    block = pixels[y0 : y0 + size, x0 : x0 + size]
    ys, xs = np.nonzero((block != np.array(BACKGROUND)).any(axis=-1))
    if len(xs) == 0:
        return None
    return (x0 + int(xs.min()), y0 + int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))


@pytest.mark.parametrize("seed", range(40))
def test_boxes_are_the_drawn_pixels_and_each_object_fills_one_cell(seed):
    rng = random.Random(seed)
    scene = random_scene(rng, rng.randint(1, len(SHAPES)))
    pixels = np.asarray(scene.render())
    cell = scene.cell
    occupied = set()
    for obj in scene.objects:
        box = scene.box(obj)
        assert (box.x, box.y, box.w, box.h) == _drawn_extent(pixels, obj.col * cell, obj.row * cell, cell)
        # the box lies strictly inside the object's cell, so it overlaps exactly one vision patch
        assert obj.col * cell < box.x and box.x1 < (obj.col + 1) * cell
        assert obj.row * cell < box.y and box.y1 < (obj.row + 1) * cell
        # drawn in the object's colour only
        inside = pixels[box.y : box.y1, box.x : box.x1].reshape(-1, 3)
        assert {tuple(p) for p in inside} <= {BACKGROUND, COLORS[obj.color]}
        occupied.add((obj.row, obj.col))
    for row in range(scene.grid):
        for col in range(scene.grid):
            if (row, col) not in occupied:
                assert _drawn_extent(pixels, col * cell, row * cell, cell) is None


def test_scene_rejects_ambiguous_or_overflowing_objects():
    star = SceneShape("star", "red", "large", 0, 0, 12, 2, 2, "0")
    with pytest.raises(ValueError, match="distinct"):
        Scene((star, SceneShape("star", "blue", "small", 1, 1, 8, 2, 2, "1")))
    with pytest.raises(ValueError, match="cells"):
        Scene((star, SceneShape("circle", "blue", "small", 0, 0, 8, 2, 2, "1")))
    with pytest.raises(ValueError, match="margin"):
        Scene((SceneShape("star", "red", "large", 0, 0, 13, 3, 1, "0"),))
    with pytest.raises(ValueError, match="unknown color"):
        SceneShape("star", "purple", "large", 0, 0, 12, 2, 2)


def _oracle(question) -> str:
    """The answer recomputed from the scene and the question text alone."""
    scene, text = question.scene, question.sample.question

    def obj(name):
        return scene.find(name)

    if m := re.fullmatch(r"Is the (\w+) (\w+) or (\w+)\?", text):
        target = obj(m[1])
        values = {m[2], m[3]}
        (answer,) = values & {target.color, target.size}
        return answer
    if m := re.fullmatch(r"Which shape is (\w+), the (\w+) or the (\w+)\?", text):
        assert len(scene.with_color(m[1])) == 1
        (answer,) = [s for s in (m[2], m[3]) if obj(s) is not None and obj(s).color == m[1]]
        return answer
    if m := re.fullmatch(r"Is the (\w+) to the (left|right) or to the (left|right) of the (\w+)\?", text):
        subject, reference = obj(m[1]), obj(m[4])
        assert subject.col != reference.col
        return "left" if subject.col < reference.col else "right"
    if m := re.fullmatch(r"What do the (\w+) and the (\w+) have in common\?", text):
        a, b = obj(m[1]), obj(m[2])
        common = [k for k in ("color", "size") if getattr(a, k) == getattr(b, k)]
        assert len(common) == 1
        return common[0]
    if m := re.fullmatch(r"Do the (\w+) and the (\w+) have the same color\?", text):
        return "yes" if obj(m[1]).color == obj(m[2]).color else "no"
    if m := re.fullmatch(r"Is there a (\w+) or a (\w+) that is (\w+)\?", text):
        return "yes" if any(obj(s) is not None and obj(s).color == m[3] for s in (m[1], m[2])) else "no"
    if m := re.fullmatch(r"On which side of the image is the (\w+)\?", text):
        return scene.horizontal_side(obj(m[1]))
    if m := re.fullmatch(r"What color is the (\w+)\?", text):
        return obj(m[1]).color
    raise AssertionError(f"unexpected question {text!r}")


@pytest.mark.parametrize("task", TASKS)
def test_answers_follow_from_the_scene_and_are_balanced(task):
    questions = task_questions(task, 600, seed=11)
    counts = Counter()
    for q in questions:
        assert _oracle(q) == q.sample.answer, q.sample.question
        if task.is_choose:
            assert q.sample.true_option == q.sample.answer
            assert q.sample.false_option != q.sample.answer
            assert {q.sample.true_option, q.sample.false_option} <= set(re.findall(r"\w+", q.sample.question))
        counts[q.sample.answer] += 1
    assert set(counts) == set(ANSWERS[task])
    # Binary answers split evenly; the largest class of any task is at most ~1/3 of its questions.
    if len(counts) == 2:
        assert min(counts.values()) >= 0.42 * len(questions)
    assert max(counts.values()) <= 0.37 * len(questions) or len(counts) == 2


@pytest.mark.parametrize("task", TASKS)
def test_objects_and_boxes_are_the_ones_the_question_is_about(task):
    for q in task_questions(task, 50, seed=2):
        sample = q.sample
        assert sample.objects and sample.objects[0].box is not None
        for scene_object in sample.objects:
            if scene_object.box is None:  # LogicalObj: a named shape that is not in the scene
                assert task is TaskType.LOGICAL_OBJ and q.scene.find(scene_object.name) is None
                assert sample.answer in ("yes", "no")
                continue
            match = [o for o in q.scene.objects if q.scene.box(o) == scene_object.box]
            assert len(match) == 1
            if scene_object.name != "shape":
                assert match[0].shape == scene_object.name and scene_object.name in sample.question


def test_scene_set_round_trips_through_the_task_csv_reader(tmp_path):
    files = write_scene_set(tmp_path, n_per_task=5, seed=3)
    assert set(files) == set(TaskType)
    for task, path in files.items():
        header = path.read_text().splitlines()[0].split(",")
        assert tuple(header) == LAYOUTS[task]
        result = read_task_csv(path)
        assert result.task is task and result.errors == []
        expected = task_questions(task, 5, seed=3)
        assert result.samples == [q.sample for q in expected]
        for read, q in zip(result.samples, expected, strict=True):
            assert dict(read.extra) == {k: v for k, v in q.sample.extra.items() if k in read.extra}
            assert read.extra["type_structural"] and read.extra["operations"].startswith("[{'operation'")
            assert (tmp_path / f"{read.image_id}.png").is_file()
    # every question id is unique over the six files, like the released files' ids
    ids = [s.sample_id for p in files.values() for s in read_task_csv(p).samples]
    assert len(ids) == len(set(ids))
