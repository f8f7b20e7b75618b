"""The organism's training pieces: batch encoding equals the processor's, loss targets are right, training runs."""

from __future__ import annotations

import json

import pytest
import torch

from vlmflow.data.sample import TaskType
from vlmflow.data.scene_questions import scene_question
from vlmflow.data.scene_sets import task_questions
from vlmflow.data.scenes import COLORS, SHAPES, Scene, SceneShape
from vlmflow.organism.build import TEMPLATE, OrganismShape, build_organism
from vlmflow.organism.encode import BatchEncoder
from vlmflow.organism.train import patch_targets, word_targets
from vlmflow.prompts import get_template


@pytest.fixture(scope="module")
def encoder():
    _, processor = build_organism(OrganismShape(layers=1, hidden=32, intermediate=64, vision_hidden=32))
    return BatchEncoder(processor, get_template(TEMPLATE))


def test_batch_encoding_is_the_processors(encoder):
    questions = [q for task in TaskType for q in task_questions(task, 3, seed=9)]
    encoder.check_against_processor(questions)
    batch = encoder.encode(questions, with_answers=True)
    tokens = encoder.tokenizer.convert_ids_to_tokens
    for row, question in enumerate(questions):
        last = int(batch.last[row])
        assert tokens(int(batch.input_ids[row, last])) == ":"  # "... ASSISTANT:"
        assert tokens(int(batch.input_ids[row, last + 1])) == question.sample.answer.capitalize()
        assert (batch.input_ids[row, last + 2 :] == encoder.pad_id).all()
        assert (batch.input_ids[row] == encoder.image_token_id).sum() == 16


def test_encoding_check_catches_a_different_image(encoder):
    question = task_questions(TaskType.QUERY_ATTR, 1, seed=9)[0]
    other = task_questions(TaskType.QUERY_ATTR, 2, seed=9)[1]
    swapped = type(question)(sample=question.sample, scene=other.scene)
    encoder.check_against_processor([swapped])  # consistent: both sides render the same scene
    encoder._a = encoder._a * 1.01  # noqa: SLF001 - a wrong normalisation must be caught
    try:
        with pytest.raises(AssertionError, match="pixel values"):
            encoder.check_against_processor([question])
    finally:
        encoder._a = encoder._a / 1.01  # noqa: SLF001


def test_patch_targets_label_each_cell():
    scene = Scene((SceneShape("star", "blue", "small", 2, 1, 8, 3, 3, "0"),))
    targets = patch_targets([scene])
    cell = 2 * 4 + 1
    assert targets["shape"][0, cell] == SHAPES.index("star") + 1
    assert targets["color"][0, cell] == list(COLORS).index("blue")
    assert targets["shape"][0].tolist().count(0) == 15  # every other cell is empty
    assert targets["color"][0, 0] == -100
    assert targets["col"][0].tolist() == [c % 4 for c in range(16)]
    assert targets["row"][0].tolist() == [c // 4 for c in range(16)]


def _labels(encoder, question):
    batch = encoder.encode([question], with_answers=False)
    shape_ids = {encoder.tokenizer.convert_tokens_to_ids(s): s for s in SHAPES}
    color_ids = {encoder.tokenizer.convert_tokens_to_ids(c): c for c in COLORS}
    rows, positions, labels = word_targets(batch, shape_ids, color_ids)
    words = encoder.tokenizer.convert_ids_to_tokens(batch.input_ids[0, positions].tolist())
    return words, {k: v.tolist() for k, v in labels.items()}


def test_word_targets_describe_the_named_objects(encoder):
    question = next(q for i in range(50) if (q := scene_question(TaskType.CHOOSE_REL, 0, i)).sample.answer == "left")
    subject, reference = (question.scene.find(o.name) for o in reversed(question.sample.objects))
    words, labels = _labels(encoder, question)
    assert words == [subject.shape, reference.shape]  # "Is the <subject> to the ... of the <reference>?"
    assert labels["present"] == [1, 1]
    assert labels["col"] == [subject.col, reference.col]
    assert labels["color"] == [list(COLORS).index(subject.color), list(COLORS).index(reference.color)]
    # the reference is right of the subject, so it is not left of the previously named shape
    assert labels["left_of_previous"] == [-100, 0]
    assert labels["same_color_as_previous"] == [-100, int(subject.color == reference.color)]
    assert labels["has_named_color"] == [-100, -100]  # no colour word in a ChooseRel question


def test_word_targets_mark_absent_shapes_and_the_named_colour(encoder):
    question = next(
        q for i in range(100) if (q := scene_question(TaskType.CHOOSE_CAT, 0, i)).scene.find(q.sample.false_option) is None
    )
    words, labels = _labels(encoder, question)
    truth = [int(w == question.sample.answer) for w in words]
    assert sorted(words) == sorted([question.sample.answer, question.sample.false_option])
    assert labels["present"] == truth
    assert labels["has_named_color"] == truth  # "Which shape is red, ...": only the answer is red
    assert -100 in labels["color"]


def test_organism_train_command_writes_a_loadable_checkpoint(tmp_path):
    from vlmflow.cli.main import main
    from vlmflow.loading import load_model

    out = tmp_path / "organism"
    args = ["organism", "train", "--out", str(out), "--steps", "3", "--vision-steps", "2", "--eval-per-task", "2"]
    assert main(args) == 0
    record = json.loads((out / "organism.json").read_text())
    assert record["recipe"]["steps"] == 3 and record["held_out"]["per_task"] == 2
    assert set(record["held_out"]["accuracy"]) == {t.value for t in TaskType} | {"all"}
    assert "vision step 0" in (out / "train.log").read_text()
    loaded = load_model(out, device="cpu", dtype="float32")
    assert loaded.template.name == TEMPLATE and loaded.n_layers == OrganismShape().layers
    with torch.no_grad():
        question = task_questions(TaskType.CHOOSE_ATTR, 1, seed=1)[0]
        from vlmflow.experiments.prepare import prepare_sample

        prepared = prepare_sample(loaded, question.sample, question.scene.render())
        assert torch.isfinite(loaded.model(**prepared.encoded.inputs).logits).all()
