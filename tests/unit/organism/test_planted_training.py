"""A planted training smoke run: the command writes a loadable checkpoint with its ground truth, and
the same seed gives the same weights (another seed does not)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vlmflow.data.sample import TaskType
from vlmflow.organism import organism_path
from vlmflow.organism.planted import PlantedRecipe, train_planted
from vlmflow.validation.routes import ROUTES_FILE, read_planted_routes

pytestmark = pytest.mark.skipif(
    not (organism_path() / "config.json").is_file(), reason="the planted organism starts from the shipped organism"
)


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow  # three short training runs (about 25 s on a quiet CPU)
def test_planted_train_command_is_reproducible_and_loads_like_any_checkpoint(tmp_path):
    from vlmflow.cli.main import main
    from vlmflow.loading import load_model

    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    args = ["organism", "train", "--planted", "--steps", "2", "--eval-per-task", "1", "--seed", "3"]
    assert main([*args, "--out", str(first)]) == 0
    train_planted(PlantedRecipe(seed=3, steps=2, eval_per_task=1), second)
    train_planted(PlantedRecipe(seed=4, steps=2, eval_per_task=1), other)
    a, b, c = _weights(first), _weights(second), _weights(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if "layers" in k)
    # the vision tower, projector and embeddings come from the shipped organism, unchanged by training
    shipped = _weights(organism_path())
    for name in ("vision_tower.embeddings.patch_embedding.weight", "multi_modal_projector.linear_1.weight"):
        assert torch.equal(a[name], shipped[name])

    record = json.loads((first / "organism.json").read_text())
    assert record["recipe"]["kind"] == "planted" and record["recipe"]["steps"] == 2
    assert set(record["held_out"]["accuracy"]) == {t.value for t in TaskType} | {"all"}
    assert read_planted_routes(first).n_layers == PlantedRecipe().layers
    assert ROUTES_FILE not in json.loads((first / "vlmflow.json").read_text())  # not a family option
    loaded = load_model(first, device="cpu", dtype="float32")
    assert loaded.n_layers == 8 and loaded.info["attn_implementation"] == "sdpa"
    assert loaded.model.config.text_config._attn_implementation == "sdpa"  # noqa: SLF001 - no special attention code


def test_vision_steps_do_not_apply_to_the_planted_recipe(tmp_path):
    from vlmflow.cli.main import main

    assert main(["organism", "train", "--planted", "--vision-steps", "3", "--out", str(tmp_path)]) == 2
