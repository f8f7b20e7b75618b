"""Per-task statistics of a task file: rows, related-token counts and padding tokens for a geometry."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmflow.data.csvio import ReadResult
from vlmflow.positions.patches import PreprocessMode, llava_geometry


@dataclass(frozen=True)
class TaskStats:
    """Summary of one task file under one image-token geometry.

    ``related_*`` count image tokens whose patch shows a box pixel (:mod:`vlmflow.positions.patches`),
    over the rows with at least one box; ``padding_mean`` is the mean number of padding-only tokens.
    """

    name: str
    rows: int
    read_errors: int
    n_tokens: int
    related_median: float
    related_mean: float
    related_min: int
    related_max: int
    empty_related: int  # rows whose boxes cover no token (e.g. a box outside its image)
    padding_mean: float
    objects_absent: int  # objects the question names that are not in the image (no box)


def task_stats(
    result: ReadResult, name: str, *, mode: PreprocessMode = "pad", view_size: int = 336, patch_size: int = 14
) -> TaskStats:
    """Statistics of the samples in ``result`` under a single-view LLaVA geometry (LLaVA-1.5 by default).

    >>> from vlmflow.data.datasets import load_samples
    >>> result, task = load_samples("gqa:QueryAttr")
    >>> s = task_stats(result, task)
    >>> s.rows, s.n_tokens, s.empty_related
    (1000, 576, 1)
    """
    related, padding, n_tokens = [], [], 0
    absent = 0
    for sample in result.samples:
        absent += sum(o.box is None for o in sample.objects)
        if sample.image_size is None:
            continue
        geometry = llava_geometry(sample.image_size, mode=mode, view_size=view_size, patch_size=patch_size)
        n_tokens = geometry.n_tokens
        padding.append(int(geometry.padding_tokens().sum()))
        if sample.boxes:
            related.append(int(geometry.related_tokens(sample.boxes).sum()))
    counts = np.asarray(related, dtype=np.int64)
    return TaskStats(
        name=name,
        rows=len(result.samples),
        read_errors=len(result.errors),
        n_tokens=n_tokens,
        related_median=float(np.median(counts)) if len(counts) else float("nan"),
        related_mean=float(counts.mean()) if len(counts) else float("nan"),
        related_min=int(counts.min()) if len(counts) else 0,
        related_max=int(counts.max()) if len(counts) else 0,
        empty_related=int((counts == 0).sum()),
        padding_mean=float(np.mean(padding)) if padding else float("nan"),
        objects_absent=absent,
    )
