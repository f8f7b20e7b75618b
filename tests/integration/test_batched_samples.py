"""Samples batched: batch size N gives every sample the rows batch size 1 gives, row for row.

Several samples' clean passes and folded knockouts share each layer call, so a row that went to the
wrong sample (the bug of the peer tools that batched requests) must be caught: the samples here have
different answers, question lengths and (on the anyres family) image shapes, hence different
sequence lengths and token counts; every float of every row is compared per sample id to 1e-5,
the samples' own rows are checked to differ from each other by much more than that, and the
batches are also fed in permuted orders. Two families: LLaVA-1.5 and LLaVA-NeXT (anyres).

Also: a failing sample in a batch costs only its own rows (an error row), an out-of-memory error
splits the batch and the rows stay the same, and the runner commits sample by sample.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from unittest import mock

import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from vlmflow.data.csvio import write_task_csv
from vlmflow.data.sample import Box, Sample, SceneObject, TaskType
from vlmflow.errors import SampleError
from vlmflow.experiments import batched_flows
from vlmflow.experiments.batched_flows import analyse_samples
from vlmflow.experiments.flows import analyse_sample
from vlmflow.experiments.prepare import prepare_sample
from vlmflow.experiments.runner import DataSpec, RunSpec, run_to_store
from vlmflow.experiments.settings import FlowSettings
from vlmflow.knockout import fast as fast_module
from vlmflow.load_spec import LoadSpec
from vlmflow.positions.groups import PAPER_FLOWS

QUESTIONS = [
    "Is the square {a} or {b}?",
    "Which color is the small square in the picture, {a} or {b}?",
    "Is it {a} or {b}?",
    "Looking at the whole image carefully, would you say that the square is {a} or {b}?",
    "What color is the square, {a} or {b}?",
]
SIZES = [(60, 36), (36, 60), (40, 40), (70, 30), (30, 44)]  # anyres: different grids and token counts
COLOURS = {"red": (220, 20, 20), "blue": (20, 40, 220)}
FLOAT_COLUMNS = ("p_base", "p_blocked", "logprob_diff", "kl")


def mixed_samples(folder: Path, n: int = 5) -> tuple[Path, list[tuple[Sample, Image.Image]]]:
    """``n`` samples of different answers, question lengths and image shapes, saved as a task CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        answer, other = ("red", "blue") if i % 2 == 0 else ("blue", "red")
        size = SIZES[i % len(SIZES)]
        box = Box(2 + 3 * i, 3 + 2 * i, 10, 10)
        image = Image.new("RGB", size, (40, 120 + 20 * i, 40))
        ImageDraw.Draw(image).rectangle((box.x, box.y, box.x1 - 1, box.y1 - 1), fill=COLOURS[answer])
        image.save(folder / f"img{i}.png")
        sample = Sample(
            sample_id=f"s{i}",
            image_id=f"img{i}",
            question=QUESTIONS[i % len(QUESTIONS)].format(a=answer, b=other) if i % 3 else QUESTIONS[i % len(QUESTIONS)].format(a=other, b=answer),
            answer=answer,
            task=TaskType.CHOOSE_ATTR,
            true_option=answer,
            false_option=other,
            objects=(SceneObject("square", str(i), box),),
            image_size=size,
        )
        out.append((sample, image))
    path = folder / "ChooseAttr.csv"
    write_task_csv([s for s, _ in out], path)
    return path, out


@pytest.fixture(scope="module")
def next_loaded(tmp_path_factory):
    from support.tiny_next import TinyAnyresConfig, build_tiny_llava_next
    from vlmflow.loading import load_model

    path = tmp_path_factory.mktemp("tiny-next-batched")
    build_tiny_llava_next(TinyAnyresConfig(tokenizer="sentencepiece"), path)
    return load_model(path, device="cpu", dtype="float32", attn_implementation="sdpa")


@pytest.fixture
def family(request, tiny_loaded, next_loaded):
    return tiny_loaded("sp-gqa", "sdpa") if request.param == "llava" else next_loaded


def _settings(batch_size: int) -> FlowSettings:
    return FlowSettings(flows=PAPER_FLOWS, window=3, keep_all=True, max_new_tokens=3, batch_size=batch_size)


