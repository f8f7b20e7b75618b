"""The planted organism's training masks: vlmflow's own groups, the right forbidden cells, hooks that
apply exactly the knockout the reference engine applies and leave nothing behind."""

from __future__ import annotations

import random

import pytest
import torch

from vlmflow.data.sample import TaskType
from vlmflow.data.scene_sets import task_questions
from vlmflow.errors import ConfigError
from vlmflow.organism import organism_path
from vlmflow.organism.planted_losses import counterfactual_scene
from vlmflow.organism.planted_masks import (
    Bands,
    Cell,
    batch_groups,
    check_groups,
    draw_blocked,
    forbidden_cells,
    layer_masks,
    masked_attention,
    patched_layer_input,
)

pytestmark = pytest.mark.skipif(
    not (organism_path() / "config.json").is_file(), reason="the shipped organism (tokenizer, processor) is not in the package"
)
BANDS = Bands(lower=(2,), middle=(4,), upper=(6,), n_layers=8)


@pytest.fixture(scope="module")
def loaded():
    from vlmflow.loading import load_model

    return load_model("organism", device="cpu", dtype="float32", attn_implementation="eager")


@pytest.fixture(scope="module")
def encoder(loaded):
    from vlmflow.organism.encode import BatchEncoder

    return BatchEncoder(loaded.processor, loaded.template)


def _prepared(loaded, questions):
    from vlmflow.experiments.prepare import prepare_sample

    return [prepare_sample(loaded, q.sample, q.scene.render()) for q in questions]


def _groups(encoder, questions, with_answers=False):
    batch = encoder.encode(questions, with_answers=with_answers)
    return batch, batch_groups(batch, encoder.tokenizer, encoder.image_token_id, 4, encoder.image_size)


def test_training_groups_are_vlmflows_groups(loaded, encoder):
    questions = [q for task in TaskType for q in task_questions(task, 5, seed=31)]
    _, groups = _groups(encoder, questions)
    check_groups(groups, [p.groups for p in _prepared(loaded, questions)])
    # and the check is able to fail: related and other swapped are not vlmflow's groups
    groups.masks["related"], groups.masks["other"] = groups.masks["other"], groups.masks["related"]
    with pytest.raises(AssertionError, match="training group related"):
        check_groups(groups, [p.groups for p in _prepared(loaded, questions)])


def test_counterfactual_scenes_keep_every_group(loaded, encoder):
    questions = [q for task in TaskType for q in task_questions(task, 3, seed=32)]
    rng = random.Random(0)
    swapped = [type(q)(sample=q.sample, scene=counterfactual_scene(q.scene, rng)) for q in questions]
    assert any(a.scene.objects != b.scene.objects for a, b in zip(questions, swapped, strict=True))
    _, groups = _groups(encoder, questions)
    _, other = _groups(encoder, swapped)
    assert all(torch.equal(groups[name], other[name]) for name in groups.masks)


def test_forbidden_cells_leave_the_planted_routes_open():
    cells = {(c.target, c.source, c.layer) for c in forbidden_cells(BANDS)}
    assert ("question", "image", 2) not in cells and ("question", "other", 2) not in cells  # lower band: whole image
    assert ("question", "other", 4) in cells and ("question", "image", 4) not in cells  # middle band: related only
    assert {("question", "image", layer) for layer in (0, 1, 3, 5, 6, 7)} <= cells
    assert ("last", "question", 6) not in cells and {("last", "question", layer) for layer in (0, 5, 7)} <= cells
    assert {("last", "image", layer) for layer in range(8)} <= cells
    assert {("suffix", "question", layer) for layer in range(8)} <= cells


def test_bands_must_be_ordered_and_disjoint():
    with pytest.raises(ConfigError):
        Bands(lower=(4,), middle=(2,), upper=(6,), n_layers=8)
    with pytest.raises(ConfigError):
        Bands(lower=(2,), middle=(2,), upper=(6,), n_layers=8)


def test_augmentation_draws_all_some_or_none_per_row():
    blocked = draw_blocked([Cell("last", "image", 0)] * 40, 2000, torch.Generator().manual_seed(0), 0.4, 0.3)
    share = blocked.float().mean(1)  # [rows]: share of cells each row blocks
    assert 0.35 < float((share == 1).float().mean()) < 0.45
    assert 0.25 < float((share == 0).float().mean()) < 0.35
    assert torch.equal(blocked, draw_blocked([Cell("last", "image", 0)] * 40, 2000, torch.Generator().manual_seed(0), 0.4, 0.3))


def test_masked_forward_is_the_reference_knockout(loaded, encoder):
    """Blocking one cell through the training hooks gives the reference engine's logits for that knockout."""
    from vlmflow.knockout.reference import clean_logits, reference_logits
    from vlmflow.knockout.spec import Knockout
    from vlmflow.positions.groups import Flow, Group

    question = task_questions(TaskType.CHOOSE_ATTR, 1, seed=33)[0]
    prepared = _prepared(loaded, [question])[0]
    batch, groups = _groups(encoder, [question])
    cells = [Cell("question", "image", 1), Cell("last", "question", 3)]
    n_layers = loaded.n_layers
    model = loaded.model
    for c, cell in enumerate(cells):
        blocked = torch.zeros(1, len(cells), dtype=torch.bool)
        blocked[0, c] = True
        allowed, open_forbidden = layer_masks(groups, cells, blocked, n_layers)
        assert not open_forbidden[cell.layer].any() and open_forbidden[cells[1 - c].layer].any()
        with torch.no_grad(), masked_attention(model, allowed) as probs:
            ours = model(input_ids=batch.input_ids, pixel_values=batch.pixel_values).logits[0, -1]
        assert probs[cell.layer].shape[:2] == (1, model.config.text_config.num_attention_heads)
        flow = Flow(Group(cell.source), Group(cell.target))
        knockout = Knockout.for_flows(prepared.groups, [flow], [cell.layer])
        reference = reference_logits(loaded.decoder, prepared.encoded, [knockout])[0]
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)
        assert not torch.allclose(ours, clean_logits(loaded.decoder, prepared.encoded), atol=1e-4)
    attention = model.model.language_model.layers[0].self_attn
    assert not attention._forward_pre_hooks and not attention._forward_hooks  # noqa: SLF001 - removed in finally


def test_patched_input_replaces_only_the_chosen_positions(loaded, encoder):
    question = task_questions(TaskType.QUERY_ATTR, 1, seed=34)[0]
    batch, groups = _groups(encoder, [question])
    model = loaded.model.model
    with torch.no_grad():
        clean = model(input_ids=batch.input_ids, pixel_values=batch.pixel_values, output_hidden_states=True).hidden_states
        where = groups["question"]
        with patched_layer_input(loaded.model, 2, where, torch.zeros_like(clean[2])):
            patched = model(input_ids=batch.input_ids, pixel_values=batch.pixel_values, output_hidden_states=True).hidden_states
    first_question = int(torch.nonzero(where[0])[0])
    torch.testing.assert_close(patched[3][0, :first_question], clean[3][0, :first_question])  # before: untouched (causal)
    assert not torch.allclose(patched[3][0, first_question:], clean[3][0, first_question:])
    assert not loaded.model.model.language_model.layers[2]._forward_pre_hooks  # noqa: SLF001
