"""The paper's whole GQA grid (4 models x 6 tasks x 6 flows) projected from the measured rates.

The grid is every sample of the six released task files (5,525) under the six flows, for each of
the paper's four models. A model's time is its samples times the measured six-flow time per sample
of its workload (vlmflow at the batch size measured, and the paper's procedure); LLaVA-v1.6-Vicuna-7b
has no workload of its own: it is the NeXT workload's time (the same anyres sequence lengths,
2,144-2,928 positions) scaled by the ratio of their decoder layers' multiply-adds per token
(Llama-2-7B's 32 key/value heads and 11,008-wide MLP against Llama-3-8B's 8 and 14,336).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Rows of the six released task files (ChooseAttr, ChooseCat, ChooseRel, CompareAttr, LogicalObj, QueryAttr).
GRID_SAMPLES = 1000 + 1000 + 964 + 570 + 991 + 1000


def _layer_macs(hidden: int, kv_heads: int, heads: int, intermediate: int) -> int:
    head_dim = hidden // heads
    return hidden * (2 * heads * head_dim + 2 * kv_heads * head_dim) + 3 * hidden * intermediate


#: Paper model -> (workload measured for it, factor on that workload's time).
PAPER_MODELS: dict[str, tuple[str, float]] = {
    "LLaVA-1.5-7b": ("llava15", 1.0),
    "LLaVA-1.5-13b": ("13b", 1.0),
    "LLaVA-v1.6-Vicuna-7b": ("next", _layer_macs(4096, 32, 32, 11008) / _layer_macs(4096, 8, 32, 14336)),
    "Llama3-LLaVA-NeXT-8b": ("next", 1.0),
}


@dataclass(frozen=True)
class GridRow:
    """One paper model's share of the grid, in device-hours."""

    model: str
    workload: str
    vlmflow_hours: float
    baseline_hours: float


def project(per_sample: dict[str, tuple[float, float]]) -> list[GridRow]:
    """Per paper model whose workload was measured: hours for the grid.

    ``per_sample``: workload name -> (vlmflow seconds, baseline seconds) per sample, six flows.

    >>> [round(r.vlmflow_hours, 2) for r in project({"llava15": (1.0, 50.0)})]
    [1.53]
    """
    rows = []
    for model, (workload, factor) in PAPER_MODELS.items():
        if workload in per_sample:
            ours, theirs = per_sample[workload]
            rows.append(GridRow(model, workload, GRID_SAMPLES * ours * factor / 3600, GRID_SAMPLES * theirs * factor / 3600))
    return rows


def report(rows: list[GridRow], device: str) -> None:
    """Print the projection (and say which models it lacks)."""
    print(f"\nthe paper's GQA grid ({GRID_SAMPLES:,} samples x 6 flows per model), projected in {device}-hours:")
    for r in rows:
        print(f"  {r.model:<24} (from {r.workload:<7}) vlmflow {r.vlmflow_hours:7.2f} h   paper's procedure {r.baseline_hours:8.1f} h")
    missing = [m for m, (w, _) in PAPER_MODELS.items() if m not in {r.model for r in rows}]
    total_ours, total_theirs = sum(r.vlmflow_hours for r in rows), sum(r.baseline_hours for r in rows)
    print(f"  total over {len(rows)} models: vlmflow {total_ours:.2f} h, paper's procedure {total_theirs:.1f} h"
          + (f" (not measured: {', '.join(missing)})" if missing else ""))