def _run(loaded, csv: Path, out: Path, batch_size: int) -> dict[str, pd.DataFrame]:
    spec = RunSpec(LoadSpec("tiny"), DataSpec(str(csv)), _settings(batch_size), name=f"b{batch_size}")
    outcome = run_to_store(spec, out, loaded=loaded, self_test=False)
    files = {name: outcome.path / f"{name}.parquet" for name in ("samples", "flows", "errors")}
    return {name: pd.read_parquet(f) if f.exists() else pd.DataFrame(columns=["sample_id", "stage"]) for name, f in files.items()}


def assert_same_rows(a: pd.DataFrame, b: pd.DataFrame, keys: list[str]) -> None:
    """Row for row by ``keys``: floats to 1e-5, everything else equal."""
    assert len(a) == len(b) and len(a)
    a, b = a.sort_values(keys).reset_index(drop=True), b.sort_values(keys).reset_index(drop=True)
    for column in a.columns:
        if column in FLOAT_COLUMNS or column == "rel_change":
            tol = 1e-5 if column != "rel_change" else 1e-3  # rel_change is 100 * a ratio of probabilities
            diff = (a[column] - b[column]).abs().max()
            assert diff <= tol, f"{column} differs by {diff}"
        else:
            assert a[column].map(repr).tolist() == b[column].map(repr).tolist(), column


@pytest.mark.parametrize("family", ["llava", "next"], indirect=True)
def test_batch_n_gives_the_rows_of_batch_1_for_every_sample(family, tmp_path):
    csv, samples = mixed_samples(tmp_path / "data")
    single = _run(family, csv, tmp_path / "runs1", 1)
    batched = _run(family, csv, tmp_path / "runs3", 3)  # 5 samples: a batch of 3, then a batch of 2
    assert_same_rows(single["samples"], batched["samples"], ["sample_id"])
    assert_same_rows(single["flows"], batched["flows"], ["sample_id", "flow", "layer"])
    # Mixed lengths really were batched, and a row that went to another sample could not pass:
    # every pair of samples differs by far more than the tolerance.
    assert single["samples"]["seq_len"].nunique() >= 3
    flows = single["flows"].set_index(["flow", "layer"])
    for s, t in itertools.combinations(single["samples"]["sample_id"], 2):
        a, b = flows[flows["sample_id"] == s]["p_blocked"], flows[flows["sample_id"] == t]["p_blocked"]
        assert (a - b).abs().max() > 1e-3, (s, t)
    assert set(single["flows"]["sample_id"]) == {s.sample_id for s, _ in samples}


@pytest.mark.parametrize("family", ["llava", "next"], indirect=True)
def test_every_order_of_a_batch_gives_each_sample_its_own_rows(family, tmp_path):
    _, samples = mixed_samples(tmp_path / "data", n=4)
    prepared = [prepare_sample(family, s, image) for s, image in samples]
    settings = _settings(4)
    alone = {p.sample.sample_id: analyse_sample(family, p, settings) for p in prepared}
    for order in ([0, 1, 2, 3], [3, 1, 0, 2], [2, 3]):
        for result in analyse_samples(family, [prepared[i] for i in order], settings):
            _assert_own_rows(result, alone[result.sample.sample_id])


def _assert_own_rows(result, reference) -> None:
    """A sample's batched result equals the one it gets alone: answer, clean probability, every row."""
    assert result.sample.answer_token_id == reference.sample.answer_token_id
    assert result.sample.prediction == reference.sample.prediction
    assert math.isclose(result.sample.p_base, reference.sample.p_base, abs_tol=1e-5)
    got = torch.tensor([r.p_blocked for r in result.rows])
    torch.testing.assert_close(got, torch.tensor([r.p_blocked for r in reference.rows]), atol=1e-5, rtol=0)
    assert [(r.flow, r.layer) for r in result.rows] == [(r.flow, r.layer) for r in reference.rows]


