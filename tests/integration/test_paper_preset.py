"""The paper's preset on tiny checkpoints loaded like a user's: its box rule, its stop tokens, its lens.

* ``patch_rule="paper"`` reaches the input pipeline at load and picks the related group (LLaVA-1.5,
  LLaVA-NeXT base view and grid); it is part of the run's identity and recorded in its spec; the
  default keeps the identity runs had before the option existed; families without the rule say so;
* the greedy answer stops on every end-of-sequence id of the generation config (a Llama-3-style
  LLaVA-NeXT lists two), not only the tokenizer's;
* the lens keeps the top 50 tokens per layer when asked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import vlmflow
from conftest import write_scene_task
from support.tiny_next import LLAMA3_STOP_TOKENS, TinyAnyresConfig, build_tiny_llava_next
from vlmflow.data.sample import Box, Sample, SceneObject, TaskType
from vlmflow.errors import ConfigError
from vlmflow.experiments.flows import baseline
from vlmflow.experiments.prepare import prepare_sample
from vlmflow.experiments.settings import FlowSettings, LensSettings, Readout
from vlmflow.knockout.clean import clean_run
from vlmflow.loading import load_model
from vlmflow.positions.anyres import anyres_geometry
from vlmflow.positions.groups import Group
from vlmflow.positions.paper_rule import anyres_paper_rule_tokens, paper_rule_tokens


def aligned_sample() -> tuple[Sample, Image.Image]:
    """A 32 x 32 image whose box is exactly one 8 px patch of a 32 px view: the paper's inclusive
    rectangle (9 x 9 pixels) also reaches the patches right of and below it, the overlap rule not."""
    box = Box(8, 8, 8, 8)
    image = Image.new("RGB", (32, 32), (30, 120, 30))
    ImageDraw.Draw(image).rectangle((8, 8, 15, 15), fill=(220, 20, 20))
    sample = Sample(
        sample_id="aligned", image_id="img", question="Is the square red or blue?", answer="red",
        task=TaskType.CHOOSE_ATTR, true_option="red", false_option="blue",
        objects=(SceneObject("square", "1", box),), image_size=(32, 32),
    )  # fmt: skip
    return sample, image


@pytest.fixture(scope="module")
def llama3_next(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama-3-style LLaVA-NeXT saved to disk (32 px views, 8 px patches)."""
    path = tmp_path_factory.mktemp("tiny-next-llama3")
    build_tiny_llava_next(TinyAnyresConfig(tokenizer="llama3", layers=2, hidden=48, heads=3, kv_heads=3, seed=1), path)
    return path


def _related_tokens(prepared) -> np.ndarray:
    """The related group as a bool over image tokens."""
    image = np.asarray(prepared.groups[Group.IMAGE])
    return np.isin(image, prepared.groups[Group.RELATED])


def test_paper_rule_picks_llava15_related_patches(tiny_checkpoint):
    sample, image = aligned_sample()
    paper = load_model(tiny_checkpoint("sp-gqa"), device="cpu", dtype="float32", patch_rule="paper")
    overlap = load_model(tiny_checkpoint("sp-gqa"), device="cpu", dtype="float32")
    assert (paper.inputs.patch_rule, overlap.inputs.patch_rule) == ("paper", "overlap")
    assert (paper.info["patch_rule"], overlap.info["patch_rule"]) == ("paper", "overlap")
    view, patch = paper.inputs.view, paper.inputs.patch
    assert (view, patch) == (32, 8)
    by_paper = _related_tokens(prepare_sample(paper, sample, image))
    by_overlap = _related_tokens(prepare_sample(overlap, sample, image))
    expected = paper_rule_tokens(sample.image_size, sample.boxes, view_size=view, patch_size=patch)
    assert np.array_equal(by_paper, expected)
    assert np.flatnonzero(by_overlap).tolist() == [5]  # row 1, column 1 of the 4 x 4 grid
    assert np.flatnonzero(by_paper).tolist() == [5, 6, 9, 10]
    groups = prepare_sample(paper, sample, image).groups
    assert set(groups[Group.OTHER]) == set(groups[Group.IMAGE]) - set(groups[Group.RELATED])


def test_paper_rule_picks_llava_next_related_patches_in_both_views(llama3_next):
    sample, image = aligned_sample()
    loaded = load_model(llama3_next, device="cpu", dtype="float32", patch_rule="paper")
    prepared = prepare_sample(loaded, sample, image)
    geometry = anyres_geometry(sample.image_size, view_size=32, patch_size=8, pinpoints=loaded.inputs.pinpoints)
    expected = anyres_paper_rule_tokens(sample.image_size, sample.boxes, geometry, view_size=32, patch_size=8)
    related = _related_tokens(prepared)
    assert np.array_equal(related, expected)
    assert (related & geometry.base_tokens()).sum() == 4 and (related & geometry.grid_tokens()).sum() == 4
    assert int(geometry.related_tokens(sample.boxes).sum()) == 2  # the overlap rule: one patch per view
    # noHD_noPad: the paper's rule through the single padded view.
    single = load_model(llama3_next, device="cpu", dtype="float32", patch_rule="paper", image_mode="nohd_nopad")
    assert _related_tokens(prepare_sample(single, sample, image)).sum() == 4


