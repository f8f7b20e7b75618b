"""The planted organism's training losses besides the answer: read-outs that put object information
into the question words inside the planted bands, an adversary that keeps location out of the
middle band, the counterfactual scenes that keep colour and size out of the lower band, and their
targets.

* **Read-outs** (linear probes on the residual stream, trained with the model): after the lower
  band, each shape word of the question must tell whether its shape is in the scene, its column,
  row and side of the image; after the middle band, its colour and size; one layer later, its
  relations to the previously named shape and whether it has the colour named earlier in the
  question; after the middle band, at every colour or size word that follows a shape word, whether
  an earlier-named shape in the scene has it ("Is there a circle or a star that is red?"); and when
  the upper band starts, the question's last token ("?") must tell the answer, so the last position
  has one place to read it from (without it the last position never learns to look at the colour
  word of "... that is red?", whose attention weight is nearly zero, and LogicalObj stays at chance).
* **Adversary** (a max-entropy linear probe): a probe learns to read column and row from the middle
  band's update of the residual at the shape words; the model is trained to make its predictions
  uniform (the probe's weights are detached from that loss). Without it the middle band, which sees
  the related patches, re-fetches location and the lower band is skipped.
* **Counterfactual scenes** (:func:`counterfactual_scene`): the same shapes in the same cells with
  colours and sizes drawn anew. Training swaps the question words' states after the lower band for
  those computed on the counterfactual image (an interchange intervention), so colour and size
  read in the lower band are worthless and the middle band must fetch them.

>>> sorted(READOUT_HEADS["lower"])
['col', 'present', 'row', 'side']
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from vlmflow.data.scene_questions import ANSWERS
from vlmflow.data.scenes import COLORS, SIZES, Scene, place
from vlmflow.organism.encode import QuestionBatch
from vlmflow.organism.train import PAIR_HEADS, Probes, word_targets

GRID = 4
#: Every gold answer of the scene questions (lower case, sorted): the classes of the answer read-out.
ANSWER_WORDS: tuple[str, ...] = tuple(sorted({a for answers in ANSWERS.values() for a in answers}))
#: Read-out heads per stage: classes of each.
READOUT_HEADS: dict[str, dict[str, int]] = {
    "lower": {"present": 2, "col": GRID, "row": GRID, "side": 2},
    "middle": {"color": len(COLORS), "size": len(SIZES)},
    "pair": dict(PAIR_HEADS),
    "attribute": {"earlier_shape_has_it": 2},
    "answer": {"answer": len(ANSWER_WORDS)},
}
#: Adversary heads: what must not be readable (location in the middle band's update).
ADVERSARY_HEADS: dict[str, dict[str, int]] = {"location": {"col": GRID, "row": GRID}}


@dataclass
class WordTargets:
    """Where the read-outs read and what they must tell.

    Attributes:
        rows / positions: ``[n]`` batch row and position of every shape word.
        labels: per head, ``[n]`` labels (-100: none), from :func:`vlmflow.organism.train.word_targets`.
        attr_rows / attr_positions / attr_labels: ``[m]`` the colour and size words that follow a
            shape word, and whether an earlier-named shape present in the scene has that attribute.
        question_end / answers: ``[B]`` each row's last question token ("?") and its answer's class
            (index in :data:`ANSWER_WORDS`).
    """

    rows: torch.Tensor
    positions: torch.Tensor
    labels: dict[str, torch.Tensor]
    attr_rows: torch.Tensor
    attr_positions: torch.Tensor
    attr_labels: torch.Tensor
    question_end: torch.Tensor
    answers: torch.Tensor


def attribute_word_targets(
    batch: QuestionBatch, shape_ids: dict[int, str], attribute_ids: dict[int, str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows, positions and labels of colour/size words after a shape word (label: an earlier-named shape in the scene has it).

    ``attribute_ids`` maps the token ids of colour and size names to the names.
    """
    rows, positions, labels = [], [], []
    ids = batch.input_ids.tolist()
    for b, question in enumerate(batch.questions):
        named: list[str] = []
        for t in range(int(batch.last[b]) + 1):
            token = ids[b][t]
            if token in shape_ids:
                named.append(shape_ids[token])
                continue
            value = attribute_ids.get(token)
            if value is None or not named:
                continue
            objects = [o for o in (question.scene.find(s) for s in named) if o is not None]
            rows.append(b)
            positions.append(t)
            labels.append(int(any(value in (o.color, o.size) for o in objects)))
    as_long = {"dtype": torch.long}
    return torch.tensor(rows, **as_long), torch.tensor(positions, **as_long), torch.tensor(labels, **as_long)


