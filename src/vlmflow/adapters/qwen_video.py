"""Videos for Qwen2-VL, Qwen2.5-VL and Qwen3-VL: frames to temporal patches, the video prompt, frame blocks.

A Qwen-VL video is a stack of frames cut into *temporal patches* of ``temporal_patch_size`` (2)
frames: each merged token covers a ``patch * merge`` square of two consecutive frames, so the
language model sees ``ceil(frames / 2)`` *model frames* of ``grid_h * grid_w / merge**2`` tokens
each. vlmflow's ``frame[k]`` is model frame ``k``; it shows input frames ``2k`` and ``2k + 1``
(the last one repeated when the count is odd), and boxes of both map onto its tokens.

* **Qwen2-VL / Qwen2.5-VL**: every frame resized with the image rule (``smart_resize``) under the
  video pixel bounds; the prompt's ``<|vision_start|><|video_pad|><|vision_end|>`` gets one
  ``<|video_pad|>`` per token of every model frame; Qwen2.5-VL's temporal position ids step with
  time (``second_per_grid_ts = temporal_patch_size / fps``).
* **Qwen3-VL**: the pixel bounds hold for the whole video; the prompt's
  ``<|vision_start|><|video_pad|><|vision_end|>`` becomes, per model frame, its timestamp
  ``<t seconds>`` (the mean time of its two frames) and ``<|vision_start|>`` + the frame's pads +
  ``<|vision_end|>``: the text of transformers' ``Qwen3VLProcessor.replace_video_token``, put in
  place of the whole placeholder as Qwen's own processor does (transformers 5.x's generic
  replacement keeps the outer markers around it, which Qwen3-VL was not trained with).

``mm_token_type_ids`` is 2 at video tokens, and the model's own ``get_rope_index`` gives the
positions. The frames are processed by :mod:`vlmflow.adapters.video_frames` (no torchvision).
"""

from __future__ import annotations

from typing import Any

import torch

from vlmflow.adapters.expansion import encode_expanded
from vlmflow.adapters.video_frames import VideoSettings, frame_arrays, temporal_patches
from vlmflow.errors import ConfigError
from vlmflow.inputs import Encoded, Video
from vlmflow.positions.layout import ImageLayout, VisualBlock

VISION_START, VIDEO_PAD, VISION_END = "<|vision_start|>", "<|video_pad|>", "<|vision_end|>"
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: ``Qwen2VLVideoProcessor``'s class defaults (Qwen2-VL and Qwen2.5-VL), which a checkpoint's config overrides.
QWEN2_VIDEO_DEFAULTS: dict[str, Any] = {
    "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768},
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": _CLIP_MEAN,
    "image_std": _CLIP_STD,
    "resample": 3,
}
#: ``Qwen3VLVideoProcessor``'s class defaults.
QWEN3_VIDEO_DEFAULTS: dict[str, Any] = {
    "size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": (0.5, 0.5, 0.5),
    "image_std": (0.5, 0.5, 0.5),
    "resample": 3,
}


