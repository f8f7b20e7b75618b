from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlmflow.data.sample import Box
from vlmflow.errors import ConfigError
from vlmflow.positions.patches import (
    Axis,
    GridPart,
    ImageGeometry,
    PatchGrid,
    TokenLayout,
    View,
    llava_geometry,
    llava_view,
    pil_nearest_source,
)


def test_pil_nearest_source_is_what_pil_copies():
    sizes_in = [*range(1, 300), 332, 333, 375, 500, 640, 683, 800, 1024, 1280]
    for n_in in sizes_in:
        row = Image.fromarray(np.arange(n_in, dtype=np.int32)[None, :], mode="I")
        for n_out in (1, 7, 14, 28, 224, 336, 447, 672):
            copied = np.asarray(row.resize((n_out, 1), Image.Resampling.NEAREST))[0]
            assert np.array_equal(pil_nearest_source(n_in, n_out), copied), (n_in, n_out)


def test_pil_ties_differ_from_exact_centres():
    # 1024 -> 336: output pixel 10's centre is exactly 10.5 * 1024 / 336 = 32; PIL's running sum
    # lands just below it and copies pixel 31. The analytic rule follows PIL.
    assert (10.5 * 1024) % 336 == 0
    assert pil_nearest_source(1024, 336)[10] == 31


def test_pad_mode_centres_like_expand2square():
    view = llava_view((5, 2), mode="pad", view_size=5)  # square side 5, rows offset (5 - 2) // 2 = 1
    assert view.y.source.tolist() == [-1, 0, 1, -1, -1]
    assert view.x.source.tolist() == [0, 1, 2, 3, 4]
    view = llava_view((2, 5), mode="pad", view_size=5)
    assert view.x.source.tolist() == [-1, 0, 1, -1, -1]


def test_llava15_on_a_500x375_image():
    # Padded to 500x500 the image occupies rows 62..436; processed row p shows padded row
    # floor((p + 0.5) * 500 / 336), so rows 42..293 show the image: patch rows 3..20 (18 of 24).
    g = llava_geometry((500, 375), mode="pad", view_size=336, patch_size=14)
    assert g.n_tokens == 576
    padding = g.padding_tokens().reshape(24, 24)
    assert padding[[0, 1, 2, 21, 22, 23]].all() and not padding[3:21].any()
    assert g.related_tokens([Box(0, 0, 500, 375)]).reshape(24, 24)[3:21].all()
    assert g.related_tokens([Box(0, 0, 500, 375)]).sum() == 18 * 24


def test_resize_mode_squashes():
    # 40 px wide -> 14: processed column p shows floor((p + 0.5) * 40 / 14); p = 0..6 show 1..18 (< 20).
    g = llava_geometry((40, 10), mode="resize", view_size=14, patch_size=7)
    assert g.related_tokens([Box(0, 0, 20, 10)]).tolist() == [True, False, True, False]
    assert not g.padding_tokens().any()


def test_crop_mode_resizes_short_side_then_centre_crops():
    # 60x30 -> short side 14: 28x14, then columns 7..20 of 28 are kept; they show 60/28-spaced pixels
    # floor((q + 0.5) * 60 / 28) for q = 7..20, i.e. 16 .. 43.
    view = llava_view((60, 30), mode="crop", view_size=14)
    assert view.x.source[0] == 16 and view.x.source[-1] == 43
    g = llava_geometry((60, 30), mode="crop", view_size=14, patch_size=7)
    assert not g.related_tokens([Box(0, 0, 16, 30)]).any()  # cropped away
    assert g.related_tokens([Box(16, 1, 1, 1)]).tolist() == [True, False, False, False]
    # rows: processed row p shows floor((p + 0.5) * 30 / 14), so original row 0 is never shown and a
    # one-pixel box there covers no token (downsampling skips pixels under every rule of this kind)
    assert not g.related_tokens([Box(16, 0, 1, 1)]).any()


def test_box_pixels_are_half_open_and_may_be_fractional():
    g = llava_geometry((4, 4), mode="resize", view_size=4, patch_size=1)  # identity view, one pixel per token
    assert np.flatnonzero(g.related_tokens([Box(1, 2, 2, 1)])).tolist() == [9, 10]
    assert np.flatnonzero(g.related_tokens([Box(0.5, 0, 1, 1)])).tolist() == [1]  # 0.5 <= i < 1.5: pixel 1
    assert not g.related_tokens([Box(4, 0, 3, 3)]).any()  # outside the image


def test_related_tokens_of_several_boxes_are_the_union():
    rng = np.random.default_rng(0)
    g = llava_geometry((333, 500), mode="pad", view_size=336, patch_size=14)
    for _ in range(20):
        boxes = [Box(*rng.integers(0, 300, 2), *rng.integers(1, 200, 2)) for _ in range(3)]
        union = np.logical_or.reduce([g.related_tokens([b]) for b in boxes])
        assert np.array_equal(g.related_tokens(boxes), union)
    assert not g.related_tokens([]).any()


def test_composed_layout_keeps_token_order():
    # A LLaVA-NeXT-like toy: a 4x2 image; base view squashed to 4x4 (2x2 patches of 2 px), then a
    # high-resolution view (resized to 8x4, padded to 8x8) whose padded patch rows are dropped and
    # whose rows each end with a newline token.
    base = PatchGrid(View(y=Axis.identity(2).resize(4), x=Axis.identity(4).resize(4)), 2)
    hires = PatchGrid(View(y=Axis.identity(2).resize(4).pad(2, 2), x=Axis.identity(4).resize(8)), 2)
    assert hires.padding()[:, 0].tolist() == [True, False, False, True]
    layout = TokenLayout((GridPart(base), GridPart(hires, rows=(1, 3), newline_after_row=True)))
    assert layout.n_tokens == 4 + 2 * (4 + 1)
    assert np.flatnonzero(layout.newline_tokens()).tolist() == [8, 13]
    assert not layout.padding_tokens().any()
    assert np.flatnonzero(layout.related_tokens([Box(0, 0, 1, 1)])).tolist() == [0, 4]
    assert np.flatnonzero(layout.related_tokens([Box(3, 1, 1, 1)])).tolist() == [3, 12]
    assert isinstance(layout, ImageGeometry)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=(50, 40), mode="squash", view_size=336, patch_size=14), "valid: pad, resize, crop"),
        (dict(image_size=(50, 40), mode="pad", view_size=336, patch_size=15), "multiple of patch size 15"),
        (dict(image_size=(0, 40), mode="pad", view_size=336, patch_size=14), "positive integers"),
        (dict(image_size=(50.5, 40), mode="pad", view_size=336, patch_size=14), "positive integers"),
    ],
)
def test_bad_geometry_arguments_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        llava_geometry(**kwargs)


def test_grid_parts_validate():
    view = View(y=Axis.identity(6), x=Axis.identity(6))
    with pytest.raises(ValueError, match="does not split"):
        PatchGrid(view, 4)
    with pytest.raises(ValueError, match="rows range"):
        GridPart(PatchGrid(view, 3), rows=(1, 3))