def test_families_without_the_paper_rule_refuse_it():
    from support.tiny_next import build_tiny_llava_onevision
    from vlmflow.tiny.llava import loaded_from_objects

    model, processor = build_tiny_llava_onevision(TinyAnyresConfig(image_size=36, layers=1, kv_heads=1))
    with pytest.raises(ConfigError, match="patch_rule 'paper' is not implemented for llava_onevision.*valid here: overlap"):
        loaded_from_objects(model, processor, template="qwen_1_5", options={"patch_rule": "paper"})
    with pytest.raises(ConfigError, match="unknown patch_rule 'exact'; valid: overlap, paper"):
        loaded_from_objects(model, processor, template="qwen_1_5", options={"patch_rule": "exact"})
    assert loaded_from_objects(model, processor, template="qwen_1_5").inputs.patch_rule == "overlap"


def test_the_rule_is_part_of_the_run_and_recorded_in_its_spec(tiny_checkpoint, tmp_path: Path):
    csv = write_scene_task(tmp_path / "data", n_samples=1)
    common = {"flows": ["related->question"], "window": 1, "out": tmp_path / "runs", "keep_all": True, "device": "cpu"}
    default = vlmflow.run_flows(tiny_checkpoint("sp-gqa"), csv, **common)
    paper = vlmflow.run_flows(tiny_checkpoint("sp-gqa"), csv, patch_rule="paper", **common)
    assert paper.path != default.path
    # The default adds nothing to the identity: runs made before the option resume as they were.
    assert default.spec["model"]["options"] == {} and "patch_rule" not in default.spec["model"]
    assert paper.spec["model"]["options"] == {"patch_rule": "paper"}
    assert default.spec["provenance"]["model_info"]["patch_rule"] == "overlap"
    assert paper.spec["provenance"]["model_info"]["patch_rule"] == "paper"
    again = vlmflow.run_flows(tiny_checkpoint("sp-gqa"), csv, patch_rule="paper", **common)
    assert again.path == paper.path and again.summary["computed_this_session"] == 0


def test_the_answer_stops_on_every_stop_id_of_the_generation_config(llama3_next):
    loaded = load_model(llama3_next, device="cpu", dtype="float32")
    tokenizer = loaded.tokenizer
    llama3_ids = tuple(tokenizer.convert_tokens_to_ids(list(LLAMA3_STOP_TOKENS)))
    # Like llama3-llava-next-8b: the generation config lists <|eot_id|> and <|end_of_text|>, the tokenizer one.
    assert loaded.model.generation_config.eos_token_id == list(llama3_ids)
    assert tokenizer.eos_token_id in llama3_ids and loaded.stop_token_ids == llama3_ids
    assert loaded.info["stop_token_ids"] == list(llama3_ids)

    sample, image = aligned_sample()
    prepared = prepare_sample(loaded, sample, image)
    config = loaded.model.generation_config
    saved = config.eos_token_id
    try:
        # The model's free greedy answer, stopped by nothing but the budget.
        config.eos_token_id = None
        free = clean_run(loaded.decoder, prepared.encoded, capture_from=0, max_new_tokens=6).generated.tolist()
        assert len(free) == 6 and not set(free[:2]) & set(llama3_ids), free
        stop_at = next(i for i in range(1, 6) if free[i] not in free[:i] and free[i] != tokenizer.eos_token_id)
        # A generation-config id the tokenizer does not know ends the answer there (and is kept).
        config.eos_token_id = [tokenizer.eos_token_id, free[stop_at]]
        clean, row = baseline(loaded, prepared, FlowSettings(max_new_tokens=6, keep_all=True), 0)
        assert clean.generated.tolist() == free[: stop_at + 1]
        assert row.prediction == tokenizer.decode(free[: stop_at + 1], skip_special_tokens=True).strip()
    finally:
        config.eos_token_id = saved


def test_the_lens_keeps_the_top_50_tokens_per_layer(tiny_prepared):
    loaded, prepared = tiny_prepared("sp-gqa")
    assert len(loaded.tokenizer) > 50
    tables = LensSettings(keep_all=True, top_k=50, readouts=(Readout.RAW,)).analyse(loaded, prepared)
    rows = tables["lens_top"]
    assert len(rows) == loaded.n_layers + 1
    for row in rows:
        assert len(row.top_token_ids) == len(set(row.top_token_ids)) == len(row.top_probs) == 50
        assert row.top_probs == sorted(row.top_probs, reverse=True)
    # The 50 kept are the 50 most probable of the full vocabulary at the last layer.
    last = next(r for r in rows if r.layer == loaded.n_layers)
    logits = torch.log_softmax(tables_logits(loaded, prepared), -1)
    assert set(last.top_token_ids) == set(torch.topk(logits, 50).indices.tolist())


def tables_logits(loaded, prepared) -> torch.Tensor:
    """The clean last-position logits (the lens's last layer is the model's own output)."""
    return clean_run(loaded.decoder, prepared.encoded, capture_from=prepared.encoded.seq_len - 1).logits
