"""Soak run: many samples through the real runner with the process's memory sampled after each one.

A long GQA run is thousands of samples; memory that grows by a little per sample (a cache that is
never cleared, hooks that are never removed, tensors kept by a closure) ends it hours in. The soak
runs a few hundred samples and fits a line through the resident set size (RSS) after a warm-up:
the slope must be about zero.

``benchmarks/soak.py`` is the command line around :func:`run_soak`.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from support.dataset import write_scene_dataset
from vlmflow.experiments.flows import FlowSettings
from vlmflow.experiments.runner import DataSpec, ModelSpec, RunSpec, run_to_store
from vlmflow.loading import LoadedModel, load_model

MIB = 1024 * 1024


@dataclass
class SoakResult:
    """RSS (bytes) after each sample and what it says.

    Attributes:
        rss: resident set size after sample ``i`` (index ``i``), in bytes.
        warmup: samples skipped before measuring growth (allocator pools, lazy inits).
        seconds: wall time of the run.
        summary: the run's summary.
    """

    rss: list[int]
    warmup: int
    seconds: float
    summary: dict = field(default_factory=dict)

    @property
    def measured(self) -> np.ndarray:
        return np.asarray(self.rss[self.warmup :], dtype=np.float64)

    @property
    def slope_kib_per_sample(self) -> float:
        """Least-squares slope of RSS over the measured samples, KiB per sample."""
        y = self.measured
        if len(y) < 2:
            return 0.0
        return float(np.polyfit(np.arange(len(y)), y, 1)[0] / 1024)

    @property
    def growth_mib(self) -> float:
        """Largest RSS after the warm-up minus the RSS at the end of the warm-up, MiB."""
        y = self.measured
        return float((y.max() - y[0]) / MIB) if len(y) else 0.0

    def report(self) -> str:
        """A few lines for people: start, end of warm-up, end, peak, slope."""
        rss = np.asarray(self.rss, dtype=np.float64) / MIB
        w = min(self.warmup, len(rss) - 1)
        return (
            f"samples {len(rss)} in {self.seconds:.1f} s; RSS MiB: after sample 1 {rss[0]:.1f}, "
            f"after warm-up (sample {w + 1}) {rss[w]:.1f}, end {rss[-1]:.1f}, peak {rss.max():.1f}; "
            f"growth after warm-up {self.growth_mib:.2f} MiB, slope {self.slope_kib_per_sample:.2f} KiB/sample"
        )


def run_soak(
    model: str | Path | LoadedModel,
    n_samples: int,
    folder: Path | str,
    *,
    warmup: int = 10,
    settings: FlowSettings | None = None,
) -> SoakResult:
    """Run the flow experiment over ``n_samples`` synthetic scene samples, sampling RSS after each.

    ``model`` is a checkpoint path or a loaded model; the data and the run directory go to ``folder``.

    >>> result = run_soak("tiny-llava", 300, "soak")   # doctest: +SKIP
    >>> result.slope_kib_per_sample < 10               # doctest: +SKIP
    True
    """
    folder = Path(folder)
    csv = write_scene_dataset(folder / "data", n_samples)
    loaded = model if isinstance(model, LoadedModel) else None
    spec = RunSpec(
        ModelSpec(str(model) if loaded is None else "in-memory", device="cpu"),
        DataSpec(str(csv)),
        settings or FlowSettings(keep_all=True),
        name="soak",
    )
    if loaded is None:
        loaded = load_model(spec.model)
    process = psutil.Process()
    rss: list[int] = []

    def sample_memory(done: int, total: int, message: str) -> None:
        if done > len(rss):
            gc.collect(1)  # young garbage (a full collection costs ~0.2 s with torch loaded)
            rss.append(process.memory_info().rss)

    started = time.perf_counter()
    outcome = run_to_store(spec, folder / "runs", loaded=loaded, progress=sample_memory)
    return SoakResult(rss=rss, warmup=min(warmup, max(0, len(rss) - 2)), seconds=time.perf_counter() - started, summary=outcome.summary)
