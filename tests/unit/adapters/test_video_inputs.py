"""Video inputs built without a video processor, against transformers' own rules and the families' pixels.

transformers' video processors need torchvision, which cannot be installed here, so their rules are
taken from where they can be run: the ``smart_resize`` functions of the video processor modules
(their source, compiled without the module's torchvision imports), the processors'
``replace_video_token`` (run on a stand-in ``self``), the image processors' own patches, and the
model's ``get_rope_index`` and ``apply_pooling``.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from support.family_oracles import onevision_video_oracle, qwen_video_oracle
from support.tiny_next import TinyAnyresConfig, build_tiny_llava_onevision
from support.tiny_qwen2_vl import TinyQwen2VLConfig, build_tiny_qwen2_vl
from support.tiny_qwen3_vl import TinyQwen3VLConfig, build_tiny_qwen3_vl
from vlmflow.adapters.registry import family_for_model
from vlmflow.adapters.video_frames import VideoSettings, temporal_patches
from vlmflow.data.sample import Box, Sample, SceneObject
from vlmflow.inputs import Video
from vlmflow.positions.build import build_position_groups
from vlmflow.positions.dynamic_grid import dynamic_resize, qwen3_video_resize
from vlmflow.positions.groups import Group
from vlmflow.prompts import get_template

QUESTION = "Did the circle move left or right?"


def _transformers_smart_resize(module: str):
    """``smart_resize`` of a transformers video processor module, compiled from its source alone."""
    import transformers

    path = Path(transformers.__file__).parent / "models" / module
    tree = ast.parse(path.read_text())
    (fn,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "smart_resize"]
    namespace: dict = {"math": math}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102 - transformers' own code
    return namespace["smart_resize"]


def _frames(n: int, size=(40, 30)) -> tuple[Image.Image, ...]:
    rng = np.random.default_rng(n)
    return tuple(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n))


def _bind(model, processor, template):
    return family_for_model(model).bind(model, processor, get_template(template), {})


@pytest.mark.parametrize("size", [(40, 30), (9, 90), (500, 375), (17, 700)])
def test_video_resize_rules_equal_transformers_smart_resize(size):
    qwen2 = _transformers_smart_resize("qwen2_vl/video_processing_qwen2_vl.py")
    qwen3 = _transformers_smart_resize("qwen3_vl/video_processing_qwen3_vl.py")
    width, height = size
    h, w = qwen2(height, width, factor=28, min_pixels=128 * 28 * 28, max_pixels=28 * 28 * 768)
    assert dynamic_resize(width, height, factor=28, min_pixels=128 * 28 * 28, max_pixels=28 * 28 * 768) == (w, h)
    for n_frames in (2, 3, 8):
        h, w = qwen3(n_frames, height, width, temporal_factor=2, factor=32, min_pixels=4096, max_pixels=25165824)
        assert qwen3_video_resize(n_frames, width, height, factor=32, temporal_factor=2, min_pixels=4096, max_pixels=25165824) == (w, h)


def test_temporal_patches_take_the_image_processors_patch_layout():
    """One frame repeated over a temporal patch is exactly the image processor's output; with two
    different frames, temporal slot ``t`` of every row holds frame ``t``'s pixels."""
    from transformers import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64 * 64}, patch_size=4, merge_size=2)
    a, b = (Image.fromarray(np.random.default_rng(k).integers(0, 255, (32, 48, 3), dtype=np.uint8)) for k in (1, 2))
    per_image = [ip(images=[im], return_tensors="np")["pixel_values"] for im in (a, b)]  # [tokens, C*T*P*P]
    arrays = np.stack([p.reshape(-1, 3, 2, 4, 4)[:, :, 0] for p in per_image])  # [2, tokens, C, P, P] at t=0
    # Rebuild each frame's normalized pixels from its own patches, then patch the pair as a video.
    frames = np.stack([_unpatch(x, height=32, width=48, patch=4, merge=2) for x in arrays])
    flat, grid = temporal_patches(frames[:1], patch_size=4, merge_size=2, temporal_patch_size=2)
    np.testing.assert_array_equal(flat, per_image[0])
    flat, grid = temporal_patches(frames, patch_size=4, merge_size=2, temporal_patch_size=2)
    assert grid == (1, 8, 12)
    rows = flat.reshape(-1, 3, 2, 4, 4)
    np.testing.assert_array_equal(rows[:, :, 0], arrays[0])
    np.testing.assert_array_equal(rows[:, :, 1], arrays[1])


