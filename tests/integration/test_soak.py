"""Reduced soak: dozens of samples through the runner, memory sampled per sample, no growth.

The full soak (a few hundred samples) is ``benchmarks/soak.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.soak import MIB, SoakResult

# The soak runs in a fresh interpreter: the resident set of a process that has already run hundreds
# of other tests mixes their allocator state and late garbage collections into this run's numbers
# (a one-off step of a few MiB there is not a leak); a real run lives alone in its process.
_SOAK = """
import json, sys
import torch
torch.set_num_threads(2)
from vlmflow.experiments.flows import FlowSettings
from vlmflow.positions.groups import Flow, Group
from support.soak import run_soak
settings = FlowSettings(flows=(Flow(Group.IMAGE, Group.LAST), Flow(Group.QUESTION, Group.LAST)), keep_all=True, max_new_tokens=2)
result = run_soak(sys.argv[1], 30, sys.argv[2], warmup=8, settings=settings)
print(json.dumps({"rss": result.rss, "warmup": result.warmup, "seconds": result.seconds, "summary": result.summary}))
"""


@pytest.mark.slow
def test_memory_does_not_grow_across_samples(tiny_checkpoint, tmp_path):
    tests = str(Path(__file__).resolve().parents[1])  # where the ``support`` scaffolding lives
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run(
        [sys.executable, "-c", _SOAK, str(tiny_checkpoint("word-mqa")), str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = SoakResult(**json.loads(done.stdout.strip().splitlines()[-1]))
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
