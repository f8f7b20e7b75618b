"""Analytic box-to-token mappings of Qwen2-VL, Qwen3-VL, Gemma-3, Idefics3 / SmolVLM and InternVL against pixel
oracles that run the real transformers image processors (and the real projector / pixel shuffle).

CI checks random geometries on small and released configurations, the token counts against the
processors' own counting functions on every released GQA image size, and one mask (16 geometries)
per image size for a spread of 40 released sizes. ``VLMFLOW_FULL_ORACLE=1`` runs every released
geometry (5,385 distinct ones) for every released configuration (about 4 CPU minutes for all seven;
docs/video.md gives the last result).
"""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np
import pytest

from support.family_oracles import (
    gemma3_reader,
    idefics3_reader,
    internvl_reader,
    qwen2_vl_reader,
    run_oracle,
    siglip_reader,
)
from vlmflow.data.datasets import load_samples, released_specs
from vlmflow.data.sample import Box
from vlmflow.positions.dynamic_grid import (
    QWEN2_VL_MAX_PIXELS,
    QWEN2_VL_MIN_PIXELS,
    QWEN3_VL_MAX_PIXELS,
    QWEN3_VL_MIN_PIXELS,
    dynamic_geometry,
)
from vlmflow.positions.dynamic_tiles import internvl_geometry
from vlmflow.positions.patches import llava_geometry
from vlmflow.positions.split_tiles import split_geometry

#: name -> (analytic layout for an image size, oracle reader factory). "tiny" = the test models'.
CONFIGS = {
    "qwen2_vl": (
        lambda s: dynamic_geometry(s),
        lambda: qwen2_vl_reader(patch_size=14, merge_size=2, min_pixels=QWEN2_VL_MIN_PIXELS, max_pixels=QWEN2_VL_MAX_PIXELS),
    ),
    "qwen2_vl-tiny": (
        lambda s: dynamic_geometry(s, patch_size=4, merge_size=2, min_pixels=256, max_pixels=4096),
        lambda: qwen2_vl_reader(patch_size=4, merge_size=2, min_pixels=256, max_pixels=4096),
    ),
    "qwen3_vl": (
        lambda s: dynamic_geometry(s, patch_size=16, merge_size=2, min_pixels=QWEN3_VL_MIN_PIXELS, max_pixels=QWEN3_VL_MAX_PIXELS),
        lambda: qwen2_vl_reader(patch_size=16, merge_size=2, min_pixels=QWEN3_VL_MIN_PIXELS, max_pixels=QWEN3_VL_MAX_PIXELS),
    ),
    "gemma3": (
        lambda s: llava_geometry(s, mode="resize", view_size=896, patch_size=56),
        lambda: gemma3_reader(image_size=896, patch_size=14, tokens_per_image=256),
    ),
    "gemma3-tiny": (
        lambda s: llava_geometry(s, mode="resize", view_size=32, patch_size=8),
        lambda: gemma3_reader(image_size=32, patch_size=4, tokens_per_image=16),
    ),
    "paligemma-448": (
        lambda s: llava_geometry(s, mode="resize", view_size=448, patch_size=14),
        lambda: siglip_reader(image_size=448, patch_size=14),
    ),
    "idefics3": (
        lambda s: split_geometry(s, longest_edge=1456, tile_size=364, patch_size=14, scale_factor=2),
        lambda: idefics3_reader(longest_edge=1456, tile_size=364, patch_size=14, scale_factor=2),
    ),
    "smolvlm-2b": (  # 384-px tiles of 14-px patches: the last 6 pixel rows/columns are never seen
        lambda s: split_geometry(s, longest_edge=1536, tile_size=384, patch_size=14, scale_factor=3),
        lambda: idefics3_reader(longest_edge=1536, tile_size=384, patch_size=14, scale_factor=3),
    ),
    "internvl": (
        lambda s: internvl_geometry(s),
        lambda: internvl_reader(tile_size=448, patch_size=14, scale_factor=2, max_tiles=12),
    ),
    "internvl-tiny": (
        lambda s: internvl_geometry(s, tile_size=32, patch_size=4, scale_factor=2, max_tiles=6),
        lambda: internvl_reader(tile_size=32, patch_size=4, scale_factor=2, max_tiles=6),
    ),
    "idefics3-tiny-nosplit": (
        lambda s: split_geometry(s, longest_edge=32, tile_size=16, patch_size=4, scale_factor=2, splitting=False),
        lambda: idefics3_reader(longest_edge=32, tile_size=16, patch_size=4, scale_factor=2, splitting=False),
    ),
}
RELEASED = ("qwen2_vl", "qwen3_vl", "gemma3", "paligemma-448", "idefics3", "smolvlm-2b", "internvl")


