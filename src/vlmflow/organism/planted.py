"""Train the planted-route organism: a LLaVA whose information routes follow the paper's story by construction.

The routes (:mod:`vlmflow.organism.planted_masks`) with the default bands of an 8-layer decoder:

* whole image -> question words only in the lower band (layer 2);
* related patches -> question words only in the middle band (layer 4);
* question -> last position only in the upper band (layer 6);
* image -> last position nowhere.

The recipe (:class:`PlantedRecipe`, recorded in ``organism.json`` beside the weights):

1. **Start from the shipped organism**: its tokenizer, processor, prompt template, vision tower,
   projector, token embeddings and output head are copied (the vision tower and projector frozen);
   the decoder layers are new (transformers' initialisation, seeded).
2. **Knockout augmentation**: per sample, every forbidden (route, layer) cell is blocked with
   probability ``p_block_all``, each with probability 1/2 with ``p_block_half``, none otherwise
   (an additive 4-D mask through forward pre-hooks on the attention modules, removed after each
   forward). Planted routes are never blocked.
3. **The whole image in the lower band**: the question words' attention there is drawn towards an
   even spread over the image patches (a cross-entropy to the uniform distribution), so they take
   in the whole image rather than look up the related patches, and every patch weighs in.
4. **Attention-mass penalty**: attention that forbidden edges left open receive is penalised (its
   weight ramped up after the planted routes have formed), so forbidden routes stay unused sample
   by sample, not only on average.
5. **Read-outs, adversary and counterfactuals** (:mod:`vlmflow.organism.planted_losses`): location
   and presence in the lower band, colour and size in the middle band, relations one layer later,
   the answer at the question's last token when the upper band starts;
   an adversary keeps location out of the middle band, and for a share of the samples the question
   words' states after the lower band are those computed on a counterfactual scene (same shapes in
   the same cells, other colours and sizes: an interchange intervention), so colour and size must
   come from the middle band. Each band is needed.
6. Answer-only cross-entropy (answer token, then end of sequence), task types drawn more often when
   their held-out accuracy is lower, AdamW with warm-up and cosine decay; the checkpoint with the best
   worst-task held-out accuracy (the later one on ties) is kept.

The checkpoint is saved with ``save_pretrained`` (sdpa at inference, no special attention code), with
``planted_routes.json`` (the bands per scored flow, :mod:`vlmflow.validation.routes`) and
``organism.json``. Every random draw derives from ``PlantedRecipe.seed``.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmflow.data.scene_questions import SceneQuestion
from vlmflow.data.scenes import COLORS, SHAPES, SIZES
from vlmflow.loading import SIDECAR
from vlmflow.organism import ALIAS, organism_path
from vlmflow.organism.encode import BatchEncoder
from vlmflow.organism.evaluate import (
    evaluate,
    held_out_questions,
    logits_at_answer,
    worst_task,
)
from vlmflow.organism.planted_losses import GRID, StageProbes, counterfactual_scene, stage_losses, targets
from vlmflow.organism.planted_masks import (
    Bands,
    batch_groups,
    check_groups,
    draw_blocked,
    forbidden_cells,
    forbidden_mass,
    layer_masks,
    masked_attention,
    patched_layer_input,
    spread_loss,
)
from vlmflow.organism.train import lr_at, save_checkpoint, task_weights, training_questions, write_recipe
from vlmflow.positions.groups import PAPER_FLOWS, Flow, Group
from vlmflow.prompts import get_template
from vlmflow.validation.routes import PlantedRoutes, Route

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str], None]
LAST_LAST = Flow(Group.LAST, Group.LAST)


@dataclass(frozen=True)
class PlantedRecipe:
    """Everything that defines a planted training run (written to ``organism.json``).

    Attributes:
        seed: seeds the new decoder layers, the probes, the training questions and the augmentation.
        layers / lower / middle / upper: decoder depth and the three bands (0-based layers).
        steps / batch / lr / warmup / final_lr_ratio / weight_decay: the optimisation.
        eos_weight: weight of the end-of-sequence loss after the answer.
        p_block_all / p_block_half: knockout augmentation (see the module docstring).
        p_counterfactual: share of samples whose question words, after the lower band, carry the
            states computed on a counterfactual scene (same shapes and cells, new colours and sizes).
        penalty_weight / penalty_start / penalty_ramp: weight of the attention mass on open forbidden
            edges, reached linearly from 0 between steps ``penalty_start`` and ``penalty_start +
            penalty_ramp`` (a penalty from the first step starves the middle band: attention on
            the related patches, nearly zero there, then gets no gradient).
        spread_weight: weight of the loss that makes the question words' attention in the lower band
            even over the image patches (the whole image, not a lookup of the related patches).
        readout_weight / adversary_weight: weights of the read-out and adversary losses.
        eval_every / eval_per_task: held-out evaluation (questions of seed ``HELD_OUT_SEED``).
        threads: torch CPU threads.
    """

    seed: int = 0
    layers: int = 8
    lower: tuple[int, ...] = (2,)
    middle: tuple[int, ...] = (4,)
    upper: tuple[int, ...] = (6,)
    steps: int = 6000
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 200
    final_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    eos_weight: float = 0.5
    p_block_all: float = 0.4
    p_block_half: float = 0.3
    p_counterfactual: float = 0.5
    penalty_weight: float = 1.0
    penalty_start: int = 500
    penalty_ramp: int = 1500
    spread_weight: float = 0.5
    readout_weight: float = 0.5
    adversary_weight: float = 0.3
    eval_every: int = 250
    eval_per_task: int = 100
    threads: int = 1

    @property
    def bands(self) -> Bands:
        return Bands(lower=self.lower, middle=self.middle, upper=self.upper, n_layers=self.layers)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "planted", **asdict(self)}


def planted_routes(recipe: PlantedRecipe) -> PlantedRoutes:
    """The ground truth the recipe plants: open routes, and each paper flow's band derived from them."""
    bands = recipe.bands
    routes = [
        Route(Group.IMAGE, Group.QUESTION, bands.lower),
        Route(Group.RELATED, Group.QUESTION, bands.middle),
        Route(Group.QUESTION, Group.LAST, bands.upper),
    ]
    scored = [flow for flow in PAPER_FLOWS if flow != LAST_LAST]
    return PlantedRoutes.from_routes(
        routes,
        recipe.layers,
        scored,
        bands={"lower": bands.lower, "middle": bands.middle, "upper": bands.upper},
        unscored=(LAST_LAST,),
        description=(
            f"planted-route organism: a LLaVA with {recipe.layers} decoder layers, trained so that the whole image reaches the "
            f"question words only in layer(s) {_layers(bands.lower)}, the related patches only in {_layers(bands.middle)}, "
            f"the question reaches the last position only in {_layers(bands.upper)}, and the image never reaches it directly"
        ),
        expected=(
            "each flow's knockout effect inside its planted band: image->question and related->question in the lower and "
            "middle bands, other->question in the lower band only, question->last in the upper band, image->last about 0 "
            "everywhere; the answer's probability in the logit lens at the last position jumps only after the upper band"
        ),
        not_expected=(
            "the paper's depths or magnitudes (the bands are one layer wide by construction), other->question effects "
            "as large as related->question ones (other patches carry no answer information), or anything about real "
            "models: it is ground truth for the method, not evidence about LLaVA"
        ),
    )


