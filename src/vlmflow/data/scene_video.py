"""Synthetic videos: one shape moves left or right between frames, the others stay; exact boxes per frame.

Each video is a few frames of a :class:`~vlmflow.data.scenes.Scene` (64 x 64, a 4 x 4 grid of cells):
the *mover* keeps its row, colour, size and place inside its cell while its column walks from a
start column to an end column (evenly, in whole cells); one or two other shapes stand still in
other rows. The question is "Did the circle move to the left or to the right?" (the mover's shape
named), answered ``left`` or ``right``, balanced by drawing the answer first.

A video question is written like the released GQA files' ChooseRel rows (a choice between two
relations, ``true option`` / ``false option``): ``object1`` is the mover in the first frame and
``object2`` the mover in the last (``object1 image`` = 0, ``object2 image`` = the last frame's
index), and ``frames`` names the folder that holds the frames (``frame_000.png`` ...).

Everything is a pure function of ``(seed, index, n_frames)``.

>>> q = video_question(seed=0, index=3, n_frames=4)
>>> len(q.frames), q.sample.answer in ("left", "right"), q.sample.objects[1].image
(4, True, 3)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from vlmflow.data.csvio import write_task_csv
from vlmflow.data.sample import Sample, SceneObject, TaskType
from vlmflow.data.scenes import COLORS, SHAPES, SIZES, Scene, place

#: File prefix of a written video set (its CSV is ``scenes_video_ChooseRel.csv``).
VIDEO_CSV = "scenes_video_ChooseRel.csv"
#: Frames per second recorded for the written frames.
VIDEO_FPS = 2.0


@dataclass(frozen=True)
class VideoQuestion:
    """A video (one scene per frame) and its question."""

    sample: Sample
    frames: tuple[Scene, ...]


def mover_columns(start: int, end: int, n_frames: int) -> list[int]:
    """The mover's column in each frame: from ``start`` to ``end`` in even steps, rounded to cells.

    >>> mover_columns(0, 3, 4), mover_columns(3, 1, 2)
    ([0, 1, 2, 3], [3, 1])
    """
    if n_frames == 1:
        return [start]
    return [round(start + (end - start) * k / (n_frames - 1)) for k in range(n_frames)]


def video_question(seed: int, index: int, n_frames: int = 4, *, grid: int = 4, image_size: int = 64) -> VideoQuestion:
    """The ``index``-th video question of ``seed``: ``n_frames`` frames, one shape moving left or right.

    Raises:
        ValueError: fewer than 2 frames.
    """
    if n_frames < 2:
        raise ValueError(f"a moving shape needs at least 2 frames, got {n_frames}")
    rng = random.Random(f"video/{seed}/{index}")
    answer = rng.choice(("left", "right"))
    start, end = sorted(rng.sample(range(grid), 2))
    if answer == "left":
        start, end = end, start
    row = rng.randrange(grid)
    shape = rng.choice(SHAPES)
    mover = place(rng, shape, rng.choice(list(COLORS)), rng.choice(list(SIZES)), row, start, image_size // grid)
    # The still shapes: other shapes in cells of other rows, the same in every frame.
    free = [s for s in SHAPES if s != shape]
    rng.shuffle(free)
    cells = [(r, c) for r in range(grid) for c in range(grid) if r != row]
    others = [
        replace(place(rng, free[k], rng.choice(list(COLORS)), rng.choice(list(SIZES)), r, c, image_size // grid), object_id=str(k + 1))
        for k, (r, c) in enumerate(rng.sample(cells, rng.randint(1, 2)))
    ]
    frames = []
    for col in mover_columns(start, end, n_frames):
        moved = replace(mover, col=col, object_id="0")
        frames.append(Scene((moved, *others), image_size, grid))
    first, last = frames[0], frames[-1]
    objects = (
        SceneObject(shape, "0", first.box(first.objects[0]), image=0),
        SceneObject(shape, "0", last.box(last.objects[0]), image=n_frames - 1),
    )
    sample = Sample(
        sample_id=f"v{seed}-{index:05d}",
        image_id=f"v{seed}-{index:05d}",
        question=f"Did the {shape} move to the left or to the right?",
        answer=answer,
        task=TaskType.CHOOSE_REL,
        true_option=answer,
        false_option="right" if answer == "left" else "left",
        objects=objects,
        image_size=(image_size, image_size),
        frames=f"v{seed}-{index:05d}",
        fps=VIDEO_FPS,
        extra={"type_detailed": "moveChoose", "type_semantic": "rel", "type_structural": "choose"},
    )
    return VideoQuestion(sample=sample, frames=tuple(frames))


def write_video_set(out: str | Path, n: int, seed: int = 0, n_frames: int = 4) -> Path:
    """Write ``n`` video questions into ``out``: one frame folder each and ``scenes_video_ChooseRel.csv``.

    Raises:
        ValueError: ``n`` below 1 or fewer than 2 frames.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = write_video_set(d, 2, n_frames=2)
    ...     path.name, sorted(p.name for p in (path.parent / "v0-00000").iterdir())
    ('scenes_video_ChooseRel.csv', ['frame_000.png', 'frame_001.png'])
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out)
    questions = [video_question(seed, index, n_frames) for index in range(n)]
    for question in questions:
        write_frames(question.frames, out / str(question.sample.frames))
    path = out / VIDEO_CSV
    write_task_csv([q.sample for q in questions], path)
    return path


def write_frames(frames: Sequence[Scene], folder: Path) -> None:
    """Render the frames into ``folder`` as ``frame_000.png``, ``frame_001.png``, ... (file-name order = time)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, scene in enumerate(frames):
        scene.render().save(folder / f"frame_{k:03d}.png")
