"""The grid cost model: its bounds behave, and the table in docs/scale-out.md is the one it computes."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmflow.distributed.cost import (
    PAPER_TASK_SIZES,
    ModelCost,
    grid_markdown,
    grid_seconds,
    paper_models,
    run_seconds,
)
from vlmflow.errors import ConfigError

DOC = Path(__file__).resolve().parents[3] / "docs" / "scale-out.md"


def test_one_gpu_is_the_serial_sum():
    models = [ModelCost("a", 0.5, load_seconds=30), ModelCost("b", 2.0, load_seconds=90)]
    serial = 30 + 90 + sum(PAPER_TASK_SIZES) * (0.5 + 2.0)
    assert grid_seconds(models, 1) == pytest.approx(serial)
    assert grid_seconds(models, 1, balanced=True) == pytest.approx(serial)
    assert sum(PAPER_TASK_SIZES) == 5525


@pytest.mark.parametrize("t", [0.1, 1.0, 7.0])
def test_more_gpus_take_less_time_and_the_bounds_bracket_the_ideal(t):
    models = paper_models(t)
    previous = float("inf")
    for n in (1, 2, 8, 16, 64):
        low, high = grid_seconds(models, n, balanced=True), grid_seconds(models, n)
        assert low <= high < previous
        ideal = (
            sum(m.load_seconds for m in models)
            + sum(PAPER_TASK_SIZES) * sum(m.seconds_per_sample for m in models) / n
        )
        assert low == pytest.approx(ideal)
        previous = high


def test_run_tail_is_at_most_one_shard():
    # 1000 samples on 8 GPUs, shards of 32: 125 s of work each plus at most 7/8 of a 32-s shard.
    assert run_seconds(1000, 1.0, 8) == pytest.approx(125 + 7 / 8 * 32)
    assert run_seconds(1000, 1.0, 8, shard_size=8) == pytest.approx(125 + 7 / 8 * 8)


def test_bad_inputs_are_refused():
    with pytest.raises(ConfigError, match="gpus must be >= 1"):
        run_seconds(10, 1.0, 0)
    with pytest.raises(ConfigError, match="'m': seconds_per_sample must be > 0"):
        ModelCost("m", 0.0)


def test_the_documented_table_is_the_computed_one():
    assert grid_markdown() in DOC.read_text(encoding="utf-8")