class QwenVideo:
    """The video part of a Qwen-VL input pipeline (mixed into it; the pipeline supplies ``model``,
    ``processor``, ``tokenizer``, ``template``, ``render`` and ``family``)."""

    #: The family's video processor class defaults.
    video_defaults: dict[str, Any] = QWEN2_VIDEO_DEFAULTS
    #: Qwen2.5-VL: the model takes ``second_per_grid_ts`` (temporal ids step with time).
    seconds_per_grid: bool = False

    model: Any
    processor: Any
    tokenizer: Any
    template: Any
    family: str

    @property
    def video_settings(self) -> VideoSettings:
        """The checkpoint's video settings; a processor that carries none falls back to its image
        processor's settings over the family's defaults, as transformers does for a checkpoint without
        a video config."""
        settings = getattr(self.processor, "video", None)
        if settings is None:
            settings = VideoSettings.from_dict(self.video_defaults, self.processor.image_processor.to_dict())
        return settings

    def check_video_settings(self) -> None:
        """Refuse video settings the vision tower would not take (called at load)."""
        settings, vision = self.video_settings, self.model.config.vision_config
        for name, tower in (("patch_size", vision.patch_size), ("temporal_patch_size", vision.temporal_patch_size),
                            ("merge_size", vision.spatial_merge_size)):
            if getattr(settings, name) != int(tower):
                raise ConfigError(f"the video settings' {name} {getattr(settings, name)} differs from the vision tower's {tower}")

    @property
    def video_token(self) -> str:
        return VISION_START + VIDEO_PAD + VISION_END

    @property
    def video_token_id(self) -> int:
        return int(self.model.config.video_token_id)

    def video_size(self, n_frames: int, size: tuple[int, int]) -> tuple[int, int]:
        """``(width, height)`` every frame is resized to (Qwen2-VL: the image rule under the video bounds)."""
        from vlmflow.positions.dynamic_grid import dynamic_resize

        s = self.video_settings
        factor = int(s.patch_size) * int(s.merge_size)
        return dynamic_resize(*size, factor=factor, min_pixels=s.size["shortest_edge"], max_pixels=s.size["longest_edge"])

    def video_expansion(self, grid: tuple[int, int, int], video: Video) -> str:
        """What replaces the prompt's video placeholder (Qwen2-VL: the pads of every frame in one block)."""
        t, h, w = grid
        return VISION_START + VIDEO_PAD * (t * h * w // int(self.video_settings.merge_size) ** 2) + VISION_END

    def encode_video(self, question: str, video: Video) -> Encoded:
        """The prompt with ``video``: frames resized, normalized and cut into temporal patches, pads expanded."""
        s = self.video_settings
        size = self.video_size(len(video.frames), video.size)
        arrays = frame_arrays(video.frames, self.processor.image_processor, s, size)
        flat, grid = temporal_patches(
            arrays, patch_size=int(s.patch_size), merge_size=int(s.merge_size), temporal_patch_size=int(s.temporal_patch_size)
        )
        inputs: dict[str, Any] = {
            "pixel_values_videos": torch.from_numpy(flat),
            "video_grid_thw": torch.tensor([grid], dtype=torch.long),
        }
        if self.seconds_per_grid:
            inputs["second_per_grid_ts"] = torch.tensor([int(s.temporal_patch_size) / video.fps])
        encoded = encode_expanded(
            self.model,
            self.tokenizer,
            self.template,
            self.template.render(question, image_token=self.video_token),
            placeholder=self.video_token,
            expansions=[self.video_expansion(grid, video)],
            image_inputs=inputs,
            image_sizes=[frame.size for frame in video.frames],
            token_id=self.video_token_id,
            n_tokens=grid[0] * grid[1] * grid[2] // int(s.merge_size) ** 2,
            video=True,
        )
        return with_token_types(encoded, self.model)

    def video_blocks(self, encoded: Encoded) -> tuple[VisualBlock, ...]:
        """One block per model frame: the frame's merged grid; it shows ``temporal_patch_size`` input frames."""
        from vlmflow.positions.dynamic_grid import resized_geometry

        s = self.video_settings
        sizes = encoded.sizes
        size = self.video_size(len(sizes), sizes[0])
        geometry = resized_geometry(sizes[0], size, patch_size=int(s.patch_size), merge_size=int(s.merge_size))
        layout = ImageLayout(n_tokens=int(geometry.n_tokens), geometry=geometry)
        tps, n = int(s.temporal_patch_size), len(sizes)
        n_model_frames = int(encoded.inputs["video_grid_thw"][0, 0])
        return tuple(
            VisualBlock(layout, self.video_token_id, 0, k, tuple(range(k * tps, min((k + 1) * tps, n))), sizes[0])
            for k in range(n_model_frames)
        )


class Qwen3Video(QwenVideo):
    """Qwen3-VL's video part: whole-video pixel bounds, a timestamp and its own vision markers per frame."""

    video_defaults = QWEN3_VIDEO_DEFAULTS

    def video_size(self, n_frames: int, size: tuple[int, int]) -> tuple[int, int]:
        from vlmflow.positions.dynamic_grid import qwen3_video_resize

        s = self.video_settings
        return qwen3_video_resize(
            n_frames, *size, factor=int(s.patch_size) * int(s.merge_size), temporal_factor=int(s.temporal_patch_size),
            min_pixels=s.size["shortest_edge"], max_pixels=s.size["longest_edge"],
        )

    def video_expansion(self, grid: tuple[int, int, int], video: Video) -> str:
        t, h, w = grid
        per_frame = VISION_START + VIDEO_PAD * (h * w // int(self.video_settings.merge_size) ** 2) + VISION_END
        stamps = frame_timestamps(len(video.frames), video.fps, int(self.video_settings.temporal_patch_size))
        return "".join(f"<{stamp:.1f} seconds>" + per_frame for stamp in stamps[:t])


def frame_timestamps(n_frames: int, fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds of each model frame: the mean time of its first and last input frame (Qwen3-VL).

    >>> frame_timestamps(4, 2.0, 2)
    [0.25, 1.25]
    """
    indices = list(range(n_frames))
    indices += [indices[-1]] * (-n_frames % temporal_patch_size)
    times = [i / fps for i in indices]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def with_token_types(encoded: Encoded, model: Any) -> Encoded:
    """``encoded`` with ``mm_token_type_ids`` (1 at image, 2 at video tokens), as transformers 5 needs for M-RoPE."""
    ids = encoded.inputs["input_ids"]
    types = (ids == int(model.config.image_token_id)).to(torch.int32)
    types[ids == int(model.config.video_token_id)] = 2
    encoded.inputs["mm_token_type_ids"] = types
    return encoded
