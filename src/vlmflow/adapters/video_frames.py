"""Video frames as model inputs without a video processor (which needs torchvision in transformers 5.x).

The video processors of Qwen2-VL / Qwen2.5-VL / Qwen3-VL and LLaVA-OneVision cannot be built here
(torchvision has no wheel next to the pinned torch). Their work on frames that are already sampled
is small and documented, so vlmflow does it itself, with the checkpoint's own video settings
(:class:`VideoSettings`, read from its JSON files the way transformers finds them) and the PIL
image processor's own resize, rescale and normalize:

* resize every frame to one size (the family's rule: Qwen's ``smart_resize``, OneVision's square);
* rescale and normalize with the video settings' mean and standard deviation;
* for Qwen-VL, cut the stack into temporal patches (:func:`temporal_patches`): ``temporal_patch_size``
  consecutive frames (the last frame repeated to fill the final group), ``patch`` x ``patch`` pixels,
  ``merge x merge`` patches consecutive, exactly the layout of the video processors' ``patchify``.

Frames are never sampled here: a folder of frames is shown as given. Pixels may differ from the
torchvision video processors by resize rounding (about one grey level); token counts and layouts
are the same (checked against transformers' own rules in the tests).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from vlmflow.errors import ConfigError

#: Where transformers looks for a checkpoint's video settings, in order (processor_config.json nests them).
VIDEO_CONFIG_FILES = ("processor_config.json", "video_preprocessor_config.json", "preprocessor_config.json")


@dataclass(frozen=True)
class VideoSettings:
    """A checkpoint's video processor settings (what ``from_pretrained`` would give the processor).

    Attributes:
        size: ``{"shortest_edge", "longest_edge"}`` pixel bounds (Qwen-VL) or ``{"height", "width"}`` (OneVision).
        patch_size / temporal_patch_size / merge_size: Qwen-VL's patching (``None`` where unused).
        image_mean / image_std: per-channel normalization.
        resample: the PIL resampling filter (3 = bicubic).
        rescale_factor: multiplied into the pixels before normalization (1/255).

    >>> VideoSettings.from_dict({"size": {"height": 384, "width": 384}}, {}).size
    {'height': 384, 'width': 384}
    """

    size: Mapping[str, int]
    patch_size: int | None = None
    temporal_patch_size: int | None = None
    merge_size: int | None = None
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    resample: int = 3
    rescale_factor: float = 1 / 255
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, defaults: Mapping[str, Any], config: Mapping[str, Any]) -> VideoSettings:
        """``defaults`` (the family's video processor class defaults) updated with a checkpoint's ``config``.

        ``min_pixels`` / ``max_pixels`` (older Qwen-VL configs) become the size's shortest / longest edge,
        as the Qwen video processors do.
        """
        merged = {**dict(defaults), **dict(config)}
        size = dict(merged.get("size") or {})
        if merged.get("min_pixels") is not None:
            size["shortest_edge"] = int(merged["min_pixels"])
        if merged.get("max_pixels") is not None:
            size["longest_edge"] = int(merged["max_pixels"])
        if not size:
            raise ConfigError("the video settings have no size")
        known = {"patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "resample", "rescale_factor"}
        values = {k: merged[k] for k in known if merged.get(k) is not None}
        for key in ("image_mean", "image_std"):
            if key in values:
                values[key] = tuple(float(v) for v in np.broadcast_to(values[key], (3,)))
        return cls(size={k: int(v) for k, v in size.items()}, **values, extra={k: v for k, v in merged.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        """The settings as a video processor config (what :meth:`from_dict` reads back)."""
        out: dict[str, Any] = {**dict(self.extra), "size": dict(self.size)}
        for key in ("patch_size", "temporal_patch_size", "merge_size", "resample", "rescale_factor"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["image_mean"], out["image_std"] = list(self.image_mean), list(self.image_std)
        return out


def read_video_config(source: str, **kwargs: Any) -> dict[str, Any]:
    """A checkpoint's video processor config, found as transformers finds it: nested in
    ``processor_config.json``, else ``video_preprocessor_config.json``, else the image processor's
    ``preprocessor_config.json`` (or the image processor nested in ``processor_config.json``, where
    transformers 5 saves it); ``{}`` when there is none."""
    from transformers.utils import cached_file

    options = {k: kwargs[k] for k in ("revision", "local_files_only") if k in kwargs}
    nested_image: dict[str, Any] = {}
    for name in VIDEO_CONFIG_FILES:
        path = cached_file(
            source, name, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False, **options
        )
        if not path:
            continue
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if name == "processor_config.json":
            if isinstance(data.get("video_processor"), dict):
                return dict(data["video_processor"])
            nested_image = dict(data.get("image_processor") or {})
            continue
        return dict(data)
    return nested_image


def frame_arrays(frames: Sequence[Image.Image], image_processor: Any, settings: VideoSettings, size: tuple[int, int]) -> np.ndarray:
    """``[T, C, H, W]`` float32: every frame resized to ``size`` ``(width, height)`` with the PIL image
    processor's own resize, rescaled and normalized with the video settings.

    >>> frame_arrays(frames, ip, settings, (64, 48)).shape   # doctest: +SKIP
    (4, 3, 48, 64)
    """
    from transformers.image_processing_backends import PilBackend
    from transformers.image_processing_utils import SizeDict

    if not isinstance(image_processor, PilBackend):
        raise ConfigError(f"frames are processed with a PIL image processor, got {type(image_processor).__name__}")
    width, height = size
    out = []
    for frame in frames:
        # The PIL backend's own steps (a family's processor may override resize with its own sizing rule).
        array = PilBackend.process_image(image_processor, frame.convert("RGB"), do_convert_rgb=True)  # [C, H, W] uint8
        array = PilBackend.resize(image_processor, array, SizeDict(height=height, width=width), resample=settings.resample)
        array = PilBackend.rescale(image_processor, array, settings.rescale_factor)
        array = PilBackend.normalize(image_processor, array, settings.image_mean, settings.image_std)
        out.append(np.asarray(array, dtype=np.float32))
    return np.stack(out)


def temporal_patches(frames: np.ndarray, *, patch_size: int, merge_size: int, temporal_patch_size: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Qwen-VL's video patch layout: ``([grid_t * grid_h * grid_w, C * T * P * P], (grid_t, grid_h, grid_w))``.

    ``frames`` ``[n, C, H, W]``; the last frame is repeated until ``n`` is a multiple of
    ``temporal_patch_size``. Rows run over temporal groups, then merged tokens (row-major), then the
    ``merge x merge`` patches of a token; a row holds channel, then time, then pixel.

    >>> flat, grid = temporal_patches(np.zeros((3, 3, 8, 8), np.float32), patch_size=2, merge_size=2, temporal_patch_size=2)
    >>> flat.shape, grid
    ((32, 24), (2, 4, 4))
    """
    n, channels, height, width = frames.shape
    if height % (patch_size * merge_size) or width % (patch_size * merge_size):
        raise ConfigError(f"{width}x{height} frames do not split into {patch_size * merge_size}-px merged patches")
    if pad := -n % temporal_patch_size:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
        n += pad
    grid_t, grid_h, grid_w = n // temporal_patch_size, height // patch_size, width // patch_size
    patches = frames.reshape(
        grid_t, temporal_patch_size, channels, grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size, patch_size
    )
    # (t, T, C, gh, mh, ph, gw, mw, pw) -> (t, gh, gw, mh, mw, C, T, ph, pw), as the video processors permute
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    return np.ascontiguousarray(flat), (grid_t, grid_h, grid_w)
