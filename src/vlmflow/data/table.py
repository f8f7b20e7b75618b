"""Read a minimal question table (CSV or JSONL) into samples: ``question_id, img_id, question, answer``.

The documented layout (``docs/data.md``): four required columns and optional ones; every other
column is kept verbatim in ``Sample.extra`` (what ``col:NAME`` expressions read).

==================  =========  =====================================================================
column              required   meaning
==================  =========  =====================================================================
question_id         yes        sample id (also ``id``); kept as text
img_id              yes        image file stem or name (also ``image``, ``image_id``); a known image
                               extension is dropped
question            yes        the question as asked
answer              yes        the gold answer
task                no         a GQA task name (ChooseAttr, ...) or any name (groups the samples)
true_option         no         the option that is the answer (also ``true option``)
false_option        no         the other option (also ``false option``)
options             no         ``a|b`` or a JSON list: the true option is the answer, the false
                               option the first other one
object, box         no         one object's name and its box ``x,y,w,h`` (original pixels)
objects             no         JSON list of ``{"name": ..., "box": [x, y, w, h] or null}``
image_w, image_h    no         the image's size, checked against the file
==================  =========  =====================================================================

A JSONL file holds one JSON object per line with the same keys (lists and objects may be written as
JSON values). Reading is forgiving per row and strict per file, as for the released layout
(:mod:`vlmflow.data.csvio`): a malformed row is a :class:`~vlmflow.data.csvio.RowError` with its
line, a file without the required columns a :class:`~vlmflow.errors.ConfigError`.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from vlmflow.data.csvio import ReadResult, RowError, RowProblem, collect_samples
from vlmflow.data.sample import IMAGE_EXTENSIONS, Box, Sample, SceneObject, TaskType, parse_boxes
from vlmflow.errors import ConfigError

__all__ = ["ALIASES", "REQUIRED", "TYPED", "read_table"]

#: The required columns.
REQUIRED = ("question_id", "img_id", "question", "answer")
#: Other names accepted for a column.
ALIASES: Mapping[str, str] = {
    "id": "question_id",
    "sample_id": "question_id",
    "image": "img_id",
    "image_id": "img_id",
    "true option": "true_option",
    "false option": "false_option",
}
#: Optional columns that become typed sample fields (the rest are kept in ``Sample.extra``).
TYPED = ("true_option", "false_option", "options", "object", "box", "objects", "image_w", "image_h")


def read_table(path: Path | str) -> ReadResult:
    """Read a minimal question table: ``.jsonl`` as JSON lines, anything else as CSV.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = Path(d, "qa.csv").write_text("image,question,answer,id\\ncat.jpg,What is it?,a cat,7\\n")
    ...     s = read_table(Path(d, "qa.csv")).samples[0]
    >>> s.sample_id, s.image_id, s.question, s.answer, s.task, s.objects
    ('7', 'cat', 'What is it?', 'a cat', None, ())
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file {str(path)!r} does not exist")
    records = _jsonl_records(path) if path.suffix.lower() in (".jsonl", ".ndjson") else _csv_records(path)
    if not records:
        raise ConfigError(f"{str(path)!r} holds no rows")
    columns = {_canonical(k) for _, row in records for k in row}
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise ConfigError(
            f"{str(path)!r} lacks the columns {missing}; a question table needs {', '.join(REQUIRED)} "
            f"(docs/data.md); it has {sorted(columns)}"
        )
    errors: list[RowError] = []
    samples = collect_samples(((line, partial(_sample_of, raw)) for line, raw in records), errors)
    tasks = {s.task for s in samples}
    return ReadResult(samples=samples, errors=errors, task=tasks.pop() if len(tasks) == 1 else None)


def _sample_of(raw: Mapping[str, Any]) -> Sample:
    return _sample({_canonical(k): v for k, v in raw.items()})


def _canonical(name: str) -> str:
    key = name.strip()
    return ALIASES.get(key.lower(), key.lower() if key.lower() in (*REQUIRED, *TYPED, "task") else key)


def _csv_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            raise ConfigError(f"{str(path)!r} has no header row")
        names = [n.strip() for n in reader.fieldnames]
        if len(set(names)) != len(names):
            raise ConfigError(f"{str(path)!r} repeats columns {sorted({n for n in names if names.count(n) > 1})}")
        out = []
        for row in reader:
            if any((v or "").strip() for v in row.values() if isinstance(v, str)):
                out.append((reader.line_num, {k.strip(): v for k, v in row.items() if k is not None}))
        return out


