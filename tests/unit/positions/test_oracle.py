"""The analytic box-to-token mapping against the pixel oracle (the real HF image processor)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from support.oracle import oracle_tokens
from vlmflow.data.datasets import load_samples, released_specs
from vlmflow.data.sample import Box
from vlmflow.positions.paper_rule import mask_processor, paper_rule_tokens
from vlmflow.positions.patches import llava_geometry

MODES = ("pad", "resize", "crop")


def _disagreements(geometries, mode, view_size, patch_size):
    oracle = oracle_tokens(geometries, mode=mode, view_size=view_size, patch_size=patch_size)
    bad = []
    for (size, boxes), seen in zip(geometries, oracle, strict=True):
        layout = llava_geometry(size, mode=mode, view_size=view_size, patch_size=patch_size)
        if not (
            np.array_equal(layout.related_tokens(boxes), seen.related)
            and np.array_equal(layout.padding_tokens(), seen.padding)
        ):
            bad.append((size, boxes))
    return bad


def _random_geometries(rng: np.random.Generator, n: int) -> list:
    out = []
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(1, 260, 2))
        if rng.random() < 0.1:
            w = int(rng.choice([640, 800, 1024]))
        boxes = []
        for _ in range(int(rng.integers(0, 4))):
            x, y = rng.uniform(-10, w), rng.uniform(-10, h)
            bw, bh = rng.uniform(0.3, w / 2 + 1), rng.uniform(0.3, h / 2 + 1)
            if rng.random() < 0.5:  # GQA boxes are integers
                x, y, bw, bh = (float(np.floor(v)) + (1 if k > 1 else 0) for k, v in enumerate((x, y, bw, bh)))
            boxes.append(Box(x, y, bw, bh))
        out.append(((w, h), tuple(boxes)))
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("view_size, patch_size", [(28, 7), (42, 14), (336, 14)])
def test_analytic_equals_oracle_on_random_geometries(mode, view_size, patch_size):
    rng = np.random.default_rng([view_size, patch_size, MODES.index(mode)])
    geometries = _random_geometries(rng, 60)
    assert _disagreements(geometries, mode, view_size, patch_size) == []


def test_oracle_reads_a_hand_made_case():
    # 42x14 padded to 42x42 (rows 14..27 = patch row 1 of a 3x3 grid at view 42, patch 14)
    (out,) = oracle_tokens([((42, 14), [Box(14, 0, 1, 1)])], mode="pad", view_size=42, patch_size=14)
    assert np.flatnonzero(out.related).tolist() == [4]
    assert np.flatnonzero(out.padding).tolist() == [0, 1, 2, 6, 7, 8]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("resample", [Image.Resampling.NEAREST, Image.Resampling.BICUBIC], ids=["nearest", "bicubic"])
def test_oracle_processor_mirrors_the_llava_adapter_pipeline(mode, resample):
    """The adapter's own preprocessing + the checkpoint-style CLIP processor give the oracle's pixels."""
    from transformers import CLIPImageProcessorPil

    from vlmflow.adapters.llava import LlavaInputs
    from vlmflow.prompts import get_template

    side = 56
    clip = CLIPImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, resample=int(resample),
        do_rescale=False, do_normalize=False,
    )
    processor = SimpleNamespace(image_processor=clip, patch_size=14)
    pipeline_ = LlavaInputs(torch.nn.Linear(1, 1), processor, get_template("vicuna_v1"), {"image_mode": mode})
    rng = np.random.default_rng(1)
    for size in ((75, 40), (40, 75), (33, 33), (120, 57)):
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        shown = pipeline_.preprocess_image(image)
        pipeline = np.asarray(clip(images=[shown], return_tensors="np")["pixel_values"])
        oracle = np.asarray(mask_processor(mode, side, resample=resample)(images=[image], return_tensors="np")["pixel_values"])
        assert np.array_equal(pipeline, oracle), (mode, size)


def test_paper_rule_with_nearest_is_ours_on_a_one_pixel_larger_box():
    """The paper's inclusive rectangle is the half-open box one pixel wider and taller."""
    rng = np.random.default_rng(5)
    processor = mask_processor("pad", 42, resample=Image.Resampling.NEAREST)
    for (size, boxes) in _random_geometries(rng, 40):
        boxes = tuple(Box(int(b.x), int(b.y), max(1, int(b.w)), max(1, int(b.h))) for b in boxes)
        paper = paper_rule_tokens(size, boxes, view_size=42, patch_size=14, processor=processor)
        larger = [Box(b.x, b.y, b.w + 1, b.h + 1) for b in boxes]
        assert np.array_equal(paper, llava_geometry(size, mode="pad", view_size=42, patch_size=14).related_tokens(larger))


def _released_geometries() -> list:
    out = []
    for spec in released_specs():
        result, _ = load_samples(spec)
        out += [(s.image_size, s.boxes) for s in result.samples]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_analytic_equals_oracle_on_every_released_geometry(mode):
    """LLaVA-1.5 (336 px, 14 px patches) on blank images of every released sample's size and boxes."""
    geometries = _released_geometries()
    assert len(geometries) == 5525
    bad = _disagreements(geometries, mode, 336, 14)
    assert bad == [], f"{len(bad)} of {len(geometries)} disagree, e.g. {bad[:3]}"
