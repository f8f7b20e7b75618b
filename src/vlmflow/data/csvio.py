"""Read and write task CSVs in the layout of the paper's released GQA files.

Each of the six tasks has its own column layout (:data:`LAYOUTS`, copied from the released files).
Typed fields become :class:`~vlmflow.data.sample.Sample` attributes; every other column
(``operations``, ``captions``, ``type_detailed``, ...) is kept verbatim in ``Sample.extra``.

Optional columns any layout may add (one sample showing several images or a video):

* ``images``: the image ids of a several-image sample, ``;``-separated, in prompt order (``img_id``
  is the first; the images lie in the images folder like any other);
* ``frames``: a folder, relative to the images folder, holding the frames of the sample's video,
  shown in file-name order; ``fps``: their rate per second (default 2);
* ``<object> image`` (``central object image``, ``object1 image``, ...): which image of ``images``,
  or which frame of ``frames``, the object's box is in (0-based; default 0).

Reading is forgiving per row and strict per file: a malformed row (wrong field count, a box that is
not four numbers, a duplicate ``question_id``, ...) is reported as a :class:`RowError` with its
physical line and the reason, and the other rows are still read; a file that cannot be read at all
(missing, no header, required columns absent, task unknown) raises :class:`ConfigError`.

``question_id`` stays a string (released ids have leading zeros, e.g. ``"00556075"``). Line numbers
are physical lines (the header is line 1): a row whose ``captions`` hold newlines spans several.
"""

from __future__ import annotations

import csv
import math
import numbers
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from vlmflow.data.sample import Box, Sample, SceneObject, TaskType
from vlmflow.errors import ConfigError

_COMMON_HEAD = ("question_id", "img_id", "question", "answer")
_OPTIONS = ("true option", "false option")
_TYPES = ("type_detailed", "type_semantic", "type_structural")
_BOX_ORDER = ("w", "h", "x", "y")  # the released files list sizes before corners


def _obj(prefix: str, part: str) -> tuple[str, ...]:
    if part == "ident":
        return (f"{prefix} name", f"{prefix} id")
    return tuple(f"{prefix} {k}" for k in _BOX_ORDER)


#: Column order of the released file of each task.
LAYOUTS: dict[TaskType, tuple[str, ...]] = {
    TaskType.CHOOSE_ATTR: (
        *_COMMON_HEAD, *_OPTIONS, *_obj("central object", "ident"), "central object attributes",
        "central object question attribute", "all objects", "all objects attributes", *_TYPES,
        "operations", "operation_1", "operation_2", "captions", "image_w", "image_h",
        *_obj("central object", "box"), "full answer",
    ),
    TaskType.CHOOSE_CAT: (
        *_COMMON_HEAD, *_OPTIONS, *_obj("central object", "ident"), *_TYPES, "operations", "captions",
        "image_w", "image_h", *_obj("central object", "box"),
    ),
    TaskType.CHOOSE_REL: (
        *_COMMON_HEAD, *_OPTIONS, *_obj("object1", "ident"), *_obj("object2", "ident"), *_TYPES,
        "operations", "captions", "image_w", "image_h", *_obj("object1", "box"), *_obj("object2", "box"),
    ),
    TaskType.COMPARE_ATTR: (
        *_COMMON_HEAD, *_obj("object1", "ident"), *_obj("object2", "ident"), "question word", *_TYPES,
        "operations", "captions", "image_w", "image_h", *_obj("object1", "box"), *_obj("object2", "box"),
    ),
    TaskType.LOGICAL_OBJ: (
        *_COMMON_HEAD, *_obj("object1", "ident"), *_obj("object2", "ident"), "question word", *_TYPES,
        "operations", "captions", "image_w", "image_h", *_obj("object1", "box"), *_obj("object2", "box"),
    ),
    TaskType.QUERY_ATTR: (
        *_COMMON_HEAD, *_obj("central object", "ident"), "question word", *_TYPES, "operations",
        "captions", "image_w", "image_h", *_obj("central object", "box"),
    ),
}