def _disagreements(name: str, geometries) -> list:
    analytic, reader = CONFIGS[name]
    oracle = run_oracle(geometries, reader())
    bad = []
    for (size, boxes), seen in zip(geometries, oracle, strict=True):
        layout = analytic(size)
        related = layout.related_tokens(boxes)
        if not (len(related) == len(seen.related) and np.array_equal(related, seen.related)
                and np.array_equal(layout.padding_tokens(), seen.padding)):
            bad.append((size, boxes))
    return bad


def _random_geometries(seed: int, n: int, max_side: int) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(6, max_side, 2))
        boxes = []
        for _ in range(int(rng.integers(0, 4))):
            x, y = rng.uniform(-5, w), rng.uniform(-5, h)
            bw, bh = rng.uniform(0.3, w / 2 + 1), rng.uniform(0.3, h / 2 + 1)
            if rng.random() < 0.5:
                x, y, bw, bh = float(int(x)), float(int(y)), float(int(bw) + 1), float(int(bh) + 1)
            boxes.append(Box(x, y, bw, bh))
        out.append(((w, h), tuple(boxes)))
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_analytic_equals_oracle_on_random_geometries(name):
    max_side = 90 if name.endswith(("tiny", "nosplit")) else 700
    geometries = _random_geometries(sorted(CONFIGS).index(name), 12, max_side)
    assert _disagreements(name, geometries) == []


def _released_by_size() -> dict[tuple[int, int], list]:
    by_size: dict[tuple[int, int], list] = defaultdict(list)
    for spec in released_specs():
        result, _ = load_samples(spec)
        for s in result.samples:
            geometry = (s.image_size, tuple(s.boxes))
            if geometry not in by_size[s.image_size]:
                by_size[s.image_size].append(geometry)
    return by_size


@pytest.fixture(scope="module")
def released_by_size():
    return _released_by_size()


def test_token_counts_equal_the_processors_own_counts_on_every_released_size(released_by_size):
    from transformers import GotOcr2ImageProcessorPil, Idefics3ImageProcessorPil, Qwen2VLImageProcessorPil

    qwen = Qwen2VLImageProcessorPil()
    qwen3 = Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, size={"shortest_edge": QWEN3_VL_MIN_PIXELS, "longest_edge": QWEN3_VL_MAX_PIXELS}
    )
    idefics = Idefics3ImageProcessorPil(size={"longest_edge": 1456}, max_image_size={"longest_edge": 364})
    internvl = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True, max_patches=12)
    assert len(released_by_size) == 461
    for width, height in released_by_size:
        patches = qwen.get_number_of_image_patches(height, width, {})
        assert dynamic_geometry((width, height)).n_tokens == patches // 4
        patches = qwen3.get_number_of_image_patches(height, width, {})
        layout = dynamic_geometry((width, height), patch_size=16, min_pixels=QWEN3_VL_MIN_PIXELS, max_pixels=QWEN3_VL_MAX_PIXELS)
        assert layout.n_tokens == patches // 4
        _, rows, cols = idefics.get_number_of_image_patches(height, width, {})
        layout = split_geometry((width, height), longest_edge=1456, tile_size=364, patch_size=14, scale_factor=2)
        assert (layout.rows, layout.cols) == (rows, cols)
        assert layout.n_tokens == 169 * (rows * cols + (1 if rows or cols else 0) or 1)
        assert internvl_geometry((width, height)).n_tokens == 256 * internvl.get_number_of_image_patches(height, width, {})


@pytest.mark.parametrize("name", RELEASED)
def test_analytic_equals_oracle_on_a_spread_of_released_sizes(name, released_by_size):
    """One mask per size (its first 16 geometries): the 10 commonest sizes and 30 spread over the rest."""
    sizes = sorted(released_by_size, key=lambda s: -len(released_by_size[s]))
    chosen = sizes[:10] + sizes[10::15][:30]
    geometries = [g for size in chosen for g in released_by_size[size][:16]]
    assert _disagreements(name, geometries) == []


@pytest.mark.skipif(not os.environ.get("VLMFLOW_FULL_ORACLE"), reason="set VLMFLOW_FULL_ORACLE=1 (minutes)")
@pytest.mark.parametrize("name", RELEASED)
def test_analytic_equals_oracle_on_every_released_geometry(name, released_by_size):
    geometries = [g for size in released_by_size for g in released_by_size[size]]
    assert len(geometries) == 5385
    bad = _disagreements(name, geometries)
    assert bad == [], f"{len(bad)} of {len(geometries)} disagree, e.g. {bad[:3]}"
