"""The shipped organism: loads offline like any checkpoint, answers at its recorded accuracy, has real flows.

Skipped (with the reason) only when the package holds no organism.
"""

from __future__ import annotations

import json

import pytest
import torch

from vlmflow.aliases import resolve_model_name
from vlmflow.data.sample import TaskType
from vlmflow.data.scene_sets import task_questions
from vlmflow.organism import ALIAS, organism_path

ORGANISM = organism_path()
pytestmark = pytest.mark.skipif(
    not (ORGANISM / "config.json").is_file(),
    reason="the trained organism is not in the package (vlmflow/resources/organism has no config.json)",
)


@pytest.fixture(scope="module")
def loaded():
    from vlmflow.loading import load_model

    return load_model(ALIAS, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def record():
    return json.loads((ORGANISM / "organism.json").read_text())


def test_the_alias_names_the_packaged_checkpoint_and_loads_like_any_checkpoint(loaded):
    from transformers import LlavaForConditionalGeneration

    assert resolve_model_name(ALIAS) == str(ORGANISM)
    assert isinstance(loaded.model, LlavaForConditionalGeneration)
    assert loaded.family.family == "llava"
    assert loaded.info["model"] == str(ORGANISM)
    assert loaded.template.name == json.loads((ORGANISM / "vlmflow.json").read_text())["prompt_template"]
    assert 6 <= loaded.n_layers <= 8
    assert not any(p.requires_grad and p.grad is not None for p in loaded.model.parameters())


def test_the_shipped_checkpoint_is_small(record):
    weights = sum(p.stat().st_size for p in ORGANISM.glob("*.safetensors"))
    assert weights < 12 * 2**20
    assert record["prompt_template"] and record["recipe"]["seed"] == 0


def test_held_out_accuracy_is_the_recorded_one_and_meets_the_bar(loaded, record):
    from vlmflow.organism.encode import BatchEncoder
    from vlmflow.organism.evaluate import evaluate, held_out_questions

    held_out = record["held_out"]
    table = evaluate(loaded.model, BatchEncoder(loaded.processor, loaded.template), held_out_questions(held_out["per_task"], held_out["seed"]))
    for task in [t.value for t in TaskType] + ["all"]:
        assert table[task]["n"] == held_out["accuracy"][task]["n"]
        assert abs(table[task]["accuracy"] - held_out["accuracy"][task]["accuracy"]) <= 2.0, task
        if task != "all":
            assert table[task]["accuracy"] >= 90.0, task


def test_the_fast_evaluator_scores_like_the_flow_experiment(loaded):
    """Greedy generation through the project's own path agrees with the batched evaluator."""
    from vlmflow.experiments.flows import FlowSettings, baseline
    from vlmflow.experiments.prepare import prepare_sample
    from vlmflow.organism.encode import BatchEncoder
    from vlmflow.organism.evaluate import predict

    questions = [q for task in TaskType for q in task_questions(task, 4, seed=77)]
    fast = predict(loaded.model, BatchEncoder(loaded.processor, loaded.template), questions)
    for question, row in zip(questions, fast, strict=True):
        prepared = prepare_sample(loaded, question.sample, question.scene.render())
        n = prepared.encoded.seq_len
        _, sample_row = baseline(loaded, prepared, FlowSettings(), capture_from=n - 1)
        assert sample_row.correct == row["correct"], question.sample.question
        assert sample_row.answer_token == row["first_token"]
        if sample_row.correct:
            assert sample_row.prediction == question.sample.answer.capitalize()  # "Red", like Vicuna


def test_the_answer_needs_the_image_and_the_question(loaded):
    """Knockouts over every layer that must matter: the image to all text after it, the question to the last position."""
    from vlmflow.experiments.prepare import prepare_sample
    from vlmflow.knockout.reference import clean_logits, reference_logits
    from vlmflow.knockout.spec import Knockout
    from vlmflow.positions.groups import Flow, Group

    layers = range(loaded.n_layers)
    image_to_text = [Flow(Group.IMAGE, target) for target in (Group.QUESTION, Group.SUFFIX, Group.LAST)]
    right = {"clean": 0, "image->text": 0, "question->last": 0}
    questions = [q for task in TaskType for q in task_questions(task, 6, seed=78)]
    for question in questions:
        prepared = prepare_sample(loaded, question.sample, question.scene.render())
        knockouts = [
            Knockout.for_flows(prepared.groups, image_to_text, layers),
            Knockout.for_flows(prepared.groups, [Flow(Group.QUESTION, Group.LAST)], layers),
            Knockout.for_flows(prepared.groups, [], layers),  # blocks nothing
        ]
        with torch.no_grad():
            base = clean_logits(loaded.decoder, prepared.encoded)
            blocked = reference_logits(loaded.decoder, prepared.encoded, knockouts)
        torch.testing.assert_close(blocked[2], base, atol=1e-5, rtol=0)
        gold = loaded.tokenizer.convert_tokens_to_ids(question.sample.answer.capitalize())
        for name, logits in zip(right, (base, blocked[0], blocked[1]), strict=True):
            right[name] += int(logits.argmax()) == gold
    # Cut off from the image (every layer, every text position), or with a last position that
    # cannot read the question, the organism answers at about chance; with both it is right.
    n = len(questions)
    assert right["clean"] >= 0.9 * n
    assert right["image->text"] <= 0.6 * n, right
    assert right["question->last"] <= 0.6 * n, right