def _jsonl_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for number, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except ValueError as exc:
            out.append((number, {"__error__": f"not a JSON object: {exc}"}))
            continue
        out.append((number, value if isinstance(value, dict) else {"__error__": "not a JSON object"}))
    return out


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _sample(row: dict[str, Any]) -> Sample:
    if "__error__" in row:
        raise RowProblem(row["__error__"])
    values = {c: _text(row.get(c)).strip() for c in REQUIRED}
    for column, value in values.items():
        if not value:
            raise RowProblem(f"empty {column}")
    image_id = values["img_id"]
    if Path(image_id).suffix.lower() in IMAGE_EXTENSIONS:
        image_id = Path(image_id).stem
    true_option, false_option = _options(row, values["answer"])
    task_text = _text(row.get("task")).strip()
    try:
        task = TaskType.parse(task_text) if task_text else None
    except ValueError:
        task = None  # any other name groups the samples (Sample.task_name)
    extra = {k: _text(v) for k, v in row.items() if k not in (*REQUIRED, *TYPED) and not (k == "task" and task)}
    return Sample(
        sample_id=values["question_id"],
        image_id=image_id,
        question=_text(row.get("question")),
        answer=values["answer"],
        task=task,
        true_option=true_option,
        false_option=false_option,
        objects=_objects(row),
        image_size=_size(row),
        extra=extra,
    )


def _options(row: dict[str, Any], answer: str) -> tuple[str | None, str | None]:
    true_option = _text(row.get("true_option")).strip() or None
    false_option = _text(row.get("false_option")).strip() or None
    raw = row.get("options")
    if raw not in (None, "") and (true_option is None or false_option is None):
        options = raw if isinstance(raw, list) else _list(_text(raw))
        options = [str(o).strip() for o in options if str(o).strip()]
        if answer not in options:
            raise RowProblem(f"options {options} do not include the answer {answer!r}")
        true_option = true_option or answer
        false_option = false_option or next((o for o in options if o != answer), None)
    return true_option, false_option


def _list(text: str) -> list[Any]:
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except ValueError:
            raise RowProblem(f"options {text!r} are not a JSON list") from None
        if isinstance(value, list):
            return value
    return text.split("|")


def _objects(row: dict[str, Any]) -> tuple[SceneObject, ...]:
    out: list[SceneObject] = []
    name = _text(row.get("object")).strip()
    box_text = _text(row.get("box")).strip()
    if name or box_text:
        out.append(SceneObject(name or "object", None, _one_box(box_text, "box") if box_text else None))
    raw = row.get("objects")
    if raw not in (None, ""):
        items = raw if isinstance(raw, list) else None
        if items is None:
            try:
                items = json.loads(_text(raw))
            except ValueError:
                raise RowProblem(f"objects {_text(raw)!r} are not a JSON list") from None
        if not isinstance(items, list):
            raise RowProblem("objects must be a JSON list of {\"name\": ..., \"box\": [x, y, w, h]}")
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "name" not in item:
                raise RowProblem(f"objects[{i}] must be an object with a name (and a box)")
            box = item.get("box")
            out.append(SceneObject(str(item["name"]), None, _one_box(_text(box), f"objects[{i}].box") if box else None))
    return tuple(out)


def _one_box(text: str, where: str) -> Box:
    boxes = parse_boxes(text)
    if boxes is None or len(boxes) != 1:
        raise RowProblem(f"{where} {text!r} is not one box x,y,w,h")
    box = boxes[0]
    if not all(math.isfinite(v) for v in (box.x, box.y, box.w, box.h)):
        raise RowProblem(f"{where} {text!r} has a non-finite coordinate")
    return box


def _size(row: dict[str, Any]) -> tuple[int, int] | None:
    width, height = _text(row.get("image_w")).strip(), _text(row.get("image_h")).strip()
    if not width and not height:
        return None
    if not (re.fullmatch(r"\d+", width) and re.fullmatch(r"\d+", height)) or int(width) <= 0 or int(height) <= 0:
        raise RowProblem(f"image_w, image_h {width!r}, {height!r} are not two positive integers")
    return int(width), int(height)
