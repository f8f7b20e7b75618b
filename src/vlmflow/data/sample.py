"""The typed sample every dataset reader produces and every experiment consumes.

A :class:`Sample` is one visual question with its gold answer, its answer options (choose tasks),
and the scene objects the question is about, each with a bounding box in original image pixels
(GQA convention: top-left corner plus width and height). Nothing here touches a model.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from vlmflow.errors import SampleError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class TaskType(StrEnum):
    """The six GQA task types of the paper (values are the names used in the released files)."""

    CHOOSE_ATTR = "ChooseAttr"
    CHOOSE_CAT = "ChooseCat"
    CHOOSE_REL = "ChooseRel"
    COMPARE_ATTR = "CompareAttr"
    LOGICAL_OBJ = "LogicalObj"
    QUERY_ATTR = "QueryAttr"

    @property
    def is_choose(self) -> bool:
        """True for the tasks whose question names a true and a false option."""
        return self in (TaskType.CHOOSE_ATTR, TaskType.CHOOSE_CAT, TaskType.CHOOSE_REL)

    @classmethod
    def parse(cls, text: str) -> TaskType:
        """Parse a task name case-insensitively.

        >>> TaskType.parse("chooseattr")
        <TaskType.CHOOSE_ATTR: 'ChooseAttr'>
        """
        for member in cls:
            if member.value.lower() == text.strip().lower():
                return member
        valid = ", ".join(m.value for m in cls)
        raise ValueError(f"unknown task type {text!r}; valid: {valid}")


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in original image pixels: top-left ``(x, y)``, width ``w``, height ``h``.

    >>> Box(10, 20, 30, 40).x1
    40
    """

    x: float
    y: float
    w: float
    h: float

    @property
    def x1(self) -> float:
        return self.x + self.w

    @property
    def y1(self) -> float:
        return self.y + self.h

    def check(self, image_size: tuple[int, int]) -> None:
        """Raise :class:`SampleError` unless the box has positive area and overlaps the image.

        ``image_size`` is ``(width, height)``.
        """
        width, height = image_size
        values = (self.x, self.y, self.w, self.h)
        if not all(math.isfinite(v) for v in values):
            raise SampleError(f"box {values} has a non-finite coordinate", stage="boxes")
        if self.w <= 0 or self.h <= 0:
            raise SampleError(
                f"box (x, y, w, h) = {values} has zero or negative area (w and h must be > 0)", stage="boxes"
            )
        if self.x >= width or self.y >= height or self.x1 <= 0 or self.y1 <= 0:
            raise SampleError(
                f"box (x, y, w, h) = {values} lies outside the {width}x{height} image (a box must overlap "
                f"0 <= x < {width}, 0 <= y < {height})",
                stage="boxes",
            )


_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_FOUR_NUMBERS = re.compile(rf"\s*\[?\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]?\s*")


