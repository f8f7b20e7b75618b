"""Build the paper's six GQA tasks from the official GQA files.

Inputs are the files a user downloads from the GQA site: ``{split}_balanced_questions.json`` (or
``{split}_all_questions.json``, or several shards), ``{split}_sceneGraphs.json`` and optionally the
images folder. Questions are selected by GQA's own (structural, semantic, detailed) question types,
as the released files were (their names encode the detailed types, :data:`PAPER_SELECTIONS`).
Objects, options and boxes come from each question's semantic program and the scene graph:

* ``select`` steps name the objects (``"jar (496168)"``; ``"mud (-)"`` when absent from the image);
* the last step's argument holds the two options of a choose question (``"empty|full"``; for
  ``choose rel``: ``"surfer,to the right of|to the left of,s (429128)"``, the relation's other object
  and the two relations, reduced to ``right``/``left`` as in the released files); the true option
  is the one equal to the answer;
* boxes and the image size come from the scene graph.

The released files also kept only questions a model answered correctly ("correct" in their names);
that filter belongs to a run (``vlmflow flows`` drops wrong answers), not to the data, and is not
applied here. Visual Genome region captions (the released ``captions`` column) are not part of GQA's
files and are left empty.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmflow.data.csvio import write_task_csv
from vlmflow.data.sample import Box, Sample, SceneObject, TaskType

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSelection:
    """Which GQA questions make up a task, and the file-name tag of its detailed types."""

    task: TaskType
    structural: str
    semantic: str
    detailed: frozenset[str]
    tag: str

    def matches(self, types: Mapping[str, Any]) -> bool:
        """True when a question's ``types`` belong to this task."""
        return (
            types.get("structural") == self.structural
            and types.get("semantic") == self.semantic
            and types.get("detailed") in self.detailed
        )

    def file_name(self, split: str) -> str:
        """Output file name, like the released ones without their model-specific "correct"."""
        return f"GQA_{split}_question_with_{self.tag}_{self.task.value}.csv"


#: The selections behind the released files (detailed types as found in them).
PAPER_SELECTIONS: dict[TaskType, TaskSelection] = {
    s.task: s
    for s in (
        TaskSelection(
            TaskType.CHOOSE_ATTR, "choose", "attr",
            frozenset({"chooseAttr", "materialChoose", "typeChoose", "activityChoose"}), "choose",
        ),
        TaskSelection(
            TaskType.CHOOSE_CAT, "choose", "cat",
            frozenset({"categoryThatChoose", "categoryThisChoose", "objThisChoose"}),
            "categoryThatThisChoose_objThisChoose",
        ),
        TaskSelection(TaskType.CHOOSE_REL, "choose", "rel", frozenset({"relChooser"}), "relChooser"),
        TaskSelection(TaskType.COMPARE_ATTR, "compare", "attr", frozenset({"twoCommon"}), "twoCommon"),
        TaskSelection(TaskType.LOGICAL_OBJ, "logical", "obj", frozenset({"existThatOr", "existThatOrC"}), "existThatOr"),
        TaskSelection(TaskType.QUERY_ATTR, "query", "attr", frozenset({"positionQuery"}), "positionQuery"),
    )
}

#: Tasks whose released rows carry the placeholder column ``question word`` = "common".
_QUESTION_WORD_TASKS = (TaskType.COMPARE_ATTR, TaskType.LOGICAL_OBJ, TaskType.QUERY_ATTR)
_SELECT = re.compile(r"^(?P<name>.*?)\s*\((?P<ids>[^()]*)\)\s*$")
_CHOOSE_REL = re.compile(r"^(?P<name>[^,]*),(?P<rels>[^,]*\|[^,]*),(?P<role>[so])\s*\((?P<ids>[^()]*)\)\s*$")
_RELATION_FILLER = {"to", "the", "of", "in"}