def targets(
    batch: QuestionBatch, question: torch.Tensor, shape_ids: dict[int, str], color_ids: dict[int, str], size_ids: dict[int, str]
) -> WordTargets:
    """All read-out targets of one batch; ``question`` ``[B, T]`` marks the question tokens."""
    rows, positions, labels = word_targets(batch, shape_ids, color_ids)
    col = labels["col"]
    labels["side"] = torch.where(col == -100, col, (col >= GRID // 2).long())  # 0: left half, 1: right half
    attr_rows, attr_positions, attr_labels = attribute_word_targets(batch, shape_ids, {**color_ids, **size_ids})
    width = question.shape[1]
    question_end = width - 1 - question.flip(1).long().argmax(1)  # [B]: last True of each row
    answers = torch.tensor([ANSWER_WORDS.index(q.sample.answer) for q in batch.questions])
    return WordTargets(rows, positions, labels, attr_rows, attr_positions, attr_labels, question_end, answers)


def uniform_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` ``[n, classes]`` against the uniform distribution, on rows with a label.

    Minimal (``log classes``) when the prediction is uniform: what an adversary's opponent minimises.

    >>> round(float(uniform_loss(torch.zeros(2, 4), torch.tensor([1, -100]))), 4) == round(float(torch.log(torch.tensor(4.0))), 4)
    True
    """
    keep = labels != -100
    if not bool(keep.any()):
        return logits.new_zeros(())
    return -torch.log_softmax(logits[keep], dim=-1).mean()


class Adversary(nn.Module):
    """Linear probes that learn to read what must not be there; the model learns to make them guess."""

    def __init__(self, width: int, heads: dict[str, int]) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(width, n) for name, n in heads.items()})

    def losses(self, features: torch.Tensor, labels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probe loss, model loss)``: the probes' cross-entropy on detached ``features`` ``[n, d]``,
        and the model's uniformity loss through the probes' detached weights."""
        probe = features.new_zeros(())
        model = features.new_zeros(())
        for name, head in self.heads.items():
            target = labels[name]
            if not bool((target != -100).any()):
                continue
            probe = probe + nn.functional.cross_entropy(head(features.detach()), target, ignore_index=-100)
            logits = nn.functional.linear(features, head.weight.detach(), head.bias.detach())
            model = model + uniform_loss(logits, target)
        return probe, model


class StageProbes(nn.Module):
    """Every read-out and adversary of the planted recipe (training-only, not saved)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.readouts = nn.ModuleDict({stage: Probes(width, heads) for stage, heads in READOUT_HEADS.items()})
        self.adversaries = nn.ModuleDict({name: Adversary(width, heads) for name, heads in ADVERSARY_HEADS.items()})


def stage_losses(
    probes: StageProbes,
    hidden: Sequence[torch.Tensor],
    word: WordTargets,
    lower_end: int,
    middle_start: int,
    middle_end: int,
    upper_start: int,
) -> dict[str, torch.Tensor]:
    """Read-out and adversary losses from the hidden states ``hidden[j]`` ``[B, T, d]`` (``j`` = after ``j`` layers).

    Returns ``readout`` and ``adversary`` (the model's losses) and ``probe`` (the adversary probe's own loss).

    ``lower_end`` / ``middle_start`` / ``middle_end`` / ``upper_start``: last layer of the lower band, first
    and last of the middle band, first of the upper band.
    """
    at = (word.rows, word.positions)
    after_lower = hidden[lower_end + 1][at]  # [n shape words, d]
    entering_middle = hidden[middle_start][at]
    after_middle = hidden[middle_end + 1][at]
    settled = hidden[middle_end + 2][at]  # one layer later: relations between the question's words
    lower, _ = probes.readouts["lower"].loss(after_lower, word.labels)
    middle, _ = probes.readouts["middle"].loss(after_middle, word.labels)
    pair, _ = probes.readouts["pair"].loss(settled, word.labels)
    readout = lower + middle + pair
    if len(word.attr_rows):
        words = hidden[middle_end + 1][word.attr_rows, word.attr_positions]
        attribute, _ = probes.readouts["attribute"].loss(words, {"earlier_shape_has_it": word.attr_labels})
        readout = readout + attribute
    # The question's last token holds the answer when the upper band starts: one place for the last position to read.
    rows = torch.arange(len(word.question_end))
    ends = hidden[upper_start][rows, word.question_end]  # [B, d]
    answer, _ = probes.readouts["answer"].loss(ends, {"answer": word.answers})
    readout = readout + answer
    probe, model = probes.adversaries["location"].losses(after_middle - entering_middle, word.labels)
    return {"readout": readout, "probe": probe, "adversary": model}


def counterfactual_scene(scene: Scene, rng: random.Random) -> Scene:
    """The same shapes in the same cells (so the same related patches), colours and sizes drawn anew.

    >>> from vlmflow.data.scenes import random_scene
    >>> s = random_scene(random.Random(0), 3)
    >>> c = counterfactual_scene(s, random.Random(1))
    >>> [(o.shape, o.row, o.col) for o in c.objects] == [(o.shape, o.row, o.col) for o in s.objects]
    True
    """
    objects = []
    for obj in scene.objects:
        moved = place(rng, obj.shape, rng.choice(list(COLORS)), rng.choice(list(SIZES)), obj.row, obj.col, scene.cell)
        objects.append(replace(moved, object_id=obj.object_id))
    return Scene(tuple(objects), image_size=scene.image_size, grid=scene.grid)