def test_knockout_rows_handed_to_the_wrong_sample_are_caught(tiny_loaded, tmp_path):
    """The check above can fail: an engine that hands two samples each other's knockout logits (same
    shapes, so nothing crashes) fails it, while the clean rows still agree."""
    loaded = tiny_loaded("sp-gqa", "sdpa")
    _, samples = mixed_samples(tmp_path / "data", n=2)
    prepared = [prepare_sample(loaded, s, image) for s, image in samples]
    settings = _settings(2)
    alone = {p.sample.sample_id: analyse_sample(loaded, p, settings) for p in prepared}
    engine = batched_flows.ENGINES[settings.engine]
    original = engine.knockout_logits_batch

    def swapped(loaded, requests, max_fold_queries):
        out = original(loaded, requests, max_fold_queries)
        assert len(out) == 2 and out[0].shape == out[1].shape
        return out[::-1]

    with mock.patch.object(engine, "knockout_logits_batch", swapped):
        results = analyse_samples(loaded, prepared, settings)
    for result in results:
        reference = alone[result.sample.sample_id]
        assert math.isclose(result.sample.p_base, reference.sample.p_base, abs_tol=1e-5)
        with pytest.raises(AssertionError):
            _assert_own_rows(result, reference)


def test_a_failing_sample_costs_only_its_own_rows(tiny_loaded, tmp_path):
    loaded = tiny_loaded("sp-gqa", "sdpa")
    csv, samples = mixed_samples(tmp_path / "data")
    (tmp_path / "data" / "img1.png").unlink()  # s1 cannot be prepared
    single = _run(loaded, csv, tmp_path / "runs1", 1)
    original = batched_flows.sample_row

    def fails_for_s3(loaded, prepared, settings, clean):
        if prepared.sample.sample_id == "s3":
            raise SampleError("simulated: the clean forward of s3 is not finite", stage="forward")
        return original(loaded, prepared, settings, clean)

    with mock.patch.object(batched_flows, "sample_row", fails_for_s3):
        batched = _run(loaded, csv, tmp_path / "runs3", 3)
    assert sorted(batched["errors"]["sample_id"]) == ["s1", "s3"]
    assert dict(zip(batched["errors"]["sample_id"], batched["errors"]["stage"], strict=True)) == {"s1": "image", "s3": "forward"}
    keep = ["s0", "s2", "s4"]
    assert_same_rows(single["samples"][single["samples"]["sample_id"].isin(keep)], batched["samples"], ["sample_id"])
    assert_same_rows(single["flows"][single["flows"]["sample_id"].isin(keep)], batched["flows"], ["sample_id", "flow", "layer"])


def test_out_of_memory_splits_the_batch_and_one_sample_that_never_fits_is_an_error_row(tiny_loaded, tmp_path):
    loaded = tiny_loaded("sp-gqa", "sdpa")
    csv, _ = mixed_samples(tmp_path / "data")
    single = _run(loaded, csv, tmp_path / "runs1", 1)
    original = fast_module.fast_logits_batch
    seen: list[list[int]] = []

    def tight_memory(decoder, requests, **kwargs):
        lengths = [r.encoded.seq_len for r in requests]
        seen.append(lengths)
        if len(requests) > 1 or lengths[0] == max(single["samples"]["seq_len"]):
            raise torch.OutOfMemoryError("simulated: only one sample fits, and not the longest")
        return original(decoder, requests, **kwargs)

    with mock.patch.object(batched_flows.ENGINES[_settings(1).engine], "knockout_logits_batch", _wrap(tight_memory)):
        batched = _run(loaded, csv, tmp_path / "runs4", 4)
    longest = single["samples"].loc[single["samples"]["seq_len"].idxmax(), "sample_id"]
    assert batched["errors"]["sample_id"].tolist() == [longest] and batched["errors"]["stage"].tolist() == ["memory"]
    assert any(len(s) > 1 for s in seen) and all(len(s) == 1 for s in seen[-3:])
    keep = single["samples"]["sample_id"] != longest
    assert_same_rows(single["flows"][single["flows"]["sample_id"].isin(single["samples"]["sample_id"][keep])], batched["flows"], ["sample_id", "flow", "layer"])


def _wrap(batch_function):
    def knockout_logits_batch(loaded, requests, max_fold_queries):
        return batch_function(loaded.decoder, requests)

    return knockout_logits_batch
