"""The runner's batches, without a model: data order, per-sample error rows, halving after a failure,
and the automatic batch size."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from vlmflow.data.sample import Sample
from vlmflow.errors import SampleError
from vlmflow.experiments import batching
from vlmflow.experiments.batching import auto_batch_size, batched_tables, per_sample_bytes


def _samples(n: int) -> list[Sample]:
    return [Sample(f"s{i}", f"img{i}", "Is it red?", "red") for i in range(n)]


def _prepare(sample: Sample):
    if sample.sample_id == "s2":
        raise SampleError("image file not found", stage="image")
    return SimpleNamespace(sample=sample, encoded=SimpleNamespace(seq_len=10))


@dataclass
class Fake:
    """An experiment whose batches fail as told: out of memory above ``fits`` samples, a sample error for
    ``bad`` (pinned on it, or raised for the whole batch when ``unpinned``)."""

    fits: int = 100
    bad: str | None = None
    unpinned: bool = False
    batches: list[list[str]] = field(default_factory=list)

    def analyse_batch(self, loaded, prepared):
        ids = [p.sample.sample_id for p in prepared]
        self.batches.append(ids)
        if len(ids) > self.fits:
            raise torch.OutOfMemoryError("simulated")
        if self.unpinned and self.bad in ids:
            raise SampleError("simulated: not pinned on a sample", stage="knockout")
        return [SampleError("simulated", stage="forward") if i == self.bad else {"samples": [i]} for i in ids]


def _run(experiment, n=7, size=3):
    return list(batched_tables(None, _samples(n), _prepare, experiment, size))


def _ids(tables):
    return [t["samples"][0] if "samples" in t else ("error", t["errors"][0].sample_id, t["errors"][0].stage) for t in tables]


def test_tables_come_per_sample_in_data_order_and_a_bad_sample_is_one_error_row():
    experiment = Fake(bad="s4")
    tables = _run(experiment)
    assert _ids(tables) == ["s0", "s1", ("error", "s2", "image"), "s3", ("error", "s4", "forward"), "s5", "s6"]
    assert experiment.batches == [["s0", "s1", "s3"], ["s4", "s5", "s6"]]  # the unpreparable sample does not take a place


def test_out_of_memory_halves_the_batch_for_the_rest_of_the_run():
    experiment = Fake(fits=1)
    tables = _run(experiment, n=6, size=4)
    assert _ids(tables) == ["s0", "s1", ("error", "s2", "image"), "s3", "s4", "s5"]
    assert experiment.batches[:3] == [["s0", "s1", "s3", "s4"], ["s0", "s1"], ["s0"]]
    assert all(len(b) <= 1 for b in experiment.batches[experiment.batches.index(["s0"]):])


def test_a_sample_that_never_fits_and_an_unpinned_error_cost_only_that_sample():
    tables = _run(Fake(fits=0), n=2, size=2)
    assert [(t["errors"][0].sample_id, t["errors"][0].stage) for t in tables] == [("s0", "memory"), ("s1", "memory")]
    experiment = Fake(bad="s5", unpinned=True)
    assert _ids(_run(experiment)) == ["s0", "s1", ("error", "s2", "image"), "s3", "s4", ("error", "s5", "knockout"), "s6"]


def test_the_automatic_batch_size_follows_the_free_memory(monkeypatch):
    config = SimpleNamespace(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008)
    decoder = SimpleNamespace(device=torch.device("cpu"), dtype=torch.bfloat16, language_model=SimpleNamespace(config=config))
    loaded = SimpleNamespace(decoder=decoder)
    assert auto_batch_size(loaded, 634) == 1  # CPU: one sample at a time
    need = per_sample_bytes(config, int(634 * 1.25), dtype_bytes=2)
    assert auto_batch_size(loaded, 634, free_bytes=10 * need) == int(10 * batching.MEMORY_SHARE)
    assert auto_batch_size(loaded, 634, free_bytes=need // 10) == 1
    assert auto_batch_size(loaded, 634, free_bytes=10**15) == batching.MAX_AUTO_BATCH
    assert per_sample_bytes(config, 2400, dtype_bytes=2) > per_sample_bytes(config, 634, dtype_bytes=2)


@pytest.mark.parametrize("size", [None])
def test_automatic_size_is_chosen_from_the_first_prepared_sample(monkeypatch, size):
    seen = []
    monkeypatch.setattr(batching, "auto_batch_size", lambda loaded, n: seen.append(n) or 2)
    experiment = Fake()
    _run(experiment, n=5, size=size)
    assert seen == [10] and experiment.batches == [["s0", "s1"], ["s3", "s4"]]
