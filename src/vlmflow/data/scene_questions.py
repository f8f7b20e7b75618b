"""GQA-like questions about synthetic shape scenes, for the paper's six task types.

Every question has a one-word answer, is unambiguous (shapes in a scene are distinct, a colour named
to pick an object belongs to exactly one object) and has balanced answers: the generator draws the
answer first and builds a scene where it is true. Questions come with the scene objects they are
about (boxes from the rendered pixels) and with the other columns of the released GQA files filled
the way those files fill them (``type_detailed``, ``operations``, ``captions``, ...), so every tool
that reads the released files reads these.

=============  ===========================================================  ============================
task           questions                                                    answers
=============  ===========================================================  ============================
ChooseAttr     Is the circle red or blue? / Is the star small or large?     a colour / a size
ChooseCat      Which shape is red, the circle or the star?                  a shape
ChooseRel      Is the circle to the left or to the right of the square?     left / right
CompareAttr    What do the circle and the star have in common? /            color, size / yes, no
               Do the circle and the star have the same color?
LogicalObj     Is there a circle or a star that is red?                     yes / no
QueryAttr      On which side of the image is the star? / What color is ...  left, right / a colour
=============  ===========================================================  ============================

:func:`scene_question` is deterministic in ``(task, seed, index)``: the same triple always gives the
same scene and question, whatever else was generated.

>>> q = scene_question(TaskType.CHOOSE_REL, seed=0, index=3)
>>> q.sample.answer in ("left", "right"), q.sample.true_option == q.sample.answer
(True, True)
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from vlmflow.data.sample import Sample, SceneObject, TaskType
from vlmflow.data.scenes import COLORS, SHAPES, SIZES, Scene, SceneShape, random_scene

#: Every answer word a scene question can have, per task (lower case, as in the CSVs).
ANSWERS: dict[TaskType, tuple[str, ...]] = {
    TaskType.CHOOSE_ATTR: (*COLORS, *SIZES),
    TaskType.CHOOSE_CAT: SHAPES,
    TaskType.CHOOSE_REL: ("left", "right"),
    TaskType.COMPARE_ATTR: ("color", "size", "yes", "no"),
    TaskType.LOGICAL_OBJ: ("yes", "no"),
    TaskType.QUERY_ATTR: ("left", "right", *COLORS),
}

_STRUCTURAL_SEMANTIC: dict[TaskType, tuple[str, str]] = {
    TaskType.CHOOSE_ATTR: ("choose", "attr"),
    TaskType.CHOOSE_CAT: ("choose", "cat"),
    TaskType.CHOOSE_REL: ("choose", "rel"),
    TaskType.COMPARE_ATTR: ("compare", "attr"),
    TaskType.LOGICAL_OBJ: ("logical", "obj"),
    TaskType.QUERY_ATTR: ("query", "attr"),
}


@dataclass(frozen=True)
class SceneQuestion:
    """A question about a scene: the :class:`Sample` (no image id yet) and the scene it asks about."""

    sample: Sample
    scene: Scene


def _ref(obj: SceneShape) -> str:
    return f"{obj.shape} ({obj.object_id})"


def _ops(*ops: tuple[str, list[int], str]) -> str:
    # The released files store GQA's program as the repr of a list of dicts.
    return repr([{"operation": op, "dependencies": deps, "argument": arg} for op, deps, arg in ops])


def _pair(rng: random.Random, a: str, b: str) -> tuple[str, str]:
    return (a, b) if rng.random() < 0.5 else (b, a)


def _n_objects(rng: random.Random, at_least: int) -> int:
    return rng.randint(max(2, at_least), 4)


def _choose_attr(rng: random.Random) -> tuple[Scene, dict]:
    attribute = "color" if rng.random() < 0.7 else "size"
    values = list(COLORS) if attribute == "color" else list(SIZES)
    true = rng.choice(values)
    false = rng.choice([v for v in values if v != true])
    scene = random_scene(rng, _n_objects(rng, 1), fixed=[{attribute: true}])
    target = scene.objects[0]
    first, second = _pair(rng, true, false)
    return scene, {
        "question": f"Is the {target.shape} {first} or {second}?",
        "answer": true,
        "options": (true, false),
        "objects": [(target, target.shape)],
        "type_detailed": "chooseAttr",
        "operations": [("select", [], _ref(target)), (f"choose {attribute}", [0], f"{first}|{second}")],
        "extra": {
            "central object attributes": ", ".join(target.attributes),
            "central object question attribute": true,
            "all objects": ", ".join(o.shape for o in scene.objects),
            "all objects attributes": ", ".join(dict.fromkeys(a for o in scene.objects for a in o.attributes)),
            "operation_1": repr(["select", _ref(target)]),
            "operation_2": repr([f"choose {attribute}", f"{first}|{second}"]),
            "full answer": f"The {target.shape} is {true}.",
        },
    }


def _choose_cat(rng: random.Random) -> tuple[Scene, dict]:
    true, false = rng.sample(SHAPES, 2)
    color = rng.choice(list(COLORS))
    others = [c for c in COLORS if c != color]
    false_present = rng.random() < 0.5
    fixed: list[dict[str, object]] = [{"shape": true, "color": color}]
    if false_present:
        fixed.append({"shape": false, "color": rng.choice(others)})
    n = _n_objects(rng, len(fixed))
    # Distractors may not take the named colour (it must pick exactly one object) or the false shape.
    spare = [s for s in SHAPES if s not in (true, false)]
    rng.shuffle(spare)
    fixed += [{"shape": spare.pop(), "color": rng.choice(others)} for _ in range(n - len(fixed))]
    scene = random_scene(rng, n, fixed=fixed)
    target = scene.objects[0]
    first, second = _pair(rng, true, false)
    return scene, {
        "question": f"Which shape is {color}, the {first} or the {second}?",
        "answer": true,
        "options": (true, false),
        "objects": [(target, "shape")],
        "type_detailed": "categoryThatChoose",
        "operations": [
            ("select", [], f"shape ({target.object_id})"),
            ("filter color", [0], color),
            ("choose name", [1], f"{first}|{second}"),
        ],
        "extra": {},
    }


def _choose_rel(rng: random.Random) -> tuple[Scene, dict]:
    answer = rng.choice(("left", "right"))
    left_col, right_col = sorted(rng.sample(range(4), 2))
    subject_col, reference_col = (left_col, right_col) if answer == "left" else (right_col, left_col)
    scene = random_scene(rng, _n_objects(rng, 2), fixed=[{"col": reference_col}, {"col": subject_col}])
    reference, subject = scene.objects[0], scene.objects[1]
    first, second = _pair(rng, "left", "right")
    relations = f"to the {first} of|to the {second} of"
    return scene, {
        "question": f"Is the {subject.shape} to the {first} or to the {second} of the {reference.shape}?",
        "answer": answer,
        "options": (answer, "right" if answer == "left" else "left"),
        "objects": [(reference, reference.shape), (subject, subject.shape)],
        "type_detailed": "relChooser",
        "operations": [
            ("select", [], _ref(reference)),
            ("choose rel", [0], f"{subject.shape},{relations},s ({subject.object_id})"),
        ],
        "extra": {},
    }


def _compare_attr(rng: random.Random) -> tuple[Scene, dict]:
    answer = rng.choice(ANSWERS[TaskType.COMPARE_ATTR])
    color_a, color_b = rng.sample(list(COLORS), 2)
    size_a, size_b = rng.sample(list(SIZES), 2)
    same_color = answer in ("color", "yes")
    same_size = answer == "size" or (answer in ("yes", "no") and rng.random() < 0.5)
    fixed = [
        {"color": color_a, "size": size_a},
        {"color": color_a if same_color else color_b, "size": size_a if same_size else size_b},
    ]
    scene = random_scene(rng, _n_objects(rng, 2), fixed=fixed)
    a, b = scene.objects[0], scene.objects[1]
    if answer in ("color", "size"):
        question = f"What do the {a.shape} and the {b.shape} have in common?"
        kind, operations = "twoCommon", [("select", [], _ref(a)), ("select", [], _ref(b)), ("common", [0, 1], "")]
    else:
        question = f"Do the {a.shape} and the {b.shape} have the same color?"
        kind, operations = "twoSameC", [("select", [], _ref(a)), ("select", [], _ref(b)), ("same color", [0, 1], "")]
    return scene, {
        "question": question,
        "answer": answer,
        "objects": [(a, a.shape), (b, b.shape)],
        "type_detailed": kind,
        "operations": operations,
        "extra": {"question word": "common"},
    }


def _logical_obj(rng: random.Random) -> tuple[Scene, dict]:
    answer = rng.choice(("yes", "no"))
    color = rng.choice(list(COLORS))
    others = [c for c in COLORS if c != color]
    present, absent = rng.sample(SHAPES, 2)
    both = rng.random() < 0.5
    if answer == "yes":
        # One present object (the first, or with both present either one) has the colour.
        colors = [color, rng.choice(list(COLORS))] if rng.random() < 0.5 or not both else [rng.choice(others), color]
    else:
        colors = [rng.choice(others), rng.choice(others)]
    fixed: list[dict[str, object]] = [{"shape": present, "color": colors[0]}]
    if both:
        fixed.append({"shape": absent, "color": colors[1]})
    scene = random_scene(rng, _n_objects(rng, len(fixed)), fixed=fixed, exclude=(absent,))
    obj1 = scene.objects[0]
    obj2 = scene.find(absent)
    first, second = _pair(rng, present, absent)
    filter_op = ("filter color", color)
    operations = [
        ("select", [], _ref(obj1)),
        (filter_op[0], [0], filter_op[1]),
        ("exist", [1], "?"),
        ("select", [], f"{absent} ({obj2.object_id if obj2 else '-'}) "),
        (filter_op[0], [3], filter_op[1]),
        ("exist", [4], "?"),
        ("or", [2, 5], ""),
    ]
    objects: list[tuple[SceneShape, str] | tuple[None, str]] = [(obj1, present), (obj2, absent)]
    return scene, {
        "question": f"Is there a {first} or a {second} that is {color}?",
        "answer": answer,
        "objects": objects,
        "type_detailed": "existThatOr" if answer == "yes" else "existThatOrC",
        "operations": operations,
        "extra": {"question word": "common"},
    }


def _query_attr(rng: random.Random) -> tuple[Scene, dict]:
    if rng.random() < 0.5:
        answer = rng.choice(("left", "right"))
        col = rng.choice((0, 1) if answer == "left" else (2, 3))
        scene = random_scene(rng, _n_objects(rng, 1), fixed=[{"col": col}])
        target = scene.objects[0]
        question, kind, argument = f"On which side of the image is the {target.shape}?", "positionQuery", "hposition"
    else:
        answer = rng.choice(list(COLORS))
        scene = random_scene(rng, _n_objects(rng, 1), fixed=[{"color": answer}])
        target = scene.objects[0]
        question, kind, argument = f"What color is the {target.shape}?", "colorQuery", "color"
    return scene, {
        "question": question,
        "answer": answer,
        "objects": [(target, target.shape)],
        "type_detailed": kind,
        "operations": [("select", [], _ref(target)), ("query", [0], argument)],
        "extra": {"question word": "common"},
    }


_GENERATORS: dict[TaskType, Callable[[random.Random], tuple[Scene, dict]]] = {
    TaskType.CHOOSE_ATTR: _choose_attr,
    TaskType.CHOOSE_CAT: _choose_cat,
    TaskType.CHOOSE_REL: _choose_rel,
    TaskType.COMPARE_ATTR: _compare_attr,
    TaskType.LOGICAL_OBJ: _logical_obj,
    TaskType.QUERY_ATTR: _query_attr,
}


def captions(scene: Scene) -> str:
    """GQA-like region captions of a scene: ``"a small red circle. a large blue star."``."""
    return " ".join(f"a {o.description()}." for o in scene.objects)


def scene_question(task: TaskType, seed: int, index: int, *, image_id: str = "", question_id: str = "") -> SceneQuestion:
    """The ``index``-th question of ``task`` for ``seed`` (deterministic), with its scene.

    Args:
        task: one of the six task types.
        seed / index: select the question; the pair's random stream is independent of all others.
        image_id / question_id: written into the sample (default: ``"{task}-{seed}-{index}"``).

    >>> q = scene_question(TaskType.QUERY_ATTR, seed=1, index=0)
    >>> q == scene_question(TaskType.QUERY_ATTR, seed=1, index=0)
    True
    """
    rng = random.Random(f"vlmflow-scenes:{task.value}:{seed}:{index}")
    scene, spec = _GENERATORS[task](rng)
    name = f"{task.value}-{seed}-{index}"
    objects = []
    for obj, word in spec["objects"]:
        if obj is None:
            objects.append(SceneObject(word, None, None))
        else:
            objects.append(SceneObject(word, obj.object_id, scene.box(obj)))
    structural, semantic = _STRUCTURAL_SEMANTIC[task]
    extra = {
        "type_detailed": spec["type_detailed"],
        "type_semantic": semantic,
        "type_structural": structural,
        "operations": _ops(*spec["operations"]),
        "captions": captions(scene),
        **spec["extra"],
    }
    options = spec.get("options", (None, None))
    sample = Sample(
        sample_id=question_id or name,
        image_id=image_id or name,
        question=spec["question"],
        answer=spec["answer"],
        task=task,
        true_option=options[0],
        false_option=options[1],
        objects=tuple(objects),
        image_size=(scene.image_size, scene.image_size),
        extra=extra,
    )
    return SceneQuestion(sample=sample, scene=scene)


def with_ids(question: SceneQuestion, *, image_id: str, question_id: str) -> SceneQuestion:
    """The same question under other ids."""
    return replace(question, sample=replace(question.sample, image_id=image_id, sample_id=question_id))
