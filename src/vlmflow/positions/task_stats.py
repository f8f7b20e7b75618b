"""Per-task statistics of a task file: rows, related-token counts under both patch rules, padding tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from vlmflow.data.csvio import ReadResult
from vlmflow.data.sample import Box
from vlmflow.load_spec import PATCH_RULES
from vlmflow.positions.anyres import LLAVA_NEXT_PINPOINTS, anyres_geometry
from vlmflow.positions.layout import TokenGeometry
from vlmflow.positions.paper_rule import anyres_paper_rule_tokens, paper_rule_tokens
from vlmflow.positions.patches import PREPROCESS_MODES, llava_geometry

#: Image preprocessing a task file can be summarised under: LLaVA-1.5's single view or LLaVA-NeXT's anyres.
STATS_MODES = (*PREPROCESS_MODES, "anyres")
StatsMode = Literal["pad", "resize", "crop", "anyres"]


@dataclass(frozen=True)
class TaskStats:
    """Summary of one task file under one image-token geometry, with both patch rules.

    ``related_*`` and ``empty_related`` count image tokens related to the rows' boxes under
    ``rule`` (over the rows with at least one box); ``overlap_median`` and ``paper_median`` are the
    medians under each rule, ``rows_differ`` the rows whose counts differ between the rules,
    ``difference_mean`` the mean of ``paper - overlap`` over the rows with boxes and
    ``difference_max`` the largest ``|paper - overlap|``. ``n_tokens`` is the median image-token
    count (constant for a single view); ``padding_mean`` the mean number of padding-only tokens.
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
    rule: str = "overlap"
    overlap_median: float = float("nan")
    paper_median: float = float("nan")
    rows_differ: int = 0
    difference_mean: float = float("nan")
    difference_max: int = 0


def task_stats(
    result: ReadResult,
    name: str,
    *,
    mode: StatsMode = "pad",
    view_size: int = 336,
    patch_size: int = 14,
    rule: str = "overlap",
) -> TaskStats:
    """Statistics of the samples in ``result`` under a LLaVA geometry (LLaVA-1.5 ``pad`` by default;
    ``anyres``: LLaVA-NeXT's pinpoints) and both patch rules, ``rule`` giving the main columns.

    >>> from vlmflow.data.sample import Sample, SceneObject
    >>> one = Sample("q1", "img", "Q?", "yes", objects=(SceneObject("o", "1", Box(0, 0, 14, 14)),), image_size=(28, 28))
    >>> s = task_stats(ReadResult(samples=[one], errors=[]), "toy", view_size=28, patch_size=14)
    >>> s.n_tokens, s.overlap_median, s.paper_median, s.rows_differ
    (4, 1.0, 4.0, 1)
    """
    if rule not in PATCH_RULES:
        raise ValueError(f"unknown patch rule {rule!r}; valid: {', '.join(PATCH_RULES)}")
    counts: dict[str, list[int]] = {r: [] for r in PATCH_RULES}
    padding, n_tokens, absent = [], [], 0
    for sample in result.samples:
        absent += sum(o.box is None for o in sample.objects)
        if sample.image_size is None:
            continue
        geometry, paper = _geometry(sample.image_size, mode, view_size, patch_size)
        n_tokens.append(int(geometry.n_tokens))
        padding.append(int(geometry.padding_tokens().sum()))
        if sample.boxes:
            counts["overlap"].append(int(geometry.related_tokens(sample.boxes).sum()))
            counts["paper"].append(int(paper(sample.boxes).sum()))
    main = np.asarray(counts[rule], dtype=np.int64)
    diff = np.asarray(counts["paper"], dtype=np.int64) - np.asarray(counts["overlap"], dtype=np.int64)
    return TaskStats(
        name=name,
        rows=len(result.samples),
        read_errors=len(result.errors),
        n_tokens=int(np.median(n_tokens)) if n_tokens else 0,
        related_median=_median(main),
        related_mean=float(main.mean()) if len(main) else float("nan"),
        related_min=int(main.min()) if len(main) else 0,
        related_max=int(main.max()) if len(main) else 0,
        empty_related=int((main == 0).sum()),
        padding_mean=float(np.mean(padding)) if padding else float("nan"),
        objects_absent=absent,
        rule=rule,
        overlap_median=_median(np.asarray(counts["overlap"])),
        paper_median=_median(np.asarray(counts["paper"])),
        rows_differ=int((diff != 0).sum()),
        difference_mean=float(diff.mean()) if len(diff) else float("nan"),
        difference_max=int(np.abs(diff).max()) if len(diff) else 0,
    )


def _median(counts: np.ndarray) -> float:
    return float(np.median(counts)) if len(counts) else float("nan")


def _geometry(
    image_size: tuple[int, int], mode: str, view_size: int, patch_size: int
) -> tuple[TokenGeometry, Callable[[Sequence[Box]], np.ndarray]]:
    """The geometry of one image (its overlap rule) and its paper rule (boxes -> related tokens)."""
    if mode == "anyres":
        layout = anyres_geometry(image_size, view_size=view_size, patch_size=patch_size, pinpoints=LLAVA_NEXT_PINPOINTS)

        def anyres_paper(boxes: Sequence[Box]) -> np.ndarray:
            return anyres_paper_rule_tokens(image_size, boxes, layout, view_size=view_size, patch_size=patch_size)

        return layout, anyres_paper
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; valid: {', '.join(STATS_MODES)}")
    geometry = llava_geometry(image_size, mode=mode, view_size=view_size, patch_size=patch_size)  # type: ignore[arg-type]

    def single_paper(boxes: Sequence[Box]) -> np.ndarray:
        return paper_rule_tokens(image_size, boxes, mode=mode, view_size=view_size, patch_size=patch_size)  # type: ignore[arg-type]

    return geometry, single_paper
