"""Write synthetic scene questions as task CSVs in the released GQA layout, images beside them.

``write_scene_set(out, n_per_task=20, seed=0)`` writes ``out/scenes_<Task>.csv`` for each task and
one PNG per question (``out/<img_id>.png``), so ``vlmflow flows --data out/scenes_ChooseAttr.csv``
reads them like the released files (images default to the CSV's folder).

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as d:
...     files = write_scene_set(d, n_per_task=2, seed=0)
...     sorted(p.name for p in files.values())[0]
'scenes_ChooseAttr.csv'
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from vlmflow.data.csvio import write_task_csv
from vlmflow.data.sample import TaskType
from vlmflow.data.scene_questions import SceneQuestion, scene_question, with_ids

CSV_PREFIX = "scenes_"


def task_questions(task: TaskType, n: int, seed: int, *, start: int = 0) -> list[SceneQuestion]:
    """Questions ``start .. start + n - 1`` of ``task`` for ``seed``, with file-friendly ids.

    Image ids are ``s<seed>-<Task>-<index>``; question ids are digit strings unique over the six
    tasks of one seed (task number, then the index), like the released files' ids.

    >>> [q.sample.sample_id for q in task_questions(TaskType.CHOOSE_CAT, 2, seed=3)]
    ['2000000', '2000001']
    """
    number = list(TaskType).index(task) + 1
    questions = []
    for index in range(start, start + n):
        question = scene_question(task, seed, index)
        questions.append(
            with_ids(question, image_id=f"s{seed}-{task.value}-{index:05d}", question_id=f"{number}{index:06d}")
        )
    return questions


def write_scene_set(
    out: str | Path,
    n_per_task: int,
    seed: int = 0,
    tasks: Iterable[TaskType] = tuple(TaskType),
) -> dict[TaskType, Path]:
    """Write ``n_per_task`` questions of each task into ``out``; return the CSV of each task.

    Raises:
        ValueError: ``n_per_task`` is below 1.
    """
    if n_per_task < 1:
        raise ValueError(f"n_per_task must be >= 1, got {n_per_task}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[TaskType, Path] = {}
    for task in tasks:
        questions = task_questions(task, n_per_task, seed)
        write_questions(questions, out / f"{CSV_PREFIX}{task.value}.csv")
        written[task] = out / f"{CSV_PREFIX}{task.value}.csv"
    return written


def write_questions(questions: Sequence[SceneQuestion], csv_path: str | Path) -> None:
    """Write questions of one task to ``csv_path`` and their images (PNG) into its folder."""
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    for question in questions:
        image_path = csv_path.parent / f"{question.sample.image_id}.png"
        question.scene.render().save(image_path)
    write_task_csv([q.sample for q in questions], csv_path)