class ProgramError(ValueError):
    """A question cannot become a row; ``kind`` groups the reasons in build summaries."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class ProgramFields:
    """What a task row takes from the semantic program alone.

    ``objects`` holds ``(name, object_id)`` in row order; ``object_id`` is ``None`` for an object the
    program says is not in the image (``"mud (-)"``).
    """

    objects: tuple[tuple[str, str | None], ...]
    true_option: str | None = None
    false_option: str | None = None


def parse_select(argument: str) -> tuple[str, tuple[str, ...]]:
    """Name and object ids of a ``select`` argument (no ids when it says ``-``).

    >>> parse_select("jar (496168)"), parse_select("mud (-) ")
    (('jar', ('496168',)), ('mud', ()))
    """
    match = _SELECT.match(argument)
    if not match:
        raise ProgramError("unexpected program", f"select argument {argument!r} is not 'name (id)'")
    ids = tuple(i.strip() for i in match.group("ids").split(",") if i.strip() not in ("", "-"))
    return match.group("name").strip(), ids


def _single(argument: str) -> tuple[str, str | None]:
    name, ids = parse_select(argument)
    if len(ids) > 1:
        raise ProgramError("several objects", f"{argument!r} names {len(ids)} objects; a row holds one box per object")
    return name, (ids[0] if ids else None)


def _options(parts: Sequence[str], answer: str, reduce: Callable[[str], str] = lambda s: s) -> tuple[str, str]:
    if len(parts) != 2:
        raise ProgramError("unexpected program", f"expected two options, got {list(parts)}")
    for candidates in ([reduce(p) for p in parts], list(parts)):
        if candidates.count(answer) == 1:
            true = candidates.index(answer)
            return candidates[true], candidates[1 - true]
    raise ProgramError("answer not an option", f"answer {answer!r} is not one of the options {list(parts)}")


def _reduce_relation(phrase: str) -> str:
    """``"to the right of"`` -> ``"right"``, ``"in front of"`` -> ``"front"`` (released option words)."""
    words = [w for w in phrase.split() if w not in _RELATION_FILLER]
    return " ".join(words) or phrase


def program_fields(task: TaskType, program: Sequence[Mapping[str, Any]], answer: str) -> ProgramFields:
    """Objects and options of a question of ``task`` from its GQA semantic program.

    Raises:
        ProgramError: the program does not have the task's shape, a select names several objects,
            or the answer is not one of the options.

    >>> prog = [{"operation": "select", "dependencies": [], "argument": "toilet (796689)"},
    ...         {"operation": "choose rel", "dependencies": [0],
    ...          "argument": "faucet,to the left of|to the right of,s (796686)"}]
    >>> program_fields(TaskType.CHOOSE_REL, prog, "left")
    ProgramFields(objects=(('toilet', '796689'), ('faucet', '796686')), true_option='left', false_option='right')
    """
    if not program:
        raise ProgramError("unexpected program", "empty semantic program")
    ops = [str(step.get("operation", "")) for step in program]
    args = [str(step.get("argument", "")) for step in program]
    selects = [i for i, op in enumerate(ops) if op == "select"]
    last_op, last_arg = ops[-1], args[-1]

    def shape_error(expected: str) -> ProgramError:
        return ProgramError("unexpected program", f"{task.value} expects {expected}; got {' -> '.join(ops)}")

    if task in (TaskType.CHOOSE_ATTR, TaskType.CHOOSE_CAT, TaskType.QUERY_ATTR):
        if selects != [0]:
            raise shape_error("exactly one select, first")
        if task is TaskType.QUERY_ATTR and last_op != "query":
            raise shape_error("a final query")
        if task is TaskType.CHOOSE_CAT and last_op != "choose name":
            raise shape_error("a final 'choose name'")
        if task is TaskType.CHOOSE_ATTR and (
            not last_op.startswith("choose") or last_op in ("choose name", "choose rel")
        ):
            raise shape_error("a final attribute choose")
        central = (_single(args[0]),)
        if task is TaskType.QUERY_ATTR:
            return ProgramFields(central)
        true, false = _options(last_arg.split("|"), answer)
        return ProgramFields(central, true, false)
    if task is TaskType.CHOOSE_REL:
        match = _CHOOSE_REL.match(last_arg)
        if selects != [0] or last_op != "choose rel" or not match:
            raise shape_error("select -> choose rel 'name,rel|rel,s (id)'")
        other_ids = tuple(i.strip() for i in match.group("ids").split(",") if i.strip() not in ("", "-"))
        if len(other_ids) != 1:
            raise ProgramError("several objects", f"{last_arg!r} names {len(other_ids)} objects")
        true, false = _options(match.group("rels").split("|"), answer, _reduce_relation)
        return ProgramFields((_single(args[0]), (match.group("name").strip(), other_ids[0])), true, false)
    if task is TaskType.COMPARE_ATTR:
        if len(selects) != 2 or last_op != "common":
            raise shape_error("two selects -> common")
        return ProgramFields(tuple(_single(args[i]) for i in selects))
    if task is TaskType.LOGICAL_OBJ:
        if len(selects) != 2 or last_op != "or":
            raise shape_error("two selects -> ... -> or")
        first, second = (_single(args[i]) for i in selects)
        if first[1] is None and second[1] is None:
            raise ProgramError("no object in image", "neither object of the question is in the image")
        if first[1] is None:  # object1 is the object that is there (as in every released row)
            first, second = second, first
        return ProgramFields((first, second))
    raise ValueError(f"unknown task {task!r}")  # pragma: no cover - TaskType is closed


def task_of(types: Mapping[str, Any], selections: Iterable[TaskSelection] = PAPER_SELECTIONS.values()) -> TaskType | None:
    """The task whose selection matches a question's GQA ``types``, if any.

    >>> task_of({"structural": "query", "semantic": "attr", "detailed": "positionQuery"})
    <TaskType.QUERY_ATTR: 'QueryAttr'>
    """
    for selection in selections:
        if selection.matches(types):
            return selection.task
    return None


def build_sample(
    question_id: str,
    question: Mapping[str, Any],
    scene_graph: Mapping[str, Any] | None,
    task: TaskType,
) -> Sample:
    """One released-layout row (as a :class:`Sample`) from a GQA question and its image's scene graph.

    Raises:
        ProgramError: the question cannot become a row (the reason says why).

    >>> q = {"imageId": "1", "question": "On which side of the photo is the cup?", "answer": "left",
    ...      "types": {"structural": "query", "semantic": "attr", "detailed": "positionQuery"},
    ...      "semantic": [{"operation": "select", "dependencies": [], "argument": "cup (7)"},
    ...                   {"operation": "query", "dependencies": [0], "argument": "hposition"}]}
    >>> g = {"width": 40, "height": 30, "objects": {"7": {"name": "cup", "x": 1, "y": 2, "w": 3, "h": 4}}}
    >>> s = build_sample("q1", q, g, TaskType.QUERY_ATTR)
    >>> s.objects, s.image_size, s.extra["question word"]
    ((SceneObject(name='cup', object_id='7', box=Box(x=1, y=2, w=3, h=4), image=0),), (40, 30), 'common')
    """
    answer = str(question.get("answer", "")).strip()
    text = str(question.get("question", ""))
    image_id = str(question.get("imageId", "")).strip()
    if not answer or not text or not image_id:
        raise ProgramError("incomplete question", "question, answer or imageId is missing")
    program = list(question.get("semantic") or [])
    fields = program_fields(task, program, answer)
    if scene_graph is None:
        raise ProgramError("no scene graph", f"image {image_id!r} has no scene graph")
    graph_objects: Mapping[str, Any] = scene_graph.get("objects") or {}
    objects = []
    try:
        for name, object_id in fields.objects:
            box = None
            if object_id is not None:
                if object_id not in graph_objects:
                    raise ProgramError(
                        "object not in scene graph", f"object {object_id} is not in image {image_id}'s scene graph"
                    )
                g = graph_objects[object_id]
                box = Box(int(g["x"]), int(g["y"]), int(g["w"]), int(g["h"]))
            objects.append(SceneObject(name, object_id, box))
        size = (int(scene_graph["width"]), int(scene_graph["height"]))
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ProgramError):
            raise
        raise ProgramError("bad scene graph", f"image {image_id}'s scene graph lacks or garbles {exc}") from None
    types = question.get("types", {})
    extra = {
        "type_detailed": str(types.get("detailed", "")),
        "type_semantic": str(types.get("semantic", "")),
        "type_structural": str(types.get("structural", "")),
        "operations": repr(
            [
                {"operation": s.get("operation"), "dependencies": list(s.get("dependencies", [])), "argument": s.get("argument")}
                for s in program
            ]
        ),
        "captions": "",
    }
    if task in _QUESTION_WORD_TASKS:
        extra["question word"] = "common"
    if task is TaskType.CHOOSE_ATTR:
        extra.update(_choose_attr_columns(objects[0].object_id, graph_objects, program, answer, question))
    return Sample(
        sample_id=str(question_id),
        image_id=image_id,
        question=text,
        answer=answer,
        task=task,
        true_option=fields.true_option,
        false_option=fields.false_option,
        objects=tuple(objects),
        image_size=size,
        extra=extra,
    )


def _choose_attr_columns(
    object_id: str | None,
    graph_objects: Mapping[str, Any],
    program: Sequence[Mapping[str, Any]],
    answer: str,
    question: Mapping[str, Any],
) -> dict[str, str]:
    central = graph_objects.get(object_id or "", {})
    names = dict.fromkeys(str(o.get("name", "")) for o in graph_objects.values())
    attributes = dict.fromkeys(str(a) for o in graph_objects.values() for a in o.get("attributes", []))
    steps = [repr([str(s.get("operation")), str(s.get("argument"))]) for s in program[:2]]
    return {
        "central object attributes": ", ".join(str(a) for a in central.get("attributes", [])),
        "central object question attribute": answer,
        "all objects": ", ".join(names),
        "all objects attributes": ", ".join(attributes),
        "operation_1": steps[0] if steps else "",
        "operation_2": steps[1] if len(steps) > 1 else "",
        "full answer": str(question.get("fullAnswer", "")),
    }


@dataclass
class BuildReport:
    """Per task: the samples kept, how many questions matched the types, and why others were skipped."""

    samples: dict[TaskType, list[Sample]] = field(default_factory=dict)
    matched: Counter[TaskType] = field(default_factory=Counter)
    skipped: dict[TaskType, Counter[str]] = field(default_factory=dict)


def build_tasks(
    questions: Mapping[str, Mapping[str, Any]],
    scene_graphs: Mapping[str, Mapping[str, Any]],
    *,
    tasks: Iterable[TaskType] = tuple(TaskType),
    max_per_task: int | None = None,
    seed: int = 0,
    check_image: Callable[[str, tuple[int, int]], str | None] | None = None,
) -> BuildReport:
    """Select and fill the rows of each task from GQA questions and scene graphs.

    Args:
        questions: GQA questions json, ``{question_id: question}``.
        scene_graphs: GQA scene graphs json, ``{image_id: graph}``.
        tasks: the tasks to build.
        max_per_task: keep at most this many rows per task, a seeded random sample (``None``: all).
        seed: seed of that sample.
        check_image: optional ``(image_id, (w, h)) -> reason or None`` (e.g. the image file is
            missing or has another size); a reason skips the question.

    Returns:
        The kept samples per task in question order, with match and skip counts.

    >>> report = build_tasks({}, {}, tasks=[TaskType.QUERY_ATTR])
    >>> report.samples[TaskType.QUERY_ATTR], report.matched[TaskType.QUERY_ATTR]
    ([], 0)
    """
    selections = [PAPER_SELECTIONS[t] for t in tasks]
    report = BuildReport()
    for selection in selections:
        report.samples[selection.task] = []
        report.skipped[selection.task] = Counter()
    for qid, question in questions.items():
        task = task_of(question.get("types", {}), selections)
        if task is None:
            continue
        report.matched[task] += 1
        try:
            sample = build_sample(str(qid), question, scene_graphs.get(str(question.get("imageId", ""))), task)
            if check_image is not None:
                problem = check_image(sample.image_id, sample.image_size or (0, 0))
                if problem:
                    raise ProgramError("image", problem)
        except ProgramError as exc:
            report.skipped[task][exc.kind] += 1
            log.info("question %s skipped for %s: %s", qid, task.value, exc)
            continue
        report.samples[task].append(sample)
    if max_per_task is not None:
        for task, samples in report.samples.items():
            if len(samples) > max_per_task:
                keep = set(random.Random(f"{seed}/{task.value}").sample(range(len(samples)), max_per_task))
                report.samples[task] = [s for i, s in enumerate(samples) if i in keep]
    return report


def load_questions(paths: Sequence[Path | str], selections: Iterable[TaskSelection] = PAPER_SELECTIONS.values()) -> dict[str, Any]:
    """Read GQA question files (or shards), keeping only questions some selection matches.

    Non-matching questions are dropped while parsing, so the ``all`` split fits in memory.

    >>> import json, tempfile
    >>> kinds = {"a": ("query", "attr", "positionQuery"), "b": ("verify", "attr", "verifyAttr")}
    >>> qs = {k: {"types": dict(zip(("structural", "semantic", "detailed"), v)), "semantic": []}
    ...       for k, v in kinds.items()}
    >>> with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
    ...     _ = f.write(json.dumps(qs)); f.flush()
    ...     sorted(load_questions([f.name]))
    ['a']
    """
    chosen = list(selections)

    def keep_selected(pairs: list[tuple[str, Any]]) -> Any:
        obj = dict(pairs)
        if "types" in obj and "semantic" in obj and isinstance(obj["types"], dict):
            return obj if task_of(obj["types"], chosen) is not None else None
        return obj

    merged: dict[str, Any] = {}
    for path in paths:
        with Path(path).open(encoding="utf-8") as handle:
            data = json.load(handle, object_pairs_hook=keep_selected)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a GQA questions file is a JSON object {{question_id: question}}")
        merged.update((str(k), v) for k, v in data.items() if v is not None)
    return merged


def load_scene_graphs(path: Path | str) -> dict[str, Any]:
    """Read a GQA scene-graphs file ``{image_id: {width, height, objects}}``.

    >>> import json, tempfile
    >>> with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
    ...     _ = f.write(json.dumps({"1": {"width": 4, "height": 3, "objects": {}}})); f.flush()
    ...     load_scene_graphs(f.name)["1"]["width"]
    4
    """
    with Path(path).open(encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a GQA scene-graphs file is a JSON object {{image_id: graph}}")
    return data


def write_tasks(report: BuildReport, out_dir: Path | str, split: str) -> dict[TaskType, Path]:
    """Write one released-layout CSV per task into ``out_dir``; return the paths (empty tasks skipped).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     write_tasks(BuildReport(samples={TaskType.QUERY_ATTR: []}), d, "val")
    {}
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[TaskType, Path] = {}
    for task, samples in report.samples.items():
        if not samples:
            continue
        path = out / PAPER_SELECTIONS[task].file_name(split)
        write_task_csv(samples, path)
        written[task] = path
    return written


def split_name(questions_path: Path | str) -> str:
    """GQA split named by a questions file (``val_balanced_questions.json`` -> ``val``).

    >>> split_name("testdev_balanced_questions.json")
    'testdev'
    """
    stem = Path(questions_path).name
    return stem.split("_", 1)[0] if "_" in stem else "gqa"