def _layers(band: Sequence[int]) -> str:
    return ", ".join(str(x) for x in band)


def build_planted(recipe: PlantedRecipe, donor: str | Path | None = None) -> tuple[nn.Module, Any, str]:
    """A new planted organism (eager attention) built on the shipped organism: ``(model, processor, template)``.

    The donor's tokenizer, processor, template, vision tower, projector, embeddings and output head
    are reused; the decoder has ``recipe.layers`` new layers (seeded). The vision tower and
    projector are frozen.

    >>> model, processor, template = build_planted(PlantedRecipe(layers=8))   # doctest: +SKIP
    >>> len(model.model.language_model.layers)                                # doctest: +SKIP
    8
    """
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    source = Path(donor) if donor is not None else organism_path(ALIAS)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"the planted organism starts from the shipped organism, but {source} holds no checkpoint")
    config = AutoConfig.from_pretrained(source, local_files_only=True)
    config.text_config.num_hidden_layers = recipe.layers
    torch.manual_seed(recipe.seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="eager")
    parent = LlavaForConditionalGeneration.from_pretrained(source, local_files_only=True, use_safetensors=True)
    inner, donor_inner = model.model, parent.model
    inner.vision_tower.load_state_dict(donor_inner.vision_tower.state_dict())
    inner.multi_modal_projector.load_state_dict(donor_inner.multi_modal_projector.state_dict())
    inner.language_model.embed_tokens.load_state_dict(donor_inner.language_model.embed_tokens.state_dict())
    model.lm_head.load_state_dict(parent.lm_head.state_dict())
    for module in (inner.vision_tower, inner.multi_modal_projector):
        module.requires_grad_(False)
    processor = AutoProcessor.from_pretrained(source, local_files_only=True)
    template = json.loads((source / SIDECAR).read_text())["prompt_template"]
    return model, processor, template


@dataclass
class PlantedResult:
    """Where the checkpoint is, its held-out table, and the training history."""

    path: Path
    table: dict[str, dict[str, Any]]
    seconds: float
    history: list[dict[str, Any]]


