"""Several images per prompt and videos, on tiny random checkpoints of every family that takes them.

Checked: the items of ``image`` (one per image) and ``frame`` (one per model frame) partition the
visual tokens in sequence order; boxes given per image or frame map only into their own tokens;
the fast engine equals the reference for the six paper flows and for routes between images and
frames (``image[1]->question``, ``frame[0]->last``, ``frame[0]->frame[1]``: targets inside the
video, through Qwen3-VL's DeepStack layers too), on sdpa and eager; and a knockout of one image or
frame changes the answer somewhere (so the routes are not silently empty).
"""

from __future__ import annotations

import math

import pytest
import torch

from support.compare import fast_and_reference, route
from support.tiny_families import BUILDERS, FAMILY_OF, MORE_BUILDERS, loaded_family
from support.visual_samples import moving_video, two_image_sample
from vlmflow.errors import SampleError
from vlmflow.experiments.prepare import prepare_sample
from vlmflow.experiments.windows import sweep
from vlmflow.knockout.spec import Knockout
from vlmflow.positions.groups import PAPER_FLOWS, Group

SEVERAL_IMAGES = [
    ("llava", "sdpa"), ("llava_next", "sdpa"), ("llava_onevision", "sdpa"), ("qwen2_vl", "eager"),
    ("qwen2_5_vl", "sdpa"), ("qwen3_vl", "sdpa"), ("qwen3_vl", "eager"), ("gemma3", "eager"), ("paligemma", "sdpa"),
    ("idefics3", "sdpa"), ("smolvlm", "eager"), ("internvl", "sdpa"), ("internvl", "eager"),
]
VIDEOS = [
    ("qwen2_vl", "sdpa"), ("qwen2_vl_t1", "sdpa"), ("qwen2_vl_t1", "eager"), ("qwen2_5_vl", "eager"), ("qwen3_vl", "sdpa"),
    ("qwen3_vl", "eager"), ("qwen3_vl_moe", "sdpa"), ("llava_onevision", "sdpa"), ("llava_onevision", "eager"),
]


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory):
    return loaded_family(tmp_path_factory)


@pytest.mark.parametrize(("name", "impl"), SEVERAL_IMAGES)
def test_several_images_items_boxes_and_fast_equals_reference(family, name, impl):
    loaded = family(name, impl)
    sample, visuals = two_image_sample()
    prepared = prepare_sample(loaded, sample, visuals)
    g = prepared.groups
    images = g.items(Group.IMAGE)
    assert len(images) == 2 and images[0][-1] < images[1][0]
    assert sum(len(i) for i in images) == len(g[Group.IMAGE])
    # The square's box is in image 0, the circle's in image 1: each maps into its own image only.
    related = set(g[Group.RELATED])
    assert related & set(images[0]) and related & set(images[1])
    assert Group.FRAME not in g and "no video" in g.missing[Group.FRAME]
    layers = [layers for _, layers in sweep(1, loaded.n_layers)]
    routes = [route(g[Group.QUESTION], images[1], w) for w in layers] + [route(g[Group.LAST], images[0], w) for w in layers]
    paper = [Knockout.for_flows(g, [flow], w) for flow in PAPER_FLOWS for w in layers]
    fast, ref, base = fast_and_reference(loaded, prepared, routes + paper)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    n = len(layers)
    assert (ref[:n] - base).abs().max() > 1e-3, "image[1]->question changed nothing"
    assert (ref[n : 2 * n] - base).abs().max() > 1e-3, "image[0]->last changed nothing"


@pytest.mark.parametrize(("name", "impl"), VIDEOS)
def test_video_frames_boxes_and_fast_equals_reference(family, name, impl):
    loaded = family(name, impl)
    sample, video = moving_video(n_frames=4)
    prepared = prepare_sample(loaded, sample, video, check_answer=False)
    g = prepared.groups
    frames = g.items(Group.FRAME)
    per_model_frame = 1 if name.endswith("_t1") or FAMILY_OF.get(name, name) == "llava_onevision" else 2
    assert len(frames) == math.ceil(4 / per_model_frame)
    assert len(g.items(Group.IMAGE)) == 1  # the video is one item of `image`
    assert set(g[Group.FRAME]) <= set(g[Group.IMAGE])
    # The mover's box of frame 0 maps into the first model frame only, frame 3's into the last.
    related = set(g[Group.RELATED])
    assert related <= set(frames[0]) | set(frames[-1]) and related & set(frames[0]) and related & set(frames[-1])
    layers = [layers for _, layers in sweep(1, loaded.n_layers)]
    routes = [route(g[Group.LAST], frames[0], w) for w in layers]
    routes += [route(frames[1], frames[0], w) for w in layers]  # targets inside the video
    paper = [Knockout.for_flows(g, [flow], w) for flow in PAPER_FLOWS for w in layers]
    fast, ref, base = fast_and_reference(loaded, prepared, routes + paper)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    n = len(layers)
    assert (ref[:n] - base).abs().max() > 1e-3, "frame[0]->last changed nothing"
    assert (ref[n : 2 * n] - base).abs().max() > 1e-4, "frame[0]->frame[1] changed nothing"


@pytest.mark.parametrize("name", sorted({**BUILDERS, **MORE_BUILDERS}))
def test_a_familys_video_flag_is_what_its_pipeline_takes(family, name):
    loaded = family(name, "sdpa")
    sample, video = moving_video(n_frames=2)
    if loaded.family.video:
        assert loaded.inputs.video_token and loaded.inputs.video_token_id is not None
        prepare_sample(loaded, sample, video, check_answer=False)
    else:
        with pytest.raises(SampleError, match="takes no video"):
            prepare_sample(loaded, sample, video, check_answer=False)


def test_a_box_in_an_image_the_sample_does_not_show_fails_the_groups_that_need_boxes(family):
    from dataclasses import replace

    from vlmflow.data.sample import Box, SceneObject

    loaded = family("qwen2_vl", "sdpa")
    sample, visuals = two_image_sample()
    sample = replace(sample, objects=(SceneObject("ghost", "9", Box(1, 1, 4, 4), image=2),))
    groups = prepare_sample(loaded, sample, visuals).groups
    # The flows that need the boxes fail (for this sample) with the reason; the others keep theirs.
    for group in (Group.RELATED, Group.OTHER, Group.RANDOM):
        with pytest.raises(SampleError, match=r"image or frame 2, but the sample shows 2 \(valid: 0..1\)"):
            groups[group]
    assert groups[Group.IMAGE] and groups[Group.QUESTION]


@pytest.mark.parametrize("name", ["internvl", "idefics3"])
def test_tile_items_are_the_tiles_and_the_whole_image_view_is_image_base(family, name):
    from conftest import make_scene_sample

    loaded = family(name, "sdpa")
    sample, image = make_scene_sample()
    prepared = prepare_sample(loaded, sample, image)
    g = prepared.groups
    layout = loaded.inputs.image_layout(prepared.encoded)
    tiles = g.items(Group.TILE)
    assert len(tiles) == layout.geometry.n_tiles > 1
    assert len({len(t) for t in tiles}) == 1  # every tile has the same number of tokens
    assert sum(tiles, ()) == g[Group.IMAGE_GRID]
    assert set(g[Group.IMAGE_BASE]) | set(g[Group.IMAGE_GRID]) == set(g[Group.IMAGE])
    assert g[Group.IMAGE_BASE][0] > tiles[-1][-1]  # the thumbnail / global view comes after the tiles
