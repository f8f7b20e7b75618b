from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from PIL import Image

from vlmflow.cli.main import main
from vlmflow.data.csvio import read_task_csv
from vlmflow.data.datasets import load_samples
from vlmflow.data.gqa import (
    PAPER_SELECTIONS,
    ProgramError,
    build_sample,
    build_tasks,
    load_questions,
    load_scene_graphs,
    program_fields,
    task_of,
    write_tasks,
)
from vlmflow.data.sample import Box, Sample, SceneObject, TaskType

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "gqa"
QUESTIONS = FIXTURES / "val_balanced_questions.json"
GRAPHS = FIXTURES / "val_sceneGraphs.json"


def _as_gqa(sample: Sample) -> tuple[dict, dict]:
    """A released row turned back into a GQA question and a scene graph holding only its objects."""
    types = {k: sample.extra[f"type_{k}"] for k in ("structural", "semantic", "detailed")}
    question = {
        "imageId": sample.image_id,
        "question": sample.question,
        "answer": sample.answer,
        "fullAnswer": sample.extra.get("full answer", ""),
        "types": types,
        "semantic": ast.literal_eval(sample.extra["operations"]),
    }
    attributes = [a.strip() for a in sample.extra.get("central object attributes", "").split(",") if a.strip()]
    objects = {
        o.object_id: {"name": o.name, "x": o.box.x, "y": o.box.y, "w": o.box.w, "h": o.box.h,
                      "attributes": attributes, "relations": []}
        for o in sample.objects
        if o.box is not None
    }
    width, height = sample.image_size
    return question, {"width": width, "height": height, "objects": objects}


@pytest.mark.parametrize("task", list(TaskType), ids=str)
def test_released_rows_rederive_from_their_own_programs(task):
    result, _ = load_samples(f"gqa:{task.value}")
    for sample in result.samples:
        question, graph = _as_gqa(sample)
        assert task_of(question["types"]) is task
        fields = program_fields(task, question["semantic"], sample.answer)
        assert fields.objects == tuple((o.name, o.object_id) for o in sample.objects)
        assert (fields.true_option, fields.false_option) == (sample.true_option, sample.false_option)
        rebuilt = build_sample(sample.sample_id, question, graph, task)
        assert rebuilt == sample
        for column in ("operations", "type_detailed", "type_semantic", "type_structural", "question word",
                       "operation_1", "operation_2", "full answer", "central object question attribute",
                       "central object attributes"):
            assert rebuilt.extra.get(column) == sample.extra.get(column), column


def _fixture_report(**kwargs):
    return build_tasks(load_questions([QUESTIONS]), load_scene_graphs(GRAPHS), **kwargs)


def test_builder_reproduces_released_rows_from_gqa_files():
    report = _fixture_report()
    released = {s.sample_id: s for t in TaskType for s in load_samples(f"gqa:{t.value}")[0].samples}
    reproduced = 0
    for task, samples in report.samples.items():
        for sample in samples:
            if sample.sample_id in released:
                assert sample == released[sample.sample_id]
                assert sample.task is task
                reproduced += 1
    assert reproduced == sum(1 for qid in json.loads(QUESTIONS.read_text()) if qid in released)
    assert reproduced >= 30  # every detailed type of every task is in the fixture


def test_builder_selects_by_type_and_explains_skips():
    raw = json.loads(QUESTIONS.read_text())
    loaded = load_questions([QUESTIONS])
    assert "h-poschoose" in raw and "h-poschoose" not in loaded  # positionChoose is not ChooseAttr
    assert "h-verify" not in loaded
    report = _fixture_report()
    expected_skips = {
        TaskType.CHOOSE_ATTR: {"several objects": 1, "unexpected program": 1},
        TaskType.CHOOSE_CAT: {"answer not an option": 1},
        TaskType.CHOOSE_REL: {},
        TaskType.COMPARE_ATTR: {},
        TaskType.LOGICAL_OBJ: {"no object in image": 1},
        TaskType.QUERY_ATTR: {"object not in scene graph": 1, "no scene graph": 1},
    }
    for task in TaskType:
        n_typed = sum(1 for q in raw.values() if PAPER_SELECTIONS[task].matches(q["types"]))
        assert report.matched[task] == n_typed
        assert dict(report.skipped[task]) == expected_skips[task]
        assert len(report.samples[task]) == n_typed - sum(expected_skips[task].values())