def parse_boxes(text: str) -> tuple[Box, ...] | None:
    """Boxes written in a data cell: ``x,y,w,h``, ``[x, y, w, h]`` or a JSON list of such lists.

    Returns ``None`` when the text is not boxes (e.g. a phrase).

    >>> parse_boxes("10, 20, 30, 40"), parse_boxes("[[1,2,3,4],[5,6,7,8.5]]")[1], parse_boxes("red ball")
    ((Box(x=10, y=20, w=30, h=40),), Box(x=5, y=6, w=7, h=8.5), None)
    """
    match = _FOUR_NUMBERS.fullmatch(text)
    if match:
        return (Box(*(_num(v) for v in match.groups())),)
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if (
        isinstance(value, list)
        and value
        and all(isinstance(b, list) and len(b) == 4 and all(_is_number(v) for v in b) for b in value)
    ):
        return tuple(Box(*(_num(str(v)) for v in b)) for b in value)
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _num(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and re.fullmatch(r"[+-]?\d+", text.strip()) else value


@dataclass(frozen=True)
class SceneObject:
    """An object the question refers to. ``box`` is ``None`` when the object is not in the image
    (GQA LogicalObj "Is there a tent or a surfboard…" where one of them is absent).

    ``image`` says which image of a several-image sample, or which frame of a video, the box is
    in (0-based; 0 for the one image of the paper's samples). An object seen in several frames is
    one ``SceneObject`` per frame.
    """

    name: str
    object_id: str | None = None
    box: Box | None = None
    image: int = 0


@dataclass(frozen=True)
class Sample:
    """One visual question.

    Attributes:
        sample_id: stable id (GQA ``question_id``, kept as a string: some have leading zeros).
        image_id: image file stem (GQA ``img_id``); :func:`find_image` resolves it in a folder.
        question: the question text exactly as asked.
        answer: the gold answer, lower case.
        task: the task type, when known.
        true_option / false_option: the two options named in a choose question.
        objects: objects whose boxes define the *related* image patches.
        image_size: ``(width, height)`` recorded in the dataset, if any; checked against the file
            (against every image, or every frame).
        images: the image ids of a sample that shows several images, in prompt order (empty: the
            one image ``image_id``).
        frames: a folder (relative to the images folder) holding the frames of the video the
            sample shows, in file-name order (``None``: no video).
        fps: the frames' rate per second (``None``: :data:`vlmflow.inputs.DEFAULT_FPS`).
        extra: the remaining columns of the source row, untouched.

    >>> s = Sample("q1", "img1", "Is the jar full or empty?", "empty",
    ...            true_option="empty", false_option="full",
    ...            objects=(SceneObject("jar", "7", Box(1, 2, 3, 4)),))
    >>> s.boxes
    (Box(x=1, y=2, w=3, h=4),)
    """

    sample_id: str
    image_id: str
    question: str
    answer: str
    task: TaskType | None = None
    true_option: str | None = None
    false_option: str | None = None
    objects: tuple[SceneObject, ...] = ()
    image_size: tuple[int, int] | None = None
    images: tuple[str, ...] = ()
    frames: str | None = None
    fps: float | None = None
    extra: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def boxes(self) -> tuple[Box, ...]:
        """Boxes of the objects that are present in the image."""
        return tuple(o.box for o in self.objects if o.box is not None)

    @property
    def task_name(self) -> str:
        """The task's name: a GQA task type's, else the data's ``task`` column ('' when neither).

        >>> Sample("q1", "i", "Why?", "because", extra={"task": "captioning"}).task_name
        'captioning'
        """
        return self.task.value if self.task else str(self.extra.get("task", "")).strip()

    @property
    def object_name(self) -> str | None:
        """Name of the first (central) object, if any."""
        return self.objects[0].name if self.objects else None

    def column(self, name: str) -> str | None:
        """The sample's raw value in data column ``name`` (what ``col:NAME`` reads), or ``None``.

        Columns kept verbatim (``extra``) first, then the typed ones under their column names
        (``question``, ``answer``, ``true option``/``true_option``, ``false option``, ``img_id``, ...).

        >>> Sample("q1", "i", "Is it red?", "red", true_option="red", extra={"colour": "red"}).column("true option")
        'red'
        """
        if name in self.extra:
            return self.extra[name]
        key = name.strip().lower().replace(" ", "_")
        typed = {
            "question_id": self.sample_id, "sample_id": self.sample_id, "img_id": self.image_id,
            "image_id": self.image_id, "question": self.question, "answer": self.answer,
            "true_option": self.true_option, "false_option": self.false_option,
            "task": self.task.value if self.task else None, "object_name": self.object_name,
        }
        return typed.get(key)


def find_image(images_dir: Path, image_id: str) -> Path:
    """Return the image file for ``image_id`` in ``images_dir`` (``{image_id}.jpg``, ``.png``, …).

    Raises:
        SampleError: no file with a known image extension exists.

    >>> find_image(Path("/nonexistent"), "123")
    Traceback (most recent call last):
    ...
    vlmflow.errors.SampleError: image file not found for image id '123' in /nonexistent (tried .jpg, .jpeg, .png, .webp, .bmp)
    """
    for ext in IMAGE_EXTENSIONS:
        candidate = images_dir / f"{image_id}{ext}"
        if candidate.is_file():
            return candidate
    tried = ", ".join(IMAGE_EXTENSIONS)
    raise SampleError(
        f"image file not found for image id {image_id!r} in {images_dir} (tried {tried})", stage="image"
    )


def find_frames(images_dir: Path, folder: str) -> list[Path]:
    """The frame files of a video: the image files in ``images_dir / folder``, in file-name order.

    Raises:
        SampleError: the folder does not exist or holds no image file.

    >>> find_frames(Path("/nonexistent"), "clip")
    Traceback (most recent call last):
    ...
    vlmflow.errors.SampleError: frame folder 'clip' not found in /nonexistent
    """
    path = images_dir / folder
    if not path.is_dir():
        raise SampleError(f"frame folder {folder!r} not found in {images_dir}", stage="image")
    frames = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not frames:
        raise SampleError(
            f"frame folder {folder!r} in {images_dir} holds no image file ({', '.join(IMAGE_EXTENSIONS)})", stage="image"
        )
    return frames