def _unpatch(patches: np.ndarray, *, height: int, width: int, patch: int, merge: int) -> np.ndarray:
    """``[tokens, C, P, P]`` in Qwen's merged order -> ``[C, H, W]``."""
    gh, gw = height // patch, width // patch
    x = patches.reshape(gh // merge, gw // merge, merge, merge, 3, patch, patch)
    return x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, height, width)


@pytest.mark.parametrize(("version", "n_frames"), [("2", 4), ("2", 3), ("2.5", 4), ("3", 4), ("3", 5)])
def test_qwen_video_prompt_counts_and_positions_follow_transformers(version, n_frames):
    from transformers import Qwen2VLProcessor, Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    if version == "3":
        model, processor = build_tiny_qwen3_vl(TinyQwen3VLConfig(layers=1))
    else:
        model, processor = build_tiny_qwen2_vl(TinyQwen2VLConfig(layers=1, version=version))
    template = {"2": "qwen2_vl", "2.5": "qwen2_vl", "3": "qwen3_vl"}[version]
    bound = _bind(model, processor, template)
    video = Video(_frames(n_frames), fps=2.0)
    encoded = bound.inputs.encode(QUESTION, video)
    grid = encoded.inputs["video_grid_thw"]
    assert int(grid[0, 0]) == math.ceil(n_frames / 2)
    settings = processor.video
    stub = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2, temporal_patch_size=2), video_token="<|video_pad|>")
    if version == "3":
        stub.vision_start_token, stub.vision_end_token = "<|vision_start|>", "<|vision_end|>"
        stub._calculate_timestamps = lambda *a: Qwen3VLProcessor._calculate_timestamps(stub, *a)
        meta = VideoMetadata(total_num_frames=n_frames, fps=2.0, frames_indices=list(range(n_frames)))
        expected = Qwen3VLProcessor.replace_video_token(stub, {"video_grid_thw": grid, "video_metadata": [meta]}, 0)
        # Qwen's processor puts it in place of the whole <|vision_start|><|video_pad|><|vision_end|>.
        assert encoded.text.startswith("<|im_start|>user\n" + expected + QUESTION)
    else:
        expected = Qwen2VLProcessor.replace_video_token(stub, {"video_grid_thw": grid}, 0)
        assert "<|vision_start|>" + expected + "<|vision_end|>" + QUESTION in encoded.text
        resized = dynamic_resize(40, 30, factor=8, min_pixels=settings.size["shortest_edge"], max_pixels=settings.size["longest_edge"])
        assert (int(grid[0, 2]) * 4, int(grid[0, 1]) * 4) == resized
    ids = encoded.input_ids
    video_mask = ids == model.config.video_token_id
    assert torch.equal(encoded.inputs["mm_token_type_ids"][0].cpu() == 2, video_mask)
    blocks = bound.inputs.video_blocks(encoded)
    assert sum(b.layout.n_tokens for b in blocks) == int(video_mask.sum())
    assert [b.sources for b in blocks][-1] == tuple(range(2 * (len(blocks) - 1), n_frames))
    # The model's own position ids: one temporal id per model frame (scaled by time for Qwen2.5-VL).
    pos = bound.decoder.position_ids(encoded)[:, 0]
    temporal = [sorted(set(pos[0, list(range(s, s + b.layout.n_tokens))].tolist())) for s, b in _starts(video_mask, blocks)]
    assert all(len(t) == 1 for t in temporal) and temporal == sorted(temporal)
    if version == "2.5":
        step = model.config.vision_config.tokens_per_second * 2 / video.fps
        assert temporal[1][0] - temporal[0][0] == int(step)


def _starts(mask: torch.Tensor, blocks):
    positions = torch.nonzero(mask).flatten().tolist()
    start = 0
    for block in blocks:
        yield positions[start], block
        start += block.layout.n_tokens