def test_builder_hand_written_rows():
    built = {s.sample_id: s for samples in _fixture_report().samples.values() for s in samples}
    cup = SceneObject("cup", "101", Box(10, 20, 30, 40))
    rel = built["h-rel-o"]  # "o": the named object is the relation's object; options are still the relations
    assert rel.objects == (cup, SceneObject("table", "102", Box(0, 200, 640, 280)))
    assert (rel.true_option, rel.false_option, rel.image_size) == ("right", "left", (640, 480))
    common = built["h-common"]
    assert [o.name for o in common.objects] == ["cup", "table"] and common.extra["question word"] == "common"
    swapped = built["h-or-swap"]  # the first select is absent: the present object becomes object1
    assert swapped.objects == (cup, SceneObject("bowl", None, None))


def test_program_errors_name_the_problem():
    prog = [{"operation": "select", "dependencies": [], "argument": "people (1,2)"},
            {"operation": "choose pose", "dependencies": [0], "argument": "standing|sitting"}]
    with pytest.raises(ProgramError, match="names 2 objects"):
        program_fields(TaskType.CHOOSE_ATTR, prog, "standing")
    with pytest.raises(ProgramError, match="expects a final query; got select -> choose pose"):
        program_fields(TaskType.QUERY_ATTR, prog, "left")
    with pytest.raises(ProgramError, match="'table' is not one of the options"):
        program_fields(TaskType.CHOOSE_ATTR, [{**prog[0], "argument": "cup (3)"}, prog[1]], "table")


def test_sampling_is_seeded_and_bounded():
    everything = _fixture_report().samples
    first = _fixture_report(max_per_task=3, seed=0).samples
    again = _fixture_report(max_per_task=3, seed=0).samples
    other = _fixture_report(max_per_task=3, seed=1).samples
    assert first == again
    assert first != other
    for task, samples in first.items():
        assert len(samples) == min(3, len(everything[task]))
        order = [s.sample_id for s in everything[task]]
        assert [order.index(s.sample_id) for s in samples] == sorted(order.index(s.sample_id) for s in samples)


def test_written_files_read_back(tmp_path):
    report = _fixture_report()
    written = write_tasks(report, tmp_path, "val")
    assert {p.name for p in written.values()} == {PAPER_SELECTIONS[t].file_name("val") for t in TaskType}
    for task, path in written.items():
        back = read_task_csv(path)
        assert back.task is task and back.errors == []
        assert back.samples == report.samples[task]


@pytest.mark.slow  # a CLI subprocess: over 3 s
def test_cli_build_and_stats(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    graphs = json.loads(GRAPHS.read_text())
    ids = sorted(graphs)
    for image_id in ids[1:]:
        g = graphs[image_id]
        Image.new("RGB", (g["width"], g["height"])).save(images / f"{image_id}.png")
    wrong = images / f"{ids[1]}.png"
    Image.new("RGB", (7, 7)).save(wrong)
    out = tmp_path / "tasks"
    code = main(["gqa", "build", "-q", str(QUESTIONS), "-g", str(GRAPHS), "-o", str(out), "--images", str(images)])
    text = capsys.readouterr().out
    assert code == 0
    assert "image: " in text  # missing image and wrong size are skip reasons
    files = sorted(out.glob("GQA_val_question_with_*.csv"))
    assert len(files) == 6
    kept = [s.image_id for f in files for s in read_task_csv(f).samples]
    every = [s.image_id for samples in _fixture_report().samples.values() for s in samples]
    assert sorted(kept) == sorted(i for i in every if i not in (ids[0], ids[1]))
    assert len(kept) < len(every)
    code = main(["gqa", "stats", "gqa:QueryAttr", str(files[0])])
    text = capsys.readouterr().out
    assert code == 0 and "QueryAttr" in text and "1000" in text and "576 image tokens" in text
    assert main(["gqa", "stats", "gqa:Nope"]) == 2
    assert main(["gqa", "build", "-q", str(tmp_path / "no.json"), "-g", str(GRAPHS), "-o", str(out)]) == 2
