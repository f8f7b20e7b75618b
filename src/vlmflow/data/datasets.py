"""Resolve a user's data spec to samples: a task CSV path, or ``gqa:TASK`` for a packaged file.

The six task files released with the paper ship inside the package (``vlmflow/resources/gqa/``);
``gqa:ChooseAttr`` (any case) names one of them. Anything else is read as a path to a CSV in the
released layout (:mod:`vlmflow.data.csvio`).
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from vlmflow.data.csvio import ReadResult, read_task_csv
from vlmflow.data.sample import TaskType
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
            f"data {text!r} is neither an existing CSV file nor a packaged task; valid packaged tasks: "
            f"{', '.join(released_specs())}"
        )
    result = read_task_csv(path)
    return result, result.task.value if result.task else ""
