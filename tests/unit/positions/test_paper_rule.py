"""The paper's box rule (``patch_rule="paper"``): single view and anyres, against independent references.

* the masks resized with PIL directly give the same tokens as the Hugging Face PIL image processors
  (rescaling and normalisation off) for every preprocessing mode and for anyres;
* with nearest resampling the paper's inclusive rectangle is the half-open box one pixel wider and
  taller, so the anyres rule must then equal the overlap geometry (checked against the real
  processor and the model's packing elsewhere) on such boxes: this checks the base view, the grid,
  the un-padding and the newline tokens of the rule's packing;
* an :class:`ImageLayout` with a rule uses it for ``related`` and keeps the geometry for pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlmflow.data.sample import Box
from vlmflow.positions.anyres import LLAVA_NEXT_PINPOINTS, anyres_geometry
from vlmflow.positions.layout import ImageLayout
from vlmflow.positions.paper_rule import (
    anyres_paper_rule_tokens,
    mask_processor,
    next_mask_processor,
    paper_mask,
    paper_rule_tokens,
    red_patches,
)
from vlmflow.positions.patches import llava_geometry

NEAREST, BICUBIC = Image.Resampling.NEAREST, Image.Resampling.BICUBIC


def _integer_geometries(rng: np.random.Generator, n: int, max_side: int) -> list:
    """Random image sizes (some elongated) with 0-3 integer boxes, some past the image's edges."""
    out = []
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(4, max_side, 2))
        if rng.random() < 0.15:
            w, h = (w, max(2, h // 8)) if rng.random() < 0.5 else (max(2, w // 8), h)
        boxes = []
        for _ in range(int(rng.integers(0, 4))):
            x, y = int(rng.integers(-3, w)), int(rng.integers(-3, h))
            boxes.append(Box(x, y, int(rng.integers(1, w // 2 + 2)), int(rng.integers(1, h // 2 + 2))))
        out.append(((w, h), tuple(boxes)))
    return out


def test_paper_mask_is_the_inclusive_rectangle():
    red = np.asarray(paper_mask((6, 5), [Box(1, 2, 2, 1)]))
    assert np.argwhere(np.all(red == (255, 0, 0), axis=-1)).tolist() == [[2, 1], [2, 2], [2, 3], [3, 1], [3, 2], [3, 3]]
    assert np.all(red[0, 0] == (0, 255, 0))


def test_red_patches_needs_all_three_channels_exact():
    view = np.zeros((4, 4, 3), dtype=np.float32)
    view[0, 0] = (255, 0, 0)
    view[3, 3] = (255, 1, 0)  # nearly red is not red
    assert red_patches(view, 2).tolist() == [[True, False], [False, False]]
    assert red_patches(np.moveaxis(view, -1, 0), 2).tolist() == [[True, False], [False, False]]


@pytest.mark.parametrize("mode", ["pad", "resize", "crop"])
@pytest.mark.parametrize("resample", [NEAREST, BICUBIC], ids=["nearest", "bicubic"])
def test_single_view_equals_the_hf_processor(mode, resample):
    rng = np.random.default_rng(["pad", "resize", "crop"].index(mode))
    processor = mask_processor(mode, 42, resample=resample)
    for size, boxes in _integer_geometries(rng, 40, 120):
        ours = paper_rule_tokens(size, boxes, mode=mode, view_size=42, patch_size=14, resample=resample)
        theirs = paper_rule_tokens(size, boxes, view_size=42, patch_size=14, processor=processor)
        assert np.array_equal(ours, theirs), (mode, size, boxes)


@pytest.mark.parametrize(
    "view, pins, max_side",
    [(42, tuple((h // 8, w // 8) for h, w in LLAVA_NEXT_PINPOINTS), 200), (336, LLAVA_NEXT_PINPOINTS, 700)],
    ids=["small", "llava-next"],
)
def test_anyres_equals_the_hf_processor(view, pins, max_side):
    rng = np.random.default_rng(view)
    processor = next_mask_processor(view, pins)
    n = 30 if view == 42 else 6
    related = 0
    for size, boxes in _integer_geometries(rng, n, max_side):
        layout = anyres_geometry(size, view_size=view, patch_size=14, pinpoints=pins)
        ours = anyres_paper_rule_tokens(size, boxes, layout, view_size=view, patch_size=14)
        theirs = anyres_paper_rule_tokens(size, boxes, layout, view_size=view, patch_size=14, processor=processor)
        assert ours.shape == (layout.n_tokens,)
        assert np.array_equal(ours, theirs), (size, boxes)
        assert not (ours & layout.newline_tokens()).any()
        related += int(ours.sum())
    assert related > 0


@pytest.mark.parametrize("unseen", [False, True], ids=["336-like", "384-like"])
def test_anyres_with_nearest_is_overlap_on_one_pixel_larger_boxes(unseen):
    """Base view, grid, un-padding and newlines of the rule's packing, against the oracle-checked geometry.

    ``unseen``: 45 px views of 14 px patches, so the last 3 pixels of each crop are never seen.
    """
    view = 45 if unseen else 42
    pins = ((view, 2 * view), (2 * view, view), (2 * view, 2 * view), (3 * view, view), (view, 3 * view))
    rng = np.random.default_rng(7 + unseen)
    checked = {"base": 0, "grid": 0}
    for size, boxes in _integer_geometries(rng, 60, 240):
        layout = anyres_geometry(size, view_size=view, patch_size=14, pinpoints=pins)
        paper = anyres_paper_rule_tokens(size, boxes, layout, view_size=view, patch_size=14, resample=NEAREST)
        larger = [Box(b.x, b.y, b.w + 1, b.h + 1) for b in boxes]
        assert np.array_equal(paper, layout.related_tokens(larger)), (size, boxes)
        checked["base"] += int((paper & layout.base_tokens()).sum())
        checked["grid"] += int((paper & layout.grid_tokens()).sum())
    assert checked["base"] > 0 and checked["grid"] > 0


def _neighbours(mask: np.ndarray, offsets: list[tuple[int, int]]) -> list[np.ndarray]:
    """``mask`` shifted by each ``(dy, dx)``, outside the grid False."""
    padded = np.pad(mask, 1)
    rows, cols = mask.shape
    return [padded[1 + dy : 1 + dy + rows, 1 + dx : 1 + dx + cols] for dy, dx in offsets]


def test_bicubic_paper_rule_differs_from_overlap_only_at_box_borders():
    """LLaVA-1.5 on GQA-sized images. A red pixel after the bicubic resize lies within the kernel's
    reach (2 source pixels per output pixel, times the downscale) of the inclusive rectangle, so a
    paper-related patch shows a pixel of the box grown by that much; and for one box, a patch whose
    four neighbours are related too (the box covers it) is paper-related."""
    rng = np.random.default_rng(3)
    differ = interior_checked = 0
    for size, boxes in _integer_geometries(rng, 40, 600):
        geometry = llava_geometry(size, mode="pad", view_size=336, patch_size=14)
        overlap = geometry.related_tokens(boxes).reshape(24, 24)
        paper = paper_rule_tokens(size, boxes).reshape(24, 24)
        reach = int(np.ceil(2 * max(1.0, max(size) / 336)))
        grown = [Box(b.x - reach, b.y - reach, b.w + 1 + 2 * reach, b.h + 1 + 2 * reach) for b in boxes]
        assert not (paper & ~geometry.related_tokens(grown).reshape(24, 24)).any(), (size, boxes)
        if len(boxes) == 1:
            interior = np.logical_and.reduce([overlap, *_neighbours(overlap, [(-1, 0), (1, 0), (0, -1), (0, 1)])])
            assert not (interior & ~paper).any(), (size, boxes)
            interior_checked += int(interior.sum())
        differ += int((paper != overlap).sum())
    assert differ > 0 and interior_checked > 0  # the rules differ, and the interior check saw patches


def test_image_layout_uses_its_rule_and_checks_its_shape():
    geometry = llava_geometry((28, 28), mode="resize", view_size=28, patch_size=14)
    box = [Box(0, 0, 14, 14)]
    assert geometry.related_tokens(box).sum() == 1
    calls = []

    def rule(boxes):
        calls.append(boxes)
        return paper_rule_tokens((28, 28), boxes, view_size=28, patch_size=14)

    layout = ImageLayout(4, geometry, related_rule=rule)
    assert layout.related(box).sum() == 4  # the inclusive rectangle reaches the next patch row and column
    assert layout.related(list(box)).sum() == 4 and len(calls) == 1  # the same boxes again: rendered once
    assert layout.geometry.related_tokens(box).sum() == 1  # pixels: still the geometry
    with pytest.raises(ValueError, match=r"gave \(3,\) related flags for 4 image tokens"):
        ImageLayout(4, geometry, related_rule=lambda boxes: np.zeros(3, dtype=bool)).related(box)


@pytest.mark.slow
def test_released_rows_equal_the_hf_processor():
    """LLaVA-1.5 and LLaVA-NeXT at their real sizes on 1000 released samples' image sizes and boxes
    (a seeded draw: all 5,525 agree too, but checking them takes about 5 CPU minutes)."""
    from vlmflow.data.datasets import load_samples, released_specs

    single, anyres = mask_processor("pad", 336, resample=BICUBIC), next_mask_processor(336, LLAVA_NEXT_PINPOINTS)
    rows = [(s.image_size, s.boxes) for spec in released_specs() for s in load_samples(spec)[0].samples]
    assert len(rows) == 5525
    bad = []
    for i in np.random.default_rng(0).choice(len(rows), 1000, replace=False):
        size, boxes = rows[i]
        if not np.array_equal(paper_rule_tokens(size, boxes), paper_rule_tokens(size, boxes, processor=single)):
            bad.append(("llava-1.5", size, boxes))
        layout = anyres_geometry(size, view_size=336, patch_size=14, pinpoints=LLAVA_NEXT_PINPOINTS)
        ours = anyres_paper_rule_tokens(size, boxes, layout, view_size=336, patch_size=14)
        if not np.array_equal(ours, anyres_paper_rule_tokens(size, boxes, layout, view_size=336, patch_size=14, processor=anyres)):
            bad.append(("llava-next", size, boxes))
    assert bad == [], f"{len(bad)} disagree, e.g. {bad[:3]}"
