"""Reduced soak: dozens of samples through the runner, memory sampled per sample, no growth.

The full soak (a few hundred samples) is ``benchmarks/soak.py``.
"""

from __future__ import annotations

from vlmflow.experiments.flows import FlowSettings
from vlmflow.positions.groups import Flow, Group
from vlmflow.testing.soak import MIB, SoakResult, run_soak


def test_memory_does_not_grow_across_samples(tiny_loaded, tmp_path):
    settings = FlowSettings(flows=(Flow(Group.IMAGE, Group.LAST), Flow(Group.QUESTION, Group.LAST)), keep_all=True, max_new_tokens=2)
    result = run_soak(tiny_loaded("word-mqa"), 30, tmp_path, warmup=8, settings=settings)
    assert len(result.rss) == 30 and result.summary["samples"] == 30 and result.summary["errors"] == 0
    # A sample's clean run alone (hidden states, keys and values) is ~100 KiB here; keeping one per
    # sample would show as a slope of that size.
    assert result.slope_kib_per_sample < 32, result.report()
    assert result.growth_mib < 4, result.report()


def test_the_soak_analysis_sees_a_leak():
    steady = SoakResult(rss=[500 * MIB + (i % 3) * 4096 for i in range(50)], warmup=10, seconds=1.0)
    leaking = SoakResult(rss=[500 * MIB + i * 200 * 1024 for i in range(50)], warmup=10, seconds=1.0)
    assert abs(steady.slope_kib_per_sample) < 1 and steady.growth_mib < 0.01
    assert 199 < leaking.slope_kib_per_sample < 201 and leaking.growth_mib > 7
    assert "slope 200.00 KiB/sample" in leaking.report()
