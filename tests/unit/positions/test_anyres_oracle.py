"""The anyres box-to-token mapping against the pixel oracle (real HF processor + the model's own packing).

The image-processor settings below are those of the released checkpoints
(``llava-hf/llava-v1.6-vicuna-7b-hf`` and ``llama3-llava-next-8b-hf`` share them; OneVision's are
``llava-hf/llava-onevision-qwen2-7b-ov-hf``'s), built from config, nothing downloaded.
"""

from __future__ import annotations

import time
from functools import cache

import numpy as np
import pytest
from PIL import Image
from test_oracle import _released_geometries  # tests/unit/positions is on sys.path
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessorPil,
    SiglipVisionConfig,
)

from support.anyres_oracle import (
    anyres_oracle_tokens,
    llava_next_packer,
    llava_onevision_packer,
    nearest_image_processor,
)
from vlmflow.adapters.llava_onevision import OnevisionImageProcessor
from vlmflow.data.sample import Box
from vlmflow.positions.anyres import LLAVA_NEXT_PINPOINTS, anyres_geometry, onevision_pinpoints
from vlmflow.tiny.tokenizers import build_tokenizer

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

#: preprocessor_config.json of llava-hf/llava-v1.6-vicuna-7b-hf (and llama3-llava-next-8b-hf).
LLAVA_V16_IMAGE_PROCESSOR = {
    "image_processor_type": "LlavaNextImageProcessor",
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 336},
}

#: preprocessor_config.json of llava-hf/llava-onevision-qwen2-7b-ov-hf.
ONEVISION_IMAGE_PROCESSOR = {
    "image_processor_type": "LlavaOnevisionImageProcessor",
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_grid_pinpoints": [list(p) for p in onevision_pinpoints(384, 6)],
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"height": 384, "width": 384},
}


@cache
def _tokenizer():
    return build_tokenizer("bytelevel")


@cache
def next_setup(view: int = 336, patch: int = 14, pins: tuple = LLAVA_NEXT_PINPOINTS):
    """(oracle processor, packer, analytic layout function) for a LLaVA-NeXT geometry."""
    config = dict(LLAVA_V16_IMAGE_PROCESSOR, crop_size={"height": view, "width": view}, size={"shortest_edge": view},
                  image_grid_pinpoints=[list(p) for p in pins])
    processor = LlavaNextProcessor(
        image_processor=nearest_image_processor(LlavaNextImageProcessorPil, config), tokenizer=_tokenizer(),
        patch_size=patch, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    model_config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=view, patch_size=patch), image_grid_pinpoints=[list(p) for p in pins]
    )

    def layout(size):
        return anyres_geometry(size, view_size=view, patch_size=patch, pinpoints=pins)

    return processor, llava_next_packer(model_config), layout


@cache
def onevision_setup(view: int = 384, patch: int = 14, max_side: int = 6, anyres_max: int = 9):
    pins = onevision_pinpoints(view, max_side)
    config = dict(ONEVISION_IMAGE_PROCESSOR, size={"height": view, "width": view}, image_grid_pinpoints=[list(p) for p in pins])
    ratio = f"anyres_max_{anyres_max}"
    processor = OnevisionImageProcessor(
        image_processor=nearest_image_processor(LlavaOnevisionImageProcessorPil, config), tokenizer=_tokenizer(),
        num_image_tokens=(view // patch) ** 2, vision_feature_select_strategy="full", vision_aspect_ratio=ratio,
    )
    model_config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(image_size=view, patch_size=patch),
        image_grid_pinpoints=[list(p) for p in pins], vision_aspect_ratio=ratio,
    )

    def layout(size):
        return anyres_geometry(size, view_size=view, patch_size=patch, pinpoints=pins, max_patches=anyres_max)

    return processor, llava_onevision_packer(model_config), layout


def _compare(geometries, setup, patch):
    """(disagreements, summary): analytic vs oracle per geometry, plus counts of what was seen."""
    processor, pack, layout = setup
    oracle = anyres_oracle_tokens(geometries, processor=processor, pack=pack, patch_size=patch)
    bad, summary = [], {"related_base": 0, "related_grid": 0, "padding": 0, "newline": 0, "downscaled": 0}
    for (size, boxes), seen in zip(geometries, oracle, strict=True):
        geo = layout(size)
        related = geo.related_tokens(boxes)
        same = (
            geo.n_tokens == seen.processor_count == len(seen.related)
            and np.array_equal(related, seen.related)
            and np.array_equal(geo.padding_tokens(), seen.padding)
            and np.array_equal(geo.newline_tokens(), seen.newline)
        )
        if not same:
            bad.append((size, boxes))
            continue
        summary["related_base"] += int(related[geo.base_tokens()].sum())
        summary["related_grid"] += int(related[geo.grid_tokens()].sum())
        summary["padding"] += int(geo.padding_tokens().sum())
        summary["newline"] += int(geo.newline_tokens().sum())
        summary["downscaled"] += int(geo.grid.downscaled)
    return bad, summary