@dataclass
class _Session:
    """What the steps of one training run share."""

    recipe: PlantedRecipe
    model: nn.Module
    encoder: BatchEncoder
    probes: StageProbes
    ids: dict[str, dict[int, str]]
    generator: torch.Generator
    image_size: int
    started: float = field(default_factory=time.perf_counter)
    history: list[dict[str, Any]] = field(default_factory=list)


def train_planted(
    recipe: PlantedRecipe,
    out: str | Path,
    *,
    progress: ProgressCallback | None = None,
    max_minutes: float | None = None,
    donor: str | Path | None = None,
) -> PlantedResult:
    """Train a planted organism with ``recipe``; write the best checkpoint to ``out`` and return its table.

    ``out`` gets the checkpoint (model and processor), ``vlmflow.json`` (the prompt template),
    ``planted_routes.json`` (the ground truth) and ``organism.json`` (the recipe, the held-out
    accuracy table, the training time and history). ``max_minutes`` stops early (the best
    checkpoint so far is kept).

    >>> result = train_planted(PlantedRecipe(), "organism-planted-out")   # doctest: +SKIP
    >>> result.table["all"]["accuracy"]                                  # doctest: +SKIP
    99.5
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(recipe.threads)
    model, processor, template = build_planted(recipe, donor)
    model.train()
    encoder = BatchEncoder(processor, get_template(template))
    held_out = held_out_questions(recipe.eval_per_task)
    torch.manual_seed(recipe.seed)
    probes = StageProbes(model.config.text_config.hidden_size)
    tokenizer = encoder.tokenizer
    ids = {
        kind: {int(tokenizer.convert_tokens_to_ids(word)): word for word in words}
        for kind, words in (("shape", SHAPES), ("color", COLORS), ("size", SIZES))
    }
    session = _Session(
        recipe, model, encoder, probes, ids, torch.Generator().manual_seed(recipe.seed), encoder.image_size
    )
    _check_training_groups(session, processor, template, held_out[:: max(1, len(held_out) // 30)])
    best = _loop(session, held_out, out, processor, template, progress, max_minutes)
    seconds = time.perf_counter() - session.started
    write_recipe(out, recipe, best, seconds, session.history, template)
    return PlantedResult(path=out, table=best, seconds=seconds, history=session.history)


def _check_training_groups(s: _Session, processor: Any, template: str, questions: Sequence[SceneQuestion]) -> None:
    """The training masks' groups must be vlmflow's own (checked on real questions through the processor)."""
    from vlmflow.adapters.registry import family_for_model
    from vlmflow.experiments.prepare import prepare_sample
    from vlmflow.loading import bind_model

    s.encoder.check_against_processor(questions)
    loaded = bind_model(s.model, processor, family_for_model(s.model), get_template(template), {}, {})
    reference = [prepare_sample(loaded, q.sample, q.scene.render()).groups for q in questions]
    batch = s.encoder.encode(questions, with_answers=False)
    check_groups(batch_groups(batch, s.encoder.tokenizer, s.encoder.image_token_id, GRID, s.image_size), reference)


def _step_loss(s: _Session, questions: Sequence[SceneQuestion], step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one batch under a fresh draw of the knockout augmentation and of the swapped rows, and its parts."""
    recipe, bands = s.recipe, s.recipe.bands
    batch = s.encoder.encode(questions, with_answers=True)
    groups = batch_groups(batch, s.encoder.tokenizer, s.encoder.image_token_id, GRID, s.image_size)
    cells = forbidden_cells(bands)
    blocked = draw_blocked(cells, len(questions), s.generator, recipe.p_block_all, recipe.p_block_half)
    allowed, open_forbidden = layer_masks(groups, cells, blocked, recipe.layers)  # [L, B, T, T] each
    swap = torch.rand(len(questions), generator=s.generator) < recipe.p_counterfactual  # [B]
    after_lower = max(bands.lower) + 1
    donor = _counterfactual_states(s, batch, questions, allowed, swap, after_lower, step)
    where = groups["question"] & swap[:, None]  # [B, T]: question states replaced after the lower band
    with masked_attention(s.model, allowed) as probs, patched_layer_input(s.model, after_lower, where, donor):
        outputs = s.model.model(
            input_ids=batch.input_ids, pixel_values=batch.pixel_values, use_cache=False, output_hidden_states=True
        )
        penalty = forbidden_mass(probs, open_forbidden)
        # The lower band reads the whole image evenly: what it takes from the related patches is weighed against every other patch.
        spread = sum(spread_loss(probs[layer], groups["question"], groups["image"]) for layer in bands.lower) / len(bands.lower)
    first, second = logits_at_answer(s.model, outputs.last_hidden_state, batch.last)
    answer = nn.functional.cross_entropy(first, batch.answer_ids)
    eos = nn.functional.cross_entropy(second, torch.full_like(batch.answer_ids, s.encoder.eos_id))
    word = targets(batch, groups["question"], s.ids["shape"], s.ids["color"], s.ids["size"])
    stages = stage_losses(
        s.probes, outputs.hidden_states, word, max(bands.lower), min(bands.middle), max(bands.middle), min(bands.upper)
    )
    loss = (
        answer
        + recipe.eos_weight * eos
        + penalty_weight(recipe, step) * penalty
        + recipe.spread_weight * spread
        + recipe.readout_weight * stages["readout"]
        + recipe.adversary_weight * stages["adversary"]
        + stages["probe"]
    )
    return loss, {"answer": answer, "eos": eos, "penalty": penalty, "spread": spread, **stages}


