"""Train the organism from scratch on CPU, reproducibly.

The recipe (:class:`Recipe`, recorded next to the checkpoint) makes a from-scratch LLaVA learn all six
task types in a few CPU-minutes:

1. **Grid-aligned scenes**: with 64x64 images, 16-pixel patches and one object per 16-pixel cell,
   every object is seen by exactly one image token.
2. **Vision stage**: the CLIP tower and projector first learn alone, with per-patch auxiliary
   losses on the projector output (the image tokens the decoder reads): shape-or-empty, colour,
   size, column and row of the object in each patch. Cheap (no decoder) and it gives the decoder
   linearly readable object features from its first step.
3. **Question stage**: the whole model learns to answer; the loss is cross-entropy on the answer
   token and on the end-of-sequence token after it (nothing else in the prompt), plus the per-patch
   losses at a lower weight, plus **object-word losses** inside the decoder: linear read-outs of the
   residual stream at each shape word of the question ("circle") must tell, after ``bind_layer``
   decoder layers, whether that shape is in the scene and its colour, size, column and row, and one
   layer later, its relation to the previously named shape (left of it, same colour, same size)
   and whether it has the colour named earlier in the question. They give the decoder a route
   image -> question words -> last position that it finds in a few thousand steps; answer loss
   alone leaves the two-object task types at chance for a long time. Task types are drawn with
   weights that follow the last held-out accuracy (worse task types more often).
4. AdamW, linear warm-up then cosine decay; accuracy per task type on a fixed held-out set every
   ``eval_every`` steps; the checkpoint with the best worst-task accuracy is kept.

Every random draw derives from ``Recipe.seed`` (weights, scenes, task choice), so a run is
reproducible up to floating-point non-determinism of the CPU kernels.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmflow.data.sample import TaskType
from vlmflow.data.scene_questions import SceneQuestion, scene_question
from vlmflow.data.scenes import COLORS, SHAPES, SIZES, Scene, SceneShape, random_scene
from vlmflow.loading import SIDECAR
from vlmflow.organism.build import TEMPLATE, OrganismShape, build_organism
from vlmflow.organism.encode import BatchEncoder, QuestionBatch
from vlmflow.organism.evaluate import (
    HELD_OUT_SEED,
    evaluate,
    held_out_questions,
    logits_at_answer,
    worst_task,
)
from vlmflow.prompts import get_template

log = logging.getLogger(__name__)

RECIPE_FILE = "organism.json"  # the recipe and the held-out accuracy, written beside the weights
ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a training run (written to ``organism.json``).

    Attributes:
        seed: seeds the weights, the training scenes and the task draws.
        shape: the architecture.
        vision_steps / vision_batch / vision_lr: the vision stage (per-patch losses only).
        vision_position_std: initial std of the vision tower's position embeddings (0: keep
            transformers' initialisation).
        steps / batch / lr / warmup / final_lr_ratio / weight_decay: the question stage.
        aux_weight: weight of the per-patch losses during the question stage.
        bind_layer / bind_weight: the object-word loss: linear read-outs of the residual stream after
            ``bind_layer`` decoder layers, at each shape word of the question, must tell whether that
            shape is in the scene and its colour, size, column and row; one layer later, at the
            second shape word of a question, whether its object is left of the first one's and
            whether they share colour and size.
        eos_weight: weight of the end-of-sequence loss after the answer.
        eval_every / eval_per_task: held-out evaluation (questions of seed ``HELD_OUT_SEED``).
        threads: torch CPU threads.
    """

    seed: int = 0
    shape: OrganismShape = field(default_factory=OrganismShape)
    vision_steps: int = 300
    vision_batch: int = 128
    vision_lr: float = 3e-3
    vision_position_std: float = 0.5
    steps: int = 4000
    batch: int = 32
    lr: float = 1.5e-3
    warmup: int = 150
    final_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    aux_weight: float = 0.2
    bind_layer: int = 2
    bind_weight: float = 0.5
    eos_weight: float = 0.5
    eval_every: int = 250
    eval_per_task: int = 100
    threads: int = 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Probes(nn.Module):
    """Linear read-outs of hidden vectors, one classifier per attribute (training-only, not saved).

    :data:`PATCH_HEADS` read each image token: shape-or-empty, colour, size, column, row.
    :data:`WORD_HEADS` read each shape word of a question: present, colour, size, column, row.
    """

    def __init__(self, width: int, heads: dict[str, int]) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(width, n) for name, n in heads.items()})

    def loss(self, features: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Summed cross-entropy over heads; ``features`` ``[..., d]``, targets ``[...]`` (-100 = none)."""
        total = features.new_zeros(())
        parts = {}
        for name, head in self.heads.items():
            logits = head(features)  # [..., classes]
            part = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[name].reshape(-1), ignore_index=-100)
            total = total + part
            parts[name] = float(part.detach())
        return total, parts


PAIR_HEADS = {"left_of_previous": 2, "same_color_as_previous": 2, "same_size_as_previous": 2, "has_named_color": 2}


def _heads(grid: int) -> tuple[dict[str, int], dict[str, int]]:
    common = {"color": len(COLORS), "size": len(SIZES), "col": grid, "row": grid}
    return {"shape": len(SHAPES) + 1, **common}, {"present": 2, **common}


def patch_targets(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Per-patch labels ``[B, grid*grid]`` (patches in row-major order, as the vision tower orders them)."""
    grid = scenes[0].grid
    n = grid * grid
    out = {name: torch.full((len(scenes), n), -100, dtype=torch.long) for name in _heads(grid)[0]}
    out["shape"].zero_()  # class 0: empty cell
    cells = torch.arange(n)
    out["col"][:] = cells % grid
    out["row"][:] = cells // grid
    colors, sizes = list(COLORS), list(SIZES)
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            p = obj.row * grid + obj.col
            out["shape"][b, p] = SHAPES.index(obj.shape) + 1
            out["color"][b, p] = colors.index(obj.color)
            out["size"][b, p] = sizes.index(obj.size)
    return out


def word_targets(batch: QuestionBatch, shape_ids: dict[int, str], color_ids: dict[int, str]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Rows, positions and labels of every shape word in the prompts of ``batch``.

    ``shape_ids`` / ``color_ids`` map the token ids of shape / colour names to the names. Labels: ``present`` (1 when the
    scene has that shape), and the object's colour, size, column and row (-100 when absent); and
    relations to the object of the previous shape word of the same question (-100 for the first
    word, or when either object is absent or, for ``left_of_previous``, in the same column); and
    ``has_named_color``: whether the shape is in the scene in the colour named earlier in the
    question ("Which shape is red, the circle or ...": -100 when no colour word came before).
    """
    rows, positions = [], []
    labels: dict[str, list[int]] = {k: [] for k in ("present", "color", "size", "col", "row", *PAIR_HEADS)}
    colors, sizes = list(COLORS), list(SIZES)
    ids = batch.input_ids.tolist()
    for b, question in enumerate(batch.questions):
        prev: SceneShape | None = None  # object of the previous shape word (None: absent or none yet)
        named_color: str | None = None
        for t in range(int(batch.last[b]) + 1):
            shape = shape_ids.get(ids[b][t])
            if shape is None:
                named_color = color_ids.get(ids[b][t], named_color)
                continue
            obj = question.scene.find(shape)
            both = obj is not None and prev is not None
            labels["left_of_previous"].append(int(obj.col < prev.col) if both and obj.col != prev.col else -100)
            labels["same_color_as_previous"].append(int(obj.color == prev.color) if both else -100)
            labels["same_size_as_previous"].append(int(obj.size == prev.size) if both else -100)
            labels["has_named_color"].append(-100 if named_color is None else int(obj is not None and obj.color == named_color))
            prev = obj
            rows.append(b)
            positions.append(t)
            labels["present"].append(int(obj is not None))
            labels["color"].append(colors.index(obj.color) if obj else -100)
            labels["size"].append(sizes.index(obj.size) if obj else -100)
            labels["col"].append(obj.col if obj else -100)
            labels["row"].append(obj.row if obj else -100)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(positions, dtype=torch.long), {k: torch.tensor(v, dtype=torch.long) for k, v in labels.items()}


class _Capture:
    """Keeps the last output of a module (the projector: the image tokens the decoder reads)."""

    def __init__(self, module: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self.value = output

    def remove(self) -> None:
        self.handle.remove()


def lr_at(step: int, total: int, base: float, warmup: int, final_ratio: float) -> float:
    """Linear warm-up to ``base`` then cosine decay to ``base * final_ratio``.

    >>> lr_at(0, 100, 1.0, 10, 0.1), lr_at(10, 100, 1.0, 10, 0.1), round(lr_at(100, 100, 1.0, 10, 0.1), 3)
    (0.1, 1.0, 0.1)
    """
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def task_weights(table: dict[str, dict[str, Any]] | None) -> list[float]:
    """Sampling weight of each task type: uniform at first, then more for worse held-out accuracy."""
    if table is None:
        return [1.0] * len(TaskType)
    return [0.15 + (100.0 - table[t.value]["accuracy"]) / 100.0 for t in TaskType]


def training_questions(seed: int, step: int, size: int, weights: Sequence[float]) -> list[SceneQuestion]:
    """The questions of one training step (deterministic in ``seed``, ``step`` and ``weights``)."""
    rng = random.Random(f"vlmflow-organism-train:{seed}:{step}")
    tasks = rng.choices(list(TaskType), weights=weights, k=size)
    # Training seeds are 1000 + seed, far from the held-out and demo seeds.
    return [scene_question(task, 1000 + seed, step * size + i) for i, task in enumerate(tasks)]


def vision_scenes(seed: int, step: int, size: int) -> list[Scene]:
    rng = random.Random(f"vlmflow-organism-vision:{seed}:{step}")
    return [random_scene(rng, rng.randint(1, 4)) for _ in range(size)]


@dataclass
class TrainResult:
    """Where the checkpoint is, its held-out table, and the training history."""

    path: Path
    table: dict[str, dict[str, Any]]
    seconds: float
    history: list[dict[str, Any]]


def train(
    recipe: Recipe,
    out: str | Path,
    *,
    progress: ProgressCallback | None = None,
    max_minutes: float | None = None,
) -> TrainResult:
    """Train an organism with ``recipe``; write the best checkpoint to ``out`` and return its table.

    ``out`` gets the checkpoint (``save_pretrained`` of model and processor), ``vlmflow.json`` (the
    prompt template) and ``organism.json`` (the recipe, the held-out accuracy table, the training
    time and history). ``max_minutes`` stops the question stage early (the best checkpoint so far
    is kept).

    >>> result = train(Recipe(steps=2000), "organism-out")   # doctest: +SKIP
    >>> result.table["all"]["accuracy"]                       # doctest: +SKIP
    97.5
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    model, processor = build_organism(recipe.shape, seed=recipe.seed)
    if recipe.vision_position_std:
        # A larger start than transformers' 0.02 makes each patch's cell (column, row) readable early.
        with torch.random.fork_rng():
            torch.manual_seed(recipe.seed)
            nn.init.normal_(model.model.vision_tower.embeddings.position_embedding.weight, std=recipe.vision_position_std)
    model.train()
    encoder = BatchEncoder(processor, get_template(TEMPLATE))
    held_out = held_out_questions(recipe.eval_per_task)
    encoder.check_against_processor(held_out[:: max(1, len(held_out) // 12)])
    patch_heads, word_heads = _heads(recipe.shape.image_size // recipe.shape.patch_size)
    probes = nn.ModuleDict(
        {
            "patch": Probes(recipe.shape.hidden, patch_heads),
            "word": Probes(recipe.shape.hidden, word_heads),
            "pair": Probes(recipe.shape.hidden, PAIR_HEADS),
        }
    )
    session = _Session(recipe, out, model, processor, encoder, probes, _Capture(model.model.multi_modal_projector), progress)
    try:
        _vision_stage(session)
        best = _question_stage(session, held_out, max_minutes)
    finally:
        session.capture.remove()
    seconds = time.perf_counter() - session.started
    write_recipe(out, recipe, best, seconds, session.history)
    return TrainResult(path=out, table=best, seconds=seconds, history=session.history)


@dataclass
class _Session:
    """What the two stages of one training run share."""

    recipe: Recipe
    out: Path
    model: nn.Module
    processor: Any
    encoder: BatchEncoder
    probes: nn.ModuleDict
    capture: _Capture
    progress: ProgressCallback | None
    started: float = field(default_factory=time.perf_counter)
    history: list[dict[str, Any]] = field(default_factory=list)

    def report(self, done: int, message: str) -> None:
        if self.progress:
            self.progress(done, self.recipe.vision_steps + self.recipe.steps, message)


def _vision_stage(s: _Session) -> None:
    recipe, model = s.recipe, s.model
    vision = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(), *s.probes["patch"].parameters()]
    optimizer = torch.optim.AdamW(vision, lr=recipe.vision_lr, weight_decay=recipe.weight_decay)
    for step in range(recipe.vision_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe.vision_steps, recipe.vision_lr, min(50, recipe.vision_steps // 4 + 1), 0.1)
        scenes = vision_scenes(recipe.seed, step, recipe.vision_batch)
        model.model.get_image_features(pixel_values=s.encoder.pixels([scene.render() for scene in scenes]))
        loss, parts = s.probes["patch"].loss(s.capture.value, patch_targets(scenes))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == recipe.vision_steps - 1:
            log.info("vision step %d loss %.4f %s", step, loss.item(), {k: round(v, 3) for k, v in parts.items()})
            s.history.append({"stage": "vision", "step": step, "loss": round(loss.item(), 4)})
        s.report(step + 1, f"vision {loss.item():.3f}")


def _question_loss(
    s: _Session, questions: Sequence[SceneQuestion], shape_ids: dict[int, str], color_ids: dict[int, str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The question-stage loss of one batch, and its parts (answer, eos, patch, bind)."""
    recipe, model, encoder, probes = s.recipe, s.model, s.encoder, s.probes
    batch = encoder.encode(questions, with_answers=True)
    outputs = model.model(input_ids=batch.input_ids, pixel_values=batch.pixel_values, use_cache=False, output_hidden_states=True)
    first, second = logits_at_answer(model, outputs.last_hidden_state, batch.last)
    answer_loss = nn.functional.cross_entropy(first, batch.answer_ids)
    eos_loss = nn.functional.cross_entropy(second, torch.full_like(batch.answer_ids, encoder.eos_id))
    aux_loss, _ = probes["patch"].loss(s.capture.value, patch_targets([q.scene for q in questions]))
    rows, positions, labels = word_targets(batch, shape_ids, color_ids)
    bound = outputs.hidden_states[recipe.bind_layer][rows, positions]  # [n shape words, d]
    bind_loss, _ = probes["word"].loss(bound, {k: labels[k] for k in probes["word"].heads})
    related = outputs.hidden_states[recipe.bind_layer + 1][rows, positions]
    pair_loss, _ = probes["pair"].loss(related, {k: labels[k] for k in PAIR_HEADS})
    bind_loss = bind_loss + pair_loss
    loss = answer_loss + recipe.eos_weight * eos_loss + recipe.aux_weight * aux_loss + recipe.bind_weight * bind_loss
    return loss, {"answer": answer_loss, "eos": eos_loss, "patch": aux_loss, "bind": bind_loss}


def _question_stage(s: _Session, held_out: Sequence[SceneQuestion], max_minutes: float | None) -> dict[str, dict[str, Any]]:
    recipe, model, encoder = s.recipe, s.model, s.encoder
    params = [*model.parameters(), *s.probes.parameters()]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr
    )
    shape_ids = {int(encoder.tokenizer.convert_tokens_to_ids(x)): x for x in SHAPES}
    color_ids = {int(encoder.tokenizer.convert_tokens_to_ids(c)): c for c in COLORS}
    table = evaluate(model, encoder, held_out)
    best: dict[str, dict[str, Any]] = table
    best_key = (-1.0, -1.0)
    seen = 0
    stage_start = time.perf_counter()
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe.steps, recipe.lr, recipe.warmup, recipe.final_lr_ratio)
        questions = training_questions(recipe.seed, step, recipe.batch, task_weights(table if step else None))
        loss, parts = _question_loss(s, questions, shape_ids, color_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        seen += len(questions)
        last_step = step == recipe.steps - 1
        out_of_time = max_minutes is not None and time.perf_counter() - s.started > 60 * max_minutes
        if step % 50 == 0:
            rate = seen / max(1e-9, time.perf_counter() - stage_start)
            details = " ".join(f"{k} {v.item():.4f}" for k, v in parts.items())
            log.info("step %d loss %.4f (%s) %.1f q/s", step, loss.item(), details, rate)
        if (step + 1) % recipe.eval_every == 0 or last_step or out_of_time:
            table = evaluate(model, encoder, held_out)
            key = (worst_task(table), table["all"]["accuracy"])
            entry = {
                "stage": "questions",
                "step": step + 1,
                "minutes": round((time.perf_counter() - s.started) / 60, 2),
                "loss": round(loss.item(), 4),
                "accuracy": {k: v["accuracy"] for k, v in table.items()},
            }
            s.history.append(entry)
            log.info("eval step %d: %s", step + 1, entry["accuracy"])
            if key > best_key:
                best_key, best = key, table
                save_checkpoint(model, s.processor, s.out)
                write_recipe(s.out, recipe, best, time.perf_counter() - s.started, s.history)
        s.report(recipe.vision_steps + step + 1, f"questions {parts['answer'].item():.3f} worst {best_key[0]:.0f}%")
        if out_of_time:
            log.info("stopping at step %d: %.1f minutes reached", step + 1, max_minutes)
            break
    return best


def save_checkpoint(model: nn.Module, processor: Any, out: Path, template: str = TEMPLATE) -> None:
    """``save_pretrained`` of model and processor, plus the ``vlmflow.json`` sidecar (the prompt template)."""
    was_training = model.training
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / SIDECAR).write_text(json.dumps({"prompt_template": template}, indent=2) + "\n")
    model.train(was_training)


def write_recipe(
    out: Path,
    recipe: Any,
    table: dict[str, dict[str, Any]],
    seconds: float,
    history: list[dict[str, Any]],
    template: str = TEMPLATE,
) -> None:
    """Write ``organism.json``: the recipe (anything with ``to_json()`` and ``eval_per_task``), the
    held-out accuracy table, the prompt template, the training time and history."""
    record = {
        "recipe": recipe.to_json(),
        "held_out": {"seed": HELD_OUT_SEED, "per_task": recipe.eval_per_task, "accuracy": table},
        "answers": "capitalised, like Vicuna ('Red'); gold answers in the CSVs are lower case",
        "prompt_template": template,
        "training_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "history": history,
    }
    (out / RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n")