def _random_geometries(rng: np.random.Generator, n: int, max_side: int) -> list:
    out = []
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(1, max_side, 2))
        if rng.random() < 0.15:  # extreme aspect ratios
            w, h = (w, max(1, h // 30)) if rng.random() < 0.5 else (max(1, w // 30), h)
        boxes = []
        for _ in range(int(rng.integers(0, 4))):
            x, y = rng.uniform(-10, w), rng.uniform(-10, h)
            bw, bh = rng.uniform(0.3, w / 2 + 1), rng.uniform(0.3, h / 2 + 1)
            if rng.random() < 0.5:  # GQA boxes are integers
                x, y, bw, bh = float(int(x)), float(int(y)), float(int(bw) + 1), float(int(bh) + 1)
            boxes.append(Box(x, y, bw, bh))
        out.append(((w, h), tuple(boxes)))
    return out


def test_next_analytic_equals_oracle_on_random_geometries():
    """Small views (42 px, 3 x 3 patches) and the real pinpoint shapes scaled down."""
    pins = tuple((h // 8, w // 8) for h, w in LLAVA_NEXT_PINPOINTS)
    geometries = _random_geometries(np.random.default_rng(0), 120, 300)
    bad, summary = _compare(geometries, next_setup(42, 14, pins), 14)
    assert bad == []
    # Un-padding drops every patch of pure fill, so both sides find no padding token (see test_anyres).
    assert summary["related_base"] and summary["related_grid"] and summary["newline"] and not summary["padding"]


def test_onevision_analytic_equals_oracle_on_random_geometries():
    """45 px views (3 px past the last patch, like 384/14), anyres_max_2 so large grids are downscaled."""
    geometries = _random_geometries(np.random.default_rng(1), 120, 400)
    bad, summary = _compare(geometries, onevision_setup(45, 14, 6, 2), 14)
    assert bad == []
    assert summary["downscaled"] > 20 and summary["related_grid"] and summary["newline"]


def test_onevision_real_settings_on_large_images_are_downscaled_and_agree():
    geometries = [
        ((w, h), (Box(w * 0.1, h * 0.2, w * 0.3, h * 0.1), Box(w - 40, h - 40, 40, 40)))
        for w, h in [(1200, 900), (900, 1200), (2400, 1100), (3000, 700)]
    ]
    bad, summary = _compare(geometries, onevision_setup(), 14)
    assert bad == [] and summary["downscaled"] == 3  # (3000, 700) keeps 38 x 162 tokens: under 1.1 x 9 views


def test_nohd_view_is_the_llava15_padded_view():
    """noHD_noPad's single view (mean-padded square through the LLaVA-NeXT processor, base view) is
    pixel for pixel the LLaVA-1.5 pad-to-square view the single-view oracle checks."""
    from vlmflow.adapters.llava import expand_to_square
    from vlmflow.positions.paper_rule import mask_processor

    next_processor = nearest_image_processor(LlavaNextImageProcessorPil, LLAVA_V16_IMAGE_PROCESSOR)
    llava15 = mask_processor("pad", 336)
    mean = tuple(int(255 * m) for m in CLIP_MEAN)
    rng = np.random.default_rng(3)
    for size in ((500, 375), (375, 500), (333, 333), (640, 427), (120, 57)):
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        base = np.asarray(next_processor(images=[expand_to_square(image, mean)], return_tensors="np")["pixel_values"])[0, 0]
        single = np.asarray(llava15(images=[image], return_tensors="np")["pixel_values"])[0]
        assert np.array_equal(base, single), size


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_analytic_equals_oracle_on_every_released_geometry(family):
    """Every released sample's size and boxes, real processor settings: related, padding and newline
    tokens agree in both views, and the token count equals the processor's own for every image size."""
    geometries = _released_geometries()
    assert len(geometries) == 5525
    start = time.process_time()
    setup = next_setup() if family == "llava_next" else onevision_setup()
    bad, summary = _compare(geometries, setup, 14)
    assert bad == [], f"{len(bad)} of {len(geometries)} disagree, e.g. {bad[:3]}"
    assert summary["related_base"] > 0 and summary["related_grid"] > 0 and summary["newline"] > 0
    assert time.process_time() - start < 240
