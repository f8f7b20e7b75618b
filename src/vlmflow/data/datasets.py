"""Resolve a user's data spec to samples: a data file, or ``gqa:TASK`` for a packaged file.

The six task files released with the paper ship inside the package (``vlmflow/resources/gqa/``);
``gqa:ChooseAttr`` (any case) names one of them. A path is read in one of two layouts
(``docs/data.md``): a CSV whose header holds the released files' object box columns is read in the
released layout (:mod:`vlmflow.data.csvio`); any other CSV, and a ``.jsonl`` file, as a minimal
question table (:mod:`vlmflow.data.table`).
"""

from __future__ import annotations

import csv
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from vlmflow.data.csvio import ReadResult, read_task_csv
from vlmflow.data.sample import TaskType
from vlmflow.data.table import read_table
from vlmflow.errors import ConfigError

GQA_SCHEME = "gqa:"


def released_specs() -> tuple[str, ...]:
    """The ``gqa:TASK`` specs of the six packaged files.

    >>> released_specs()[:2]
    ('gqa:ChooseAttr', 'gqa:ChooseCat')
    """
    return tuple(f"{GQA_SCHEME}{t.value}" for t in TaskType)


def released_file(task: TaskType) -> Traversable:
    """The packaged released CSV of ``task`` (a resource; open it or use ``importlib.resources.as_file``).

    >>> released_file(TaskType.QUERY_ATTR).name
    'GQA_val_correct_question_with_positionQuery_QueryAttr.csv'
    """
    folder = resources.files("vlmflow").joinpath("resources", "gqa")
    matches = [f for f in folder.iterdir() if f.name.endswith(f"_{task.value}.csv")]
    if len(matches) != 1:
        raise ConfigError(f"the package should hold one released file for {task.value}, found {len(matches)}")
    return matches[0]


def load_samples(spec: str | Path) -> tuple[ReadResult, str]:
    """Read the samples a data spec names; return them with the task name.

    Args:
        spec: ``"gqa:TASK"`` (a packaged released file; TASK one of :class:`TaskType`, any case) or
            the path of a CSV in the released layout.

    Raises:
        ConfigError: an unknown ``gqa:`` task, a path that does not exist, or an unreadable file.

    >>> result, task = load_samples("gqa:chooseattr")
    >>> task, len(result.samples)
    ('ChooseAttr', 1000)
    """
    text = str(spec)
    if text.lower().startswith(GQA_SCHEME):
        name = text[len(GQA_SCHEME) :]
        try:
            task = TaskType.parse(name)
        except ValueError:
            raise ConfigError(f"unknown GQA task {name!r} in {text!r}; valid: {', '.join(released_specs())}") from None
        with resources.as_file(released_file(task)) as path:
            return read_task_csv(path, task), task.value
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(
            f"data {text!r} is neither an existing data file (CSV or JSONL) nor a packaged task; valid packaged "
            f"tasks: {', '.join(released_specs())}"
        )
    result = read_task_csv(path) if is_released_layout(path) else read_table(path)
    tasks = {s.task_name for s in result.samples}
    return result, tasks.pop() if len(tasks) == 1 else ""


#: Columns only the released GQA files have: one object's box (the layouts of all six tasks hold one).
_RELEASED_MARKERS = ("central object x", "object1 x")


def is_released_layout(path: Path) -> bool:
    """Whether a data file is a CSV in the released GQA layout (its header names the object box columns)."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return False
    with path.open(newline="", encoding="utf-8-sig") as handle:
        header = next(csv.reader(handle), [])
    return any(marker in (h.strip() for h in header) for marker in _RELEASED_MARKERS)