#: GQA (structural, semantic) types of each task, used to tell tasks apart by content.
TASK_TYPES: dict[tuple[str, str], TaskType] = {
    ("choose", "attr"): TaskType.CHOOSE_ATTR,
    ("choose", "cat"): TaskType.CHOOSE_CAT,
    ("choose", "rel"): TaskType.CHOOSE_REL,
    ("compare", "attr"): TaskType.COMPARE_ATTR,
    ("logical", "obj"): TaskType.LOGICAL_OBJ,
    ("query", "attr"): TaskType.QUERY_ATTR,
}

_ABSENT = "-"
#: Optional columns of a sample that shows several images or a video (see the module docstring).
VISUAL_COLUMNS = ("images", "frames", "fps")
IMAGE_SEPARATOR = ";"
_TASK_IN_NAME = re.compile(r"(?:^|_)(" + "|".join(t.value for t in TaskType) + r")\.csv$", re.IGNORECASE)


def object_prefixes(task: TaskType) -> tuple[str, ...]:
    """Column prefixes of the task's objects, in ``Sample.objects`` order.

    >>> object_prefixes(TaskType.CHOOSE_REL)
    ('object1', 'object2')
    """
    if task in (TaskType.CHOOSE_ATTR, TaskType.CHOOSE_CAT, TaskType.QUERY_ATTR):
        return ("central object",)
    return ("object1", "object2")


def _typed_columns(task: TaskType) -> tuple[str, ...]:
    cols = [*_COMMON_HEAD, "image_w", "image_h", *VISUAL_COLUMNS]
    if task.is_choose:
        cols += _OPTIONS
    for prefix in object_prefixes(task):
        cols += [*_obj(prefix, "ident"), *_obj(prefix, "box"), f"{prefix} image"]
    return tuple(cols)


def _required_columns(task: TaskType) -> tuple[str, ...]:
    optional = set(_obj("object2", "ident") + _obj("object2", "box")) if task is TaskType.LOGICAL_OBJ else set()
    optional |= {*VISUAL_COLUMNS, *(f"{prefix} image" for prefix in object_prefixes(task))}
    return tuple(c for c in _typed_columns(task) if c not in optional)


@dataclass(frozen=True)
class RowError:
    """A row that could not be read: ``line`` is its first physical line (the header is line 1)."""

    line: int
    reason: str


@dataclass(frozen=True)
class ReadResult:
    """The samples read from a file, the rows that could not be read, and the file's task."""

    samples: list[Sample]
    errors: list[RowError]
    task: TaskType | None = None


class RowProblem(ValueError):
    """Why one row cannot be read (raised by a row parser, recorded as a :class:`RowError`)."""


def collect_samples(rows: Iterable[tuple[int, Callable[[], Sample]]], errors: list[RowError]) -> list[Sample]:
    """The samples of ``rows`` (``(line, parse)`` pairs), in order; a row whose ``parse`` raises
    :class:`RowProblem`, or whose ``question_id`` an earlier row has, is appended to ``errors`` instead.

    >>> errors = []
    >>> q1 = lambda: Sample("q1", "i", "Q?", "a")
    >>> [s.sample_id for s in collect_samples([(2, q1), (3, q1)], errors)], errors
    (['q1'], [RowError(line=3, reason="duplicate question_id 'q1' (first on line 2)")])
    """
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for line, parse in rows:
        try:
            sample = parse()
        except RowProblem as exc:
            errors.append(RowError(line, str(exc)))
            continue
        if sample.sample_id in seen:
            errors.append(RowError(line, f"duplicate question_id {sample.sample_id!r} (first on line {seen[sample.sample_id]})"))
            continue
        seen[sample.sample_id] = line
        samples.append(sample)
    return samples


