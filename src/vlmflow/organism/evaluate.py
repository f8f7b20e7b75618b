"""Held-out accuracy of an organism, per task type.

An answer counts as right when greedy decoding would produce exactly the gold answer: the first
generated token is the capitalised answer word and the next one is end-of-sequence (so the decoded
text, stripped and lower-cased, equals the gold answer, which is how the flow experiment scores it).

>>> table = evaluate(model, encoder, held_out_questions(50))     # doctest: +SKIP
>>> table["QueryAttr"]["accuracy"]                              # doctest: +SKIP
97.9
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vlmflow.data.sample import TaskType
from vlmflow.data.scene_questions import SceneQuestion
from vlmflow.data.scene_sets import task_questions
from vlmflow.organism.encode import BatchEncoder, QuestionBatch

#: Seed of the held-out questions (training draws from other seeds).
HELD_OUT_SEED = 999_999


def held_out_questions(per_task: int, seed: int = HELD_OUT_SEED) -> list[SceneQuestion]:
    """The first ``per_task`` questions of every task for ``seed``, tasks in :class:`TaskType` order."""
    return [q for task in TaskType for q in task_questions(task, per_task, seed)]


def answer_and_eos_logits(model: nn.Module, batch: QuestionBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[B, vocab]`` at each row's last prompt position and at its answer token.

    ``batch`` must carry the answer tokens (``encode(..., with_answers=True)``).
    """
    hidden = model.model(input_ids=batch.input_ids, pixel_values=batch.pixel_values, use_cache=False).last_hidden_state
    return logits_at_answer(model, hidden, batch.last)


def logits_at_answer(model: nn.Module, hidden: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[B, vocab]`` from final hidden states ``[B, T, d]`` at ``last`` and ``last + 1``."""
    rows = torch.arange(len(last))
    picked = torch.stack([hidden[rows, last], hidden[rows, last + 1]])  # [2, B, d]
    logits = model.lm_head(picked)
    return logits[0], logits[1]


@torch.no_grad()
def predict(model: nn.Module, encoder: BatchEncoder, questions: Sequence[SceneQuestion], batch_size: int = 200) -> list[dict[str, Any]]:
    """One row per question: task, answer, the first greedy token, and whether the answer is right."""
    was_training = model.training
    model.eval()
    rows: list[dict[str, Any]] = []
    try:
        for start in range(0, len(questions), batch_size):
            batch = encoder.encode(questions[start : start + batch_size], with_answers=True)
            first, second = answer_and_eos_logits(model, batch)
            top1 = first.argmax(-1)
            stops = second.argmax(-1) == encoder.eos_id
            for k, question in enumerate(batch.questions):
                right_token = int(top1[k]) == int(batch.answer_ids[k])
                rows.append(
                    {
                        "task": question.sample.task.value if question.sample.task else "",
                        "question": question.sample.question,
                        "answer": question.sample.answer,
                        "first_token": encoder.tokenizer.convert_ids_to_tokens(int(top1[k])),
                        "correct": bool(right_token and stops[k]),
                    }
                )
    finally:
        model.train(was_training)
    return rows


def accuracy_table(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{task: {"n", "correct", "accuracy"}}`` (accuracy in %, one decimal) plus ``"all"``.

    >>> accuracy_table([{"task": "ChooseRel", "correct": True}, {"task": "ChooseRel", "correct": False}])["ChooseRel"]
    {'n': 2, 'correct': 1, 'accuracy': 50.0}
    """
    table: dict[str, dict[str, Any]] = {}
    for key in [*dict.fromkeys(r["task"] for r in rows), "all"]:
        chosen = [r for r in rows if key in ("all", r["task"])]
        correct = sum(bool(r["correct"]) for r in chosen)
        table[key] = {"n": len(chosen), "correct": correct, "accuracy": round(100.0 * correct / max(1, len(chosen)), 1)}
    return table


def evaluate(model: nn.Module, encoder: BatchEncoder, questions: Sequence[SceneQuestion]) -> dict[str, dict[str, Any]]:
    """Accuracy per task type on ``questions`` (see :func:`accuracy_table`)."""
    return accuracy_table(predict(model, encoder, questions))


def worst_task(table: dict[str, dict[str, Any]]) -> float:
    """The lowest per-task accuracy of a table (the organism's bar is on every task)."""
    return min(v["accuracy"] for k, v in table.items() if k != "all")
