from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

import pytest

from vlmflow.data.csvio import LAYOUTS, RowError, object_prefixes, read_task_csv, write_task_csv
from vlmflow.data.datasets import released_file
from vlmflow.data.sample import Box, Sample, SceneObject, TaskType
from vlmflow.errors import ConfigError

RELEASED_ROWS = {
    TaskType.CHOOSE_ATTR: 1000,
    TaskType.CHOOSE_CAT: 1000,
    TaskType.CHOOSE_REL: 964,
    TaskType.COMPARE_ATTR: 570,
    TaskType.LOGICAL_OBJ: 991,
    TaskType.QUERY_ATTR: 1000,
}


def _released(task: TaskType):
    with resources.as_file(released_file(task)) as path:
        return read_task_csv(path), Path(path).read_bytes()


@pytest.mark.parametrize("task", list(TaskType), ids=str)
def test_reads_every_released_file(task):
    result, raw = _released(task)
    assert result.errors == []
    assert result.task is task
    assert len(result.samples) == RELEASED_ROWS[task]
    n_objects = 1 if task in (TaskType.CHOOSE_ATTR, TaskType.CHOOSE_CAT, TaskType.QUERY_ATTR) else 2
    rows = list(csv.DictReader(raw.decode("utf-8").splitlines(keepends=True)))
    for sample, row in zip(result.samples, rows, strict=True):
        assert sample.task is task
        assert sample.sample_id == row["question_id"]  # a string: leading zeros survive
        assert sample.image_size == (int(row["image_w"]), int(row["image_h"]))
        assert len(sample.objects) == n_objects
        assert sample.objects[0].box is not None
        assert (sample.true_option is not None) == task.is_choose
        if task.is_choose:
            assert sample.true_option == row["true option"] and sample.false_option == row["false option"]
        assert sample.extra["operations"] == row["operations"]
        assert not set(sample.extra) & {"question_id", "image_w", "true option", "object1 x", "central object y"}


def test_released_ids_keep_leading_zeros():
    result, _ = _released(TaskType.CHOOSE_CAT)
    assert "00556075" in {s.sample_id for s in result.samples}


def test_logical_obj_absent_second_object_has_no_box():
    result, _ = _released(TaskType.LOGICAL_OBJ)
    absent = [s for s in result.samples if s.objects[1].box is None]
    assert len(absent) == 910  # "-" in the released file
    assert all(s.objects[1].object_id is None and s.objects[1].name for s in absent)
    assert all(len(s.boxes) == 1 for s in absent)


@pytest.mark.parametrize("task", list(TaskType), ids=str)
def test_released_files_round_trip_byte_for_byte(task, tmp_path):
    result, raw = _released(task)
    out = tmp_path / f"copy_{task.value}.csv"
    write_task_csv(result.samples, out)
    assert out.read_bytes() == raw


def _sample(task: TaskType, sample_id: str = "0042", **changes) -> Sample:
    objects = {
        1: (SceneObject("cup", "7", Box(1.5, 2, 3, 4.25)),),
        2: (SceneObject("cup", "7", Box(1.5, 2, 3, 4.25)), SceneObject("plate", "8", Box(0, 0, 10, 12))),
    }[1 if task in (TaskType.CHOOSE_ATTR, TaskType.CHOOSE_CAT, TaskType.QUERY_ATTR) else 2]
    fields = dict(
        sample_id=sample_id,
        image_id="img9",
        question="Is the cup, \"white\" or black?\n(really)",
        answer="white",
        task=task,
        true_option="white" if task.is_choose else None,
        false_option="black" if task.is_choose else None,
        objects=objects,
        image_size=(40, 30),
        extra={"operations": "[]", "my column": "kept, too"},
    )
    fields.update(changes)
    return Sample(**fields)


@pytest.mark.parametrize("task", list(TaskType), ids=str)
def test_typed_fields_round_trip(task, tmp_path):
    samples = [_sample(task), _sample(task, "17", image_size=(500, 375))]
    path = tmp_path / "anything.csv"
    write_task_csv(samples, path)
    back = read_task_csv(path, task)
    assert back.errors == []
    assert back.samples == samples
    assert [dict(s.extra) for s in back.samples] == [{**_blank_layout(task), **dict(s.extra)} for s in samples]
    with path.open(newline="") as handle:
        header = next(csv.reader(handle))
    assert header == [*LAYOUTS[task], "my column"]


def _blank_layout(task: TaskType) -> dict[str, str]:
    """The layout's untyped columns, empty (what a sample without those extras reads back as)."""
    typed = {"question_id", "img_id", "question", "answer", "image_w", "image_h"}
    if task.is_choose:
        typed |= {"true option", "false option"}
    typed |= {f"{p} {k}" for p in object_prefixes(task) for k in ("name", "id", "x", "y", "w", "h")}
    return {c: "" for c in LAYOUTS[task] if c not in typed}


def test_logical_obj_without_second_object_round_trips(tmp_path):
    one = _sample(TaskType.LOGICAL_OBJ, objects=(SceneObject("grass", "3", Box(0, 0, 5, 5)),))
    absent = _sample(TaskType.LOGICAL_OBJ, "2", objects=(SceneObject("grass", "3", Box(0, 0, 5, 5)), SceneObject("mud")))
    path = tmp_path / "x_LogicalObj.csv"
    write_task_csv([one, absent], path)
    assert read_task_csv(path).samples == [one, absent]