def read_task_csv(path: Path | str, task: TaskType | None = None) -> ReadResult:
    """Read a task CSV in the released layout into typed samples.

    Args:
        path: the CSV file.
        task: the file's task; inferred when ``None`` from a ``…_ChooseAttr.csv`` style name, else
            from the column set, else from the rows' ``type_structural``/``type_semantic``.

    Returns:
        The samples in file order and one :class:`RowError` per malformed row.

    Raises:
        ConfigError: the file is missing or empty, the task cannot be inferred, or a required
            column is absent.

    >>> from vlmflow.data.datasets import load_samples
    >>> result, task = load_samples("gqa:ChooseRel")
    >>> len(result.samples), result.errors, result.samples[0].objects[1].name
    (964, [], 'surfer')
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"task CSV {str(path)!r} does not exist")
    records, errors = _read_records(path)
    if not records:
        raise ConfigError(f"{str(path)!r} has no header row")
    _, header = records[0]
    if len(set(header)) != len(header):
        dupes = sorted({c for c in header if header.count(c) > 1})
        raise ConfigError(f"{str(path)!r} repeats columns {dupes}")
    rows = records[1:]
    if task is None:
        task = _infer_task(path, header, rows)
    missing = [c for c in _required_columns(task) if c not in header]
    if missing:
        raise ConfigError(f"{str(path)!r} lacks the {task.value} columns {missing}; it has {header}")
    def parse(row: list[str]) -> Sample:
        if len(row) != len(header):
            raise RowProblem(f"expected {len(header)} fields, found {len(row)}")
        return _parse_row(dict(zip(header, row, strict=True)), task)

    samples = collect_samples(((line, partial(parse, row)) for line, row in rows), errors)
    errors.sort(key=lambda e: e.line)
    return ReadResult(samples=samples, errors=errors, task=task)


def _read_records(path: Path) -> tuple[list[tuple[int, list[str]]], list[RowError]]:
    """``(first physical line, fields)`` of every non-blank record, and records the csv module rejects."""
    records: list[tuple[int, list[str]]] = []
    errors: list[RowError] = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        end = 0
        while True:
            start = end + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                end = reader.line_num
                if not records:
                    raise ConfigError(f"{str(path)!r}: unreadable header: {exc}") from None
                errors.append(RowError(start, f"unreadable CSV record: {exc}"))
                continue
            end = reader.line_num
            if row and any(field.strip() for field in row):
                records.append((start, row))
    return records, errors


def _infer_task(path: Path, header: list[str], rows: list[tuple[int, list[str]]]) -> TaskType:
    match = _TASK_IN_NAME.search(path.name)
    if match:
        return TaskType.parse(match.group(1))
    columns = set(header)
    # Tasks whose full layout (else whose required columns) the header holds; of those, the ones
    # no other candidate's column set contains (a ChooseAttr file also holds ChooseCat's layout).
    exact: list[TaskType] = []
    for needed in ({t: set(LAYOUTS[t]) for t in TaskType}, {t: set(_required_columns(t)) for t in TaskType}):
        fits = [t for t in TaskType if needed[t] <= columns]
        exact = [t for t in fits if not any(needed[t] < needed[u] for u in fits)]
        if exact:
            break
    if len(exact) == 1:
        return exact[0]
    if "type_structural" in columns and "type_semantic" in columns:
        i_struct, i_sem = header.index("type_structural"), header.index("type_semantic")
        kinds = {
            (row[i_struct].strip(), row[i_sem].strip()) for _, row in rows if len(row) == len(header)
        }
        tasks = {TASK_TYPES[k] for k in kinds if k in TASK_TYPES}
        if exact:
            tasks &= set(exact)
        if len(tasks) == 1:
            return tasks.pop()
    valid = ", ".join(t.value for t in TaskType)
    raise ConfigError(
        f"cannot tell the task of {str(path)!r} from its name, columns or GQA types; "
        f"name it '…_TASK.csv' or pass the task (valid: {valid})"
    )


def _parse_row(row: dict[str, str], task: TaskType) -> Sample:
    qid = row["question_id"].strip()
    if not qid:
        raise RowProblem("empty question_id")
    for column in ("img_id", "question", "answer"):
        if not row[column].strip():
            raise RowProblem(f"empty {column}")
    width, height = (_positive_int(row, c) for c in ("image_w", "image_h"))
    objects = []
    for k, prefix in enumerate(object_prefixes(task)):
        obj = _parse_object(row, prefix, required=not (task is TaskType.LOGICAL_OBJ and k == 1))
        if obj is not None:
            objects.append(obj)
    typed = set(_typed_columns(task))
    true_option = false_option = None
    if task.is_choose:
        true_option = row["true option"].strip() or None
        false_option = row["false option"].strip() or None
    images = tuple(i.strip() for i in row.get("images", "").split(IMAGE_SEPARATOR) if i.strip())
    frames = row.get("frames", "").strip() or None
    if images and frames:
        raise RowProblem("a sample shows several images or a video, not both (images and frames are both set)")
    fps_text = row.get("fps", "").strip()
    fps = float(_number(fps_text, "fps")) if fps_text else None
    if fps is not None and fps <= 0:
        raise RowProblem(f"fps {fps_text!r} is not positive")
    return Sample(
        sample_id=qid,
        image_id=row["img_id"].strip(),
        question=row["question"],
        answer=row["answer"],
        task=task,
        true_option=true_option,
        false_option=false_option,
        objects=tuple(objects),
        image_size=(width, height),
        images=images,
        frames=frames,
        fps=fps,
        extra={k: v for k, v in row.items() if k not in typed},
    )


def _positive_int(row: dict[str, str], column: str) -> int:
    text = row[column].strip()
    if not re.fullmatch(r"\d+", text) or int(text) <= 0:
        raise RowProblem(f"{column} {text!r} is not a positive integer")
    return int(text)


def _number(text: str, column: str) -> int | float:
    text = text.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        value = float(text)
    except ValueError:
        raise RowProblem(f"{column} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise RowProblem(f"{column} {text!r} is not finite")
    return value


def _parse_object(row: dict[str, str], prefix: str, *, required: bool) -> SceneObject | None:
    name_col, id_col = _obj(prefix, "ident")
    name = row.get(name_col, "").strip()
    if not name or name == _ABSENT:
        if required:
            raise RowProblem(f"empty {name_col}")
        return None
    object_id = row.get(id_col, "").strip()
    box_cols = {k: f"{prefix} {k}" for k in "xywh"}
    texts = {k: row.get(c, "").strip() for k, c in box_cols.items()}
    absent = [k for k, t in texts.items() if t in ("", _ABSENT)]
    if len(absent) == 4:
        if required:
            raise RowProblem(f"{prefix} {name!r} has no box")
        return SceneObject(name, object_id if object_id not in ("", _ABSENT) else None, None)
    if absent:
        raise RowProblem(f"{prefix} box lacks {', '.join(box_cols[k] for k in absent)}")
    # Only the syntax is checked here: a box outside its image is a problem of that sample's
    # patch groups (Box.check raises SampleError there), not a malformed row.
    box = Box(*(_number(texts[k], box_cols[k]) for k in "xywh"))
    image_text = row.get(f"{prefix} image", "").strip()
    if image_text in ("", _ABSENT):
        image = 0
    elif re.fullmatch(r"\d+", image_text):
        image = int(image_text)
    else:
        raise RowProblem(f"{prefix} image {image_text!r} is not an image or frame index (0, 1, ...)")
    return SceneObject(name, object_id if object_id not in ("", _ABSENT) else None, box, image=image)


def write_task_csv(samples: Sequence[Sample], path: Path | str) -> None:
    """Write samples of one task in that task's released column layout.

    Columns of ``Sample.extra`` outside the layout are appended after it (first-seen order), so
    nothing is lost; layout columns a sample's ``extra`` lacks are written empty. Numbers are
    written as ``str(int)`` or ``repr(float)``, so :func:`read_task_csv` gives the fields back exactly.

    Raises:
        ValueError: the samples mix tasks, have no task or image size, or have the wrong number of
            objects for their task.

    >>> import tempfile
    >>> s = Sample("007", "img", "What is this, a cat or a dog?", "cat", task=TaskType.CHOOSE_CAT,
    ...            true_option="cat", false_option="dog",
    ...            objects=(SceneObject("this", "5", Box(1, 2, 3, 4)),), image_size=(10, 10))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     write_task_csv([s], f"{d}/x_ChooseCat.csv")
    ...     read_task_csv(f"{d}/x_ChooseCat.csv").samples == [s]
    True
    """
    tasks = {s.task for s in samples}
    if len(tasks) != 1 or None in tasks:
        raise ValueError(f"all samples must have one task to choose a layout; found {sorted(map(str, tasks))}")
    task = next(iter(tasks))
    if task is None:  # pragma: no cover - excluded above; narrows the type
        raise ValueError("samples have no task")
    layout = [*LAYOUTS[task], *_visual_columns(samples, task)]
    extra_columns = list(dict.fromkeys(k for s in samples for k in s.extra if k not in layout))
    columns = [*layout, *extra_columns]
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for sample in samples:
            values = _row_values(sample, task)
            writer.writerow([values.get(c, sample.extra.get(c, "")) for c in columns])


def _visual_columns(samples: Sequence[Sample], task: TaskType) -> list[str]:
    """The optional columns these samples need: none for one-image samples with boxes in image 0."""
    columns = []
    if any(s.images for s in samples):
        columns.append("images")
    if any(s.frames is not None for s in samples):
        columns += ["frames", "fps"]
    if any(o.image for s in samples for o in s.objects):
        columns += [f"{prefix} image" for prefix in object_prefixes(task)]
    return columns


def _row_values(sample: Sample, task: TaskType) -> dict[str, str]:
    if sample.image_size is None:
        raise ValueError(f"sample {sample.sample_id!r} has no image_size; the layout needs image_w and image_h")
    prefixes = object_prefixes(task)
    n_min = 1 if task is TaskType.LOGICAL_OBJ else len(prefixes)
    if not n_min <= len(sample.objects) <= len(prefixes):
        raise ValueError(
            f"sample {sample.sample_id!r} has {len(sample.objects)} objects; {task.value} rows hold "
            f"{n_min if n_min == len(prefixes) else f'{n_min} or {len(prefixes)}'}"
        )
    values = {
        "question_id": sample.sample_id,
        "img_id": sample.image_id,
        "question": sample.question,
        "answer": sample.answer,
        "image_w": str(int(sample.image_size[0])),
        "image_h": str(int(sample.image_size[1])),
    }
    if task.is_choose:
        values["true option"] = sample.true_option or ""
        values["false option"] = sample.false_option or ""
    values["images"] = IMAGE_SEPARATOR.join(sample.images)
    values["frames"] = sample.frames or ""
    values["fps"] = _format_number(sample.fps) if sample.fps is not None else ""
    for k, prefix in enumerate(prefixes):
        obj = sample.objects[k] if k < len(sample.objects) else None
        values[f"{prefix} image"] = str(obj.image) if obj else _ABSENT
        values[f"{prefix} name"] = obj.name if obj else _ABSENT
        values[f"{prefix} id"] = (obj.object_id if obj and obj.object_id is not None else _ABSENT)
        for key in "xywh":
            values[f"{prefix} {key}"] = _format_number(getattr(obj.box, key)) if obj and obj.box else _ABSENT
    return values


def _format_number(value: float) -> str:
    if isinstance(value, numbers.Integral):
        return str(int(value))
    return repr(float(value))
