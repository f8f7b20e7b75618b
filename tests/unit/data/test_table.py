"""The minimal question table (CSV or JSONL): four required columns, optional ones typed, the rest kept
for col:NAME; a bad row is an error row, a file without the required columns is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmflow.data.datasets import is_released_layout, load_samples
from vlmflow.data.sample import Box, SceneObject, TaskType
from vlmflow.data.table import read_table
from vlmflow.errors import ConfigError


def test_a_csv_with_the_four_columns_is_read_and_extra_columns_kept(tmp_path: Path):
    path = tmp_path / "mine.csv"
    path.write_text(
        "question_id,img_id,question,answer,task,options,object,box,target,image_w,image_h\n"
        "q1,cat.jpg,Is the cat black or white?,white,ChooseAttr,white|black,cat,\"4, 5, 10, 12\",sofa,40,30\n"
        "q2,dog,What is it?,a dog,captioning,,,,,,\n"
    )
    result, task = load_samples(path)
    assert result.errors == [] and task == ""
    one, two = result.samples
    assert (one.sample_id, one.image_id, one.task, one.true_option, one.false_option) == ("q1", "cat", TaskType.CHOOSE_ATTR, "white", "black")
    assert one.objects == (SceneObject("cat", None, Box(4, 5, 10, 12)),) and one.image_size == (40, 30)
    assert one.column("target") == "sofa" and one.column("true option") == "white"
    assert two.task is None and two.task_name == "captioning" and two.objects == () and two.true_option is None


def test_jsonl_rows_may_hold_lists_and_objects(tmp_path: Path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"id": "a", "image": "x.png", "question": "Where is the ball?", "answer": "left", "options": ["left", "right"],
         "objects": [{"name": "ball", "box": [1, 2, 3, 4]}, {"name": "ghost", "box": None}], "note": {"k": 1}},
        {"question_id": "b", "img_id": "y", "question": "Q?", "answer": "A", "true_option": "A", "false_option": "B"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    result = read_table(path)
    a, b = result.samples
    assert a.image_id == "x" and (a.true_option, a.false_option) == ("left", "right")
    assert a.objects == (SceneObject("ball", None, Box(1, 2, 3, 4)), SceneObject("ghost", None, None)) and a.boxes == (Box(1, 2, 3, 4),)
    assert json.loads(a.column("note")) == {"k": 1}
    assert (b.true_option, b.false_option) == ("A", "B")


def test_bad_rows_are_error_rows_with_their_line(tmp_path: Path):
    path = tmp_path / "mine.csv"
    path.write_text(
        "question_id,img_id,question,answer,box,options\n"
        "q1,i,Q?,a,\"1,2,3\",\n"
        "q2,i,,a,,\n"
        "q3,i,Q?,a,,b|c\n"
        "q4,i,Q?,a,,\n"
        "q4,i,Q?,a,,\n"
    )
    result = read_table(path)
    assert [s.sample_id for s in result.samples] == ["q4"]
    assert [(e.line, e.reason) for e in result.errors] == [
        (2, "box '1,2,3' is not one box x,y,w,h"),
        (3, "empty question"),
        (4, "options ['b', 'c'] do not include the answer 'a'"),
        (6, "duplicate question_id 'q4' (first on line 5)"),
    ]
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"question_id": "q1", "img_id": "i", "question": "Q?", "answer": "a"}\n[1, 2]\nnot json\n')
    assert [(e.line, e.reason[:20]) for e in read_table(jsonl).errors] == [(2, "not a JSON object"), (3, "not a JSON object: E")]


def test_a_table_without_the_required_columns_is_refused_naming_them(tmp_path: Path):
    path = tmp_path / "qa.csv"
    path.write_text("image,question,answer\ncat.jpg,What?,cat\n")
    with pytest.raises(ConfigError, match=r"lacks the columns \['question_id'\]; a question table needs question_id, img_id, question, answer \(docs/data.md\)"):
        load_samples(path)


def test_the_released_layout_is_still_read_as_is(tmp_path: Path):
    from vlmflow.data.csvio import write_task_csv

    result, _ = load_samples("gqa:QueryAttr")
    path = tmp_path / "copy_QueryAttr.csv"
    write_task_csv(result.samples[:3], path)
    assert is_released_layout(path)
    again, task = load_samples(path)
    assert task == "QueryAttr" and again.samples == result.samples[:3]
    plain = tmp_path / "plain.csv"
    plain.write_text("question_id,img_id,question,answer\nq,i,Q?,a\n")
    assert not is_released_layout(plain)