BAD_CSV_ROWS = [
    # (row text, expected reason fragment)
    ('1,img,"Is it, a cat or a dog?",cat,cat,dog,this,5,objThisChoose,cat,choose,[],"a caption\nover two lines",10,10,5,5,0,0', None),
    ("2,img,Q?,cat,cat,dog,this,5,objThisChoose,cat,choose,[],,10,10,5,5,0", "expected 19 fields, found 18"),
    ("3,img,Q?,cat,cat,dog,this,5,objThisChoose,cat,choose,[],,10,ten,5,5,0,0", "image_h 'ten' is not a positive integer"),
    ("4,img,Q?,cat,cat,dog,this,5,objThisChoose,cat,choose,[],,10,10,5,abc,0,0", "central object h 'abc' is not a number"),
    ("5,img,Q?,cat,cat,dog,this,5,objThisChoose,cat,choose,[],,10,10,-,-,-,-", "has no box"),
    ("6,img,Q?,cat,cat,dog,this,5,objThisChoose,cat,choose,[],,10,10,5,5,0,-", "box lacks central object y"),
    ("1,img,Q?,cat,cat,dog,this,5,objThisChoose,cat,choose,[],,10,10,5,5,0,0", "duplicate question_id '1' (first on line 2)"),
    ("7,img,,cat,cat,dog,this,5,objThisChoose,cat,choose,[],,10,10,5,5,0,0", "empty question"),
    ("8,img,Q?,cat,cat,dog,,5,objThisChoose,cat,choose,[],,10,10,5,5,0,0", "empty central object name"),
    ("9,img,Q?,cat,cat,dog,this,5,objThisChoose,cat,choose,[],,10,10,5,5,0,nan", "not finite"),
    ("10,img,Q?,cat,,,this,5,objThisChoose,cat,choose,[],,10,10,5,5,0,0", None),
]


def test_malformed_rows_are_reported_with_their_line(tmp_path):
    path = tmp_path / "mixed_ChooseCat.csv"
    lines = [",".join(LAYOUTS[TaskType.CHOOSE_CAT])] + [row for row, _ in BAD_CSV_ROWS]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    result = read_task_csv(path)
    # physical lines: header 1, the first row spans 2-3 (its caption has a newline), then one each
    expected_lines = [2] + list(range(4, 4 + len(BAD_CSV_ROWS) - 1))
    bad = [(line, reason) for line, (_, reason) in zip(expected_lines, BAD_CSV_ROWS, strict=True) if reason]
    assert [e.line for e in result.errors] == [line for line, _ in bad]
    for error, (_, reason) in zip(result.errors, bad, strict=True):
        assert isinstance(error, RowError) and reason in error.reason
    assert [s.sample_id for s in result.samples] == ["1", "10"]
    assert result.samples[0].extra["captions"] == "a caption\nover two lines"
    assert (result.samples[1].true_option, result.samples[1].false_option) == (None, None)


def test_task_is_inferred_from_columns_and_types(tmp_path):
    for task in (TaskType.CHOOSE_CAT, TaskType.CHOOSE_ATTR, TaskType.CHOOSE_REL, TaskType.QUERY_ATTR):
        write_task_csv([_sample(task)], tmp_path / "plain.csv")  # ChooseAttr's layout holds ChooseCat's
        assert read_task_csv(tmp_path / "plain.csv").task is task
    # a generator's minimal file: only the typed columns
    minimal = tmp_path / "minimal.csv"
    minimal.write_text(
        "question_id,img_id,question,answer,image_w,image_h,central object name,central object id,"
        "central object x,central object y,central object w,central object h\n"
        "s1,im1,On which side is the cup?,left,40,30,cup,-,1,2,3,4\n",
        encoding="utf-8",
    )
    result = read_task_csv(minimal)
    assert result.task is TaskType.QUERY_ATTR
    assert result.samples[0].objects == (SceneObject("cup", None, Box(1, 2, 3, 4)),)
    # CompareAttr and LogicalObj share a layout: the rows' GQA types decide
    for task, types in ((TaskType.COMPARE_ATTR, ("compare", "attr")), (TaskType.LOGICAL_OBJ, ("logical", "obj"))):
        sample = _sample(task, extra={"type_structural": types[0], "type_semantic": types[1]})
        write_task_csv([sample], tmp_path / "pair.csv")
        assert read_task_csv(tmp_path / "pair.csv").task is task
    write_task_csv([_sample(TaskType.COMPARE_ATTR)], tmp_path / "untyped.csv")
    with pytest.raises(ConfigError, match="cannot tell the task"):
        read_task_csv(tmp_path / "untyped.csv")


def test_file_problems_raise_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_task_csv(tmp_path / "missing.csv")
    empty = tmp_path / "empty_QueryAttr.csv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="no header"):
        read_task_csv(empty)
    short = tmp_path / "short_QueryAttr.csv"
    short.write_text("question_id,img_id,question,answer\n1,2,Q?,left\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="central object x"):
        read_task_csv(short)


def test_write_refuses_what_the_layout_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="one task"):
        write_task_csv([_sample(TaskType.CHOOSE_CAT), _sample(TaskType.QUERY_ATTR)], tmp_path / "x.csv")
    with pytest.raises(ValueError, match="objects"):
        write_task_csv([_sample(TaskType.CHOOSE_REL, objects=(SceneObject("cup", "7", Box(0, 0, 1, 1)),))], tmp_path / "x.csv")
    with pytest.raises(ValueError, match="image_size"):
        write_task_csv([_sample(TaskType.QUERY_ATTR, image_size=None)], tmp_path / "x.csv")
