"""The anyres geometry's pieces against transformers' own functions, and its counts against the processors'."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.image_processing_utils import get_patch_output_size
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.image_utils import ChannelDimension
from transformers.models.llava_next.modeling_llava_next import unpad_image

from vlmflow.data.sample import Box
from vlmflow.errors import ConfigError
from vlmflow.positions.anyres import (
    LLAVA_NEXT_PINPOINTS,
    anyres_geometry,
    bilinear_sources,
    downscaled_shape,
    fitted_size,
    onevision_pinpoints,
    select_best_resolution,
    unpad_ranges,
)


def _sizes(seed: int, n: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 1400, (n, 2))]
    return sizes + [(500, 375), (375, 500), (640, 480), (336, 336), (1, 1), (1008, 336), (333, 1000), (3000, 40)]


@pytest.mark.parametrize("pinpoints", [LLAVA_NEXT_PINPOINTS, onevision_pinpoints()], ids=["next", "onevision"])
def test_best_resolution_and_fitted_size_match_transformers(pinpoints):
    for width, height in _sizes(0, 300):
        best = select_best_resolution((width, height), pinpoints)
        assert best == tuple(hf_select_best_resolution((height, width), [list(p) for p in pinpoints]))
        blank = np.zeros((3, height, width), dtype=np.uint8)
        assert fitted_size((width, height), best) == tuple(
            get_patch_output_size(blank, best, input_data_format=ChannelDimension.FIRST)
        )


def test_unpad_ranges_match_the_models_unpad_image():
    rng = np.random.default_rng(1)
    for width, height in _sizes(1, 300):
        rows, cols = (int(v) for v in rng.choice([24, 27, 48, 54, 72, 81], 2))
        grid = torch.arange(rows * cols).reshape(1, rows, cols)
        (r0, r1), (c0, c1) = unpad_ranges((width, height), rows, cols)
        assert torch.equal(unpad_image(grid, (height, width)), grid[:, r0:r1, c0:c1])


@pytest.mark.parametrize("n_in", [1, 2, 3, 7, 27, 54, 81, 100, 162])
def test_bilinear_sources_are_the_nonzero_weights_of_torch_interpolate(n_in):
    for n_out in range(1, n_in + 1):
        eye = torch.eye(n_in)[None, None]  # each column one input, one-hot
        out = torch.nn.functional.interpolate(eye, [n_out, n_in], mode="bilinear")[0, 0]  # [n_out, n_in]
        assert np.array_equal(bilinear_sources(n_in, n_out), (out > 0).numpy()), (n_in, n_out)


def test_downscale_rule_matches_the_onevision_processor_count():
    from transformers import LlavaOnevisionImageProcessorPil

    from support.tiny_next import build_bytelevel_tokenizer
    from vlmflow.adapters.llava_onevision import OnevisionImageProcessor

    processor = OnevisionImageProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(), tokenizer=build_bytelevel_tokenizer("qwen2"),
        num_image_tokens=729, vision_feature_select_strategy="full",
    )
    sizes = _sizes(2, 200) + [(2304, 2304), (4000, 3000), (2000, 400)]
    counts = processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in sizes])["num_image_tokens"]
    shrunk = 0
    for (width, height), count in zip(sizes, counts, strict=True):
        layout = anyres_geometry((width, height), view_size=384, patch_size=14, pinpoints=onevision_pinpoints(), max_patches=9)
        assert layout.n_tokens == count, (width, height)
        shrunk += layout.grid.downscaled
    assert shrunk > 10  # the downscaling branch was exercised


def test_llava_next_counts_match_the_processor_and_the_paper():
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    from vlmflow.tiny.tokenizers import build_tokenizer

    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=build_tokenizer("bytelevel"), patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    sizes = _sizes(3, 300)
    counts = processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in sizes])["num_image_tokens"]
    for (width, height), count in zip(sizes, counts, strict=True):
        layout = anyres_geometry((width, height), view_size=336, patch_size=14, pinpoints=LLAVA_NEXT_PINPOINTS)
        assert layout.n_tokens == count, (width, height)
    # The paper's figure for a 500x375 GQA image: 576 + 36 x (48 + 1).
    layout = anyres_geometry((500, 375), view_size=336, patch_size=14, pinpoints=LLAVA_NEXT_PINPOINTS)
    assert layout.n_tokens == 2340 and layout.best_resolution == (672, 672)


def test_groups_of_a_500x375_image():
    layout = anyres_geometry((500, 375), view_size=336, patch_size=14, pinpoints=LLAVA_NEXT_PINPOINTS)
    base, grid, newline = layout.base_tokens(), layout.grid_tokens(), layout.newline_tokens()
    assert (base.sum(), grid.sum(), newline.sum()) == (576, 36 * 48, 36)
    assert not (base & grid).any() and not (base & newline).any() and (base | grid | newline).all()
    # Newlines close every row of 48 grid tokens.
    assert np.flatnonzero(newline).tolist() == [576 + 48 + 49 * r for r in range(36)]
    # A box in the top-left corner shows in both views; nothing maps to a newline.
    related = layout.related_tokens([Box(0, 0, 30, 30)])
    assert related[base].sum() == 4 and related[grid].sum() == 9 and not related[newline].any()
    # The whole image is related everywhere except on grid tokens showing only the black fill.
    everything = layout.related_tokens([Box(0, 0, 500, 375)])
    assert np.array_equal(everything, (base | grid) & ~layout.padding_tokens())


def test_downscaled_grid_maps_boxes_and_padding():
    layout = anyres_geometry((2000, 1500), view_size=384, patch_size=14, pinpoints=onevision_pinpoints(), max_patches=9)
    rows = downscaled_shape(*_kept_shape((2000, 1500)), 27, 9)
    assert rows is not None and layout.grid.downscaled and layout.grid.shape == rows
    assert layout.n_tokens == 729 + rows[0] * (rows[1] + 1)
    related = layout.related_tokens([Box(1900, 1400, 100, 100)])
    grid_related = np.flatnonzero(related & layout.grid_tokens())
    assert len(grid_related) > 0
    # The bottom-right box lands in the last row, just before its newline.
    assert grid_related.max() == layout.n_tokens - 2


def _kept_shape(size):
    best = select_best_resolution(size, onevision_pinpoints())
    (r0, r1), (c0, c1) = unpad_ranges(size, best[0] // 384 * 27, best[1] // 384 * 27)
    return r1 - r0, c1 - c0


def test_bad_settings_and_images_are_refused_clearly():
    with pytest.raises(ConfigError, match="multiple of the view size"):
        anyres_geometry((50, 50), view_size=336, patch_size=14, pinpoints=[(336, 600)])
    with pytest.raises(ConfigError, match="at least one grid pinpoint"):
        anyres_geometry((50, 50), view_size=336, patch_size=14, pinpoints=[])
    with pytest.raises(ConfigError, match="image size"):
        anyres_geometry((0, 10), view_size=336, patch_size=14, pinpoints=LLAVA_NEXT_PINPOINTS)


def test_an_extremely_elongated_image_keeps_newlines_only():
    """Un-padding can keep no grid column; the model (and processor) still emit one newline per row."""
    layout = anyres_geometry((7, 956), view_size=336, patch_size=14, pinpoints=LLAVA_NEXT_PINPOINTS)
    assert layout.grid.kept_shape == (72, 0)
    assert layout.n_tokens == 576 + 72 and layout.newline_tokens().sum() == 72
    assert not layout.related_tokens([Box(0, 0, 7, 956)])[576:].any()


@pytest.mark.parametrize("family", ["next", "onevision"])
def test_unpadding_leaves_no_patch_of_pure_fill(family):
    """So the PADDING group of an anyres image is always empty (reported missing), unlike LLaVA-1.5's."""
    for width, height in _sizes(4, 300):
        if family == "next":
            layout = anyres_geometry((width, height), view_size=336, patch_size=14, pinpoints=LLAVA_NEXT_PINPOINTS)
        else:
            layout = anyres_geometry((width, height), view_size=384, patch_size=14, pinpoints=onevision_pinpoints(), max_patches=9)
        assert not layout.padding_tokens().any(), (width, height)