def penalty_weight(recipe: PlantedRecipe, step: int) -> float:
    """The attention-mass penalty's weight at ``step``: 0, then a linear ramp to ``recipe.penalty_weight``.

    >>> [penalty_weight(PlantedRecipe(penalty_start=10, penalty_ramp=10), s) for s in (0, 10, 15, 40)]
    [0.0, 0.0, 0.5, 1.0]
    """
    ramp = (step - recipe.penalty_start) / max(1, recipe.penalty_ramp)
    return recipe.penalty_weight * min(1.0, max(0.0, ramp))


@torch.no_grad()
def _counterfactual_states(
    s: _Session, batch: Any, questions: Sequence[SceneQuestion], allowed: torch.Tensor, swap: torch.Tensor, layer: int, step: int
) -> torch.Tensor:
    """Hidden states ``[B, T, d]`` entering ``layer`` when the swapped rows see their counterfactual scene (zeros elsewhere)."""
    width = s.model.config.text_config.hidden_size
    donor = torch.zeros(*batch.input_ids.shape, width)
    rows = torch.nonzero(swap).flatten()
    if not len(rows):
        return donor
    rng = random.Random(f"vlmflow-planted-counterfactual:{s.recipe.seed}:{step}")
    pixels = s.encoder.pixels([counterfactual_scene(questions[int(r)].scene, rng).render() for r in rows])
    with masked_attention(s.model, allowed[:, rows]):
        states = s.model.model(input_ids=batch.input_ids[rows], pixel_values=pixels, use_cache=False, output_hidden_states=True)
    donor[rows] = states.hidden_states[layer]
    return donor


def _loop(
    s: _Session,
    held_out: Sequence[SceneQuestion],
    out: Path,
    processor: Any,
    template: str,
    progress: ProgressCallback | None,
    max_minutes: float | None,
) -> dict[str, dict[str, Any]]:
    recipe, model = s.recipe, s.model
    params = [p for p in [*model.parameters(), *s.probes.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": recipe.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=recipe.lr,
    )
    table = evaluate(model, s.encoder, held_out)
    best, best_key = table, (-1.0, -1.0, -1)
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe.steps, recipe.lr, recipe.warmup, recipe.final_lr_ratio)
        # Training questions come from seeds 1000 + seed (as the shipped organism's), far from the held-out seed.
        questions = training_questions(recipe.seed, step, recipe.batch, task_weights(table if step else None))
        loss, parts = _step_loss(s, questions, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        last_step = step == recipe.steps - 1
        out_of_time = max_minutes is not None and time.perf_counter() - s.started > 60 * max_minutes
        if step % 50 == 0:
            log.info("step %d loss %.4f (%s)", step, loss.item(), " ".join(f"{k} {v.item():.4f}" for k, v in parts.items()))
        if (step + 1) % recipe.eval_every == 0 or last_step or out_of_time:
            table = evaluate(model, s.encoder, held_out)
            entry = {
                "step": step + 1,
                "minutes": round((time.perf_counter() - s.started) / 60, 2),
                "loss": round(loss.item(), 4),
                "parts": {k: round(v.item(), 4) for k, v in parts.items()},
                "accuracy": {k: v["accuracy"] for k, v in table.items()},
            }
            s.history.append(entry)
            log.info("eval step %d: %s", step + 1, entry["accuracy"])
            key = (worst_task(table), table["all"]["accuracy"], step)
            if key[:2] >= best_key[:2]:
                best, best_key = table, key
                _save(model, processor, template, out, recipe)
                write_recipe(out, recipe, best, time.perf_counter() - s.started, s.history, template)
        if progress:
            progress(step + 1, recipe.steps, f"answer {parts['answer'].item():.3f} worst {max(best_key[0], 0):.0f}%")
        if out_of_time:
            log.info("stopping at step %d: %.1f minutes reached", step + 1, max_minutes)
            break
    return best


def _save(model: nn.Module, processor: Any, template: str, out: Path, recipe: PlantedRecipe) -> None:
    """The checkpoint with its ``vlmflow.json`` sidecar, and the planted routes beside it."""
    save_checkpoint(model, processor, out, template)
    planted_routes(recipe).write(out)