@pytest.mark.parametrize(("version", "temporal_patch_size"), [("2", 1), ("2", 2), ("3", 2)])
def test_qwen_frame_boxes_equal_the_pixel_oracle(version, temporal_patch_size):
    if version == "3":  # Qwen3-VL resizes a video by its own rule (frames count): the oracle takes its size
        model, processor = build_tiny_qwen3_vl(TinyQwen3VLConfig(layers=1))
    else:
        model, processor = build_tiny_qwen2_vl(TinyQwen2VLConfig(layers=1, temporal_patch_size=temporal_patch_size))
    bound = _bind(model, processor, "qwen3_vl" if version == "3" else "qwen2_vl")
    rng = np.random.default_rng(temporal_patch_size)
    for size in ((40, 30), (70, 26), (33, 61)):
        n = 4
        boxes = [Box(float(rng.uniform(0, size[0] - 6)), float(rng.uniform(0, size[1] - 6)), 5.5, 7.0) for _ in range(n)]
        sample = Sample("v", "v", QUESTION, "right", objects=tuple(SceneObject("c", str(k), b, image=k) for k, b in enumerate(boxes)))
        encoded = bound.inputs.encode(QUESTION, Video(_frames(n, size)))
        blocks = bound.inputs.video_blocks(encoded)
        groups = build_position_groups(encoded, blocks, sample)
        frames = groups.items(Group.FRAME)
        related = set(groups[Group.RELATED])
        seen = np.array([[p in related for p in frame] for frame in frames])
        width, height = bound.inputs.video_size(n, size)
        oracle = qwen_video_oracle(size, [[b] for b in boxes], resized=(width, height), patch_size=4, merge_size=2,
                                   temporal_patch_size=temporal_patch_size)
        np.testing.assert_array_equal(seen, oracle)


def test_onevision_video_tokens_and_frame_boxes_equal_the_processor_and_the_models_pooling():
    from transformers import LlavaOnevisionProcessor

    model, processor = build_tiny_llava_onevision(TinyAnyresConfig(layers=1, image_size=36))
    bound = _bind(model, processor, "qwen_1_5")
    n, size = 3, (40, 30)
    boxes = [Box(2, 3, 9, 8), Box(14, 10, 9, 8), Box(27, 18, 9, 8)]
    sample = Sample("v", "v", QUESTION, "right", objects=tuple(SceneObject("c", str(k), b, image=k) for k, b in enumerate(boxes)))
    encoded = bound.inputs.encode(QUESTION, Video(_frames(n, size)))
    vision = model.config.vision_config
    stub = SimpleNamespace(num_image_tokens=(vision.image_size // vision.patch_size) ** 2, video_token="<video>")
    expected = LlavaOnevisionProcessor.replace_video_token(stub, {"pixel_values_videos": encoded.inputs["pixel_values_videos"]}, 0)
    assert "<|im_start|>user\n" + expected + "\n" + QUESTION in encoded.text
    groups = build_position_groups(encoded, bound.inputs.visual_blocks(encoded), sample)
    frames = groups.items(Group.FRAME)
    assert len(frames) == n and len(groups[Group.IMAGE]) == sum(map(len, frames)) + 1  # + the trailing newline
    assert groups[Group.IMAGE_NEWLINE] == (groups[Group.IMAGE][-1],)
    related = set(groups[Group.RELATED])
    for frame, box in zip(frames, boxes, strict=True):
        seen = np.array([p in related for p in frame])
        np.testing.assert_array_equal(seen, onevision_video_oracle(size, [box], view_size=vision.image_size, patch_size=vision.patch_size))


def test_video_settings_read_back_as_saved_and_fall_back_to_the_image_processor(tmp_path):
    _, processor = build_tiny_qwen2_vl(TinyQwen2VLConfig(layers=1), tmp_path / "with")
    from vlmflow.adapters.expansion import load_image_text_processor
    from vlmflow.adapters.qwen_video import QWEN2_VIDEO_DEFAULTS

    loaded = load_image_text_processor(str(tmp_path / "with"), video_defaults=QWEN2_VIDEO_DEFAULTS)
    assert loaded.video == processor.video
    (tmp_path / "with" / "video_preprocessor_config.json").unlink()
    fallback = load_image_text_processor(str(tmp_path / "with"), video_defaults=QWEN2_VIDEO_DEFAULTS)
    assert fallback.video.size == dict(processor.image_processor.size) and fallback.video.patch_size == 4
    settings = VideoSettings.from_dict(QWEN2_VIDEO_DEFAULTS, {"min_pixels": 100, "max_pixels": 900})
    assert settings.size == {"shortest_edge": 100, "longest_edge": 900}
