"""Pixel oracles for Qwen2-VL, Gemma-3, PaliGemma, Idefics3 / SmolVLM and InternVL: painted masks through the real code.

Independent checks of :mod:`vlmflow.positions.dynamic_grid`, of Gemma-3's and PaliGemma's use of
:func:`vlmflow.positions.patches.llava_geometry` and of :mod:`vlmflow.positions.split_tiles`. As in
:mod:`support.oracle`, boxes are painted into masks (16 geometries per mask as bit-planes
in the red and green channels, blue = 255 on image pixels), the masks go through the family's own
transformers image processor (PIL backend, ``resample=NEAREST``, rescaling and normalisation off),
and the tokens are read off what comes out, grouped the way the model groups patches into tokens:

* **Qwen2-VL**: the processor already orders the ``patch x patch`` patches so that each run of
  ``merge**2`` consecutive rows of ``pixel_values`` is one language-model token (the vision tower's
  patch merger concatenates exactly those rows);
* **Gemma-3**: the per-patch bits go through transformers' own ``Gemma3MultiModalProjector`` (its
  average pooling of the patch grid), with an identity projection so a token is non-zero in a plane
  exactly when one of its pooled patches has that bit;
* **PaliGemma**: every ``patch x patch`` patch of the SigLIP view is one token (row-major);
* **Idefics3 / SmolVLM**: the per-patch bits of every frame go through transformers' own
  ``Idefics3Connector.pixel_shuffle``, and the frames' tokens are concatenated in frame order;
* **InternVL**: the tiles and thumbnail of ``GotOcr2ImageProcessorPil`` (``crop_to_patches``) go
  through ``InternVLModel.pixel_shuffle``, tiles first, then the thumbnail;
* **videos**: Qwen-VL frames through the Qwen2-VL image processor at the video's size, grouped by
  temporal patch; LLaVA-OneVision frames through the model's own ``apply_pooling``.

Pixel rule (the analytic modules' rule): a token is related when one of its pixels shows a painted
pixel; padding when none shows an image pixel (none of these processors pads a single image).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from support.oracle import _IMAGE_BLUE, _PLANES, OracleTokens, _bit_mask, _key
from vlmflow.data.sample import Box

Geometries = Sequence[tuple[tuple[int, int], Sequence[Box]]]
# One processed mask -> (bits per token: uint32 (n_tokens,), padding: bool (n_tokens,)).
Reader = Callable[[Image.Image], tuple[np.ndarray, np.ndarray]]


def run_oracle(geometries: Geometries, read: Reader) -> list[OracleTokens]:
    """Related and padding tokens of each ``((width, height), boxes)``, 16 geometries per mask.

    ``read`` runs one mask through a family's processor and returns its tokens' bits.

    >>> read = qwen2_vl_reader(patch_size=4, merge_size=2, min_pixels=64, max_pixels=4096)
    >>> # 40x30 is resized to 40x32 (a 5x4 grid of merged 8-pixel tokens): the 8-pixel-tall box
    >>> # grows to 8.5 rows and reaches token 5, the first one of the second token row.
    >>> run_oracle([((40, 30), [Box(0, 0, 8, 8)])], read)[0].related.astype(int).tolist()[:6]
    [1, 0, 0, 0, 0, 1]
    """
    keys = [_key(size, boxes) for size, boxes in geometries]
    by_size: dict[tuple[int, int], list[tuple]] = defaultdict(list)
    for size, boxes in dict.fromkeys(keys):
        by_size[size].append(boxes)
    results: dict[tuple, OracleTokens] = {}
    for size, box_sets in by_size.items():
        for lo in range(0, len(box_sets), _PLANES):
            chunk = box_sets[lo : lo + _PLANES]
            bits, padding = read(_bit_mask(size, chunk))
            for k, boxes in enumerate(chunk):
                results[(size, boxes)] = OracleTokens(related=((bits >> k) & 1).astype(bool), padding=padding)
    return [results[key] for key in keys]


def _patch_bits(view: np.ndarray, patch: int) -> np.ndarray:
    """``view`` ``(3, H, W)`` 0..255 -> per patch (row-major) OR of the pixels' bits ``(n,)``."""
    blue = view[2]
    if not np.isin(blue, (_IMAGE_BLUE,)).all():
        raise RuntimeError("processed mask has pixels that are not image pixels: padding or non-NEAREST resampling")
    rows, cols = view.shape[1] // patch, view.shape[2] // patch
    # A stride-`patch` convolution never sees the last (side mod patch) pixel rows and columns.
    bits = view[0, : rows * patch, : cols * patch].astype(np.uint32) | (
        view[1, : rows * patch, : cols * patch].astype(np.uint32) << 8
    )
    per_patch = bits.reshape(rows, patch, cols, patch).transpose(0, 2, 1, 3).reshape(rows * cols, -1)
    return np.bitwise_or.reduce(per_patch, axis=1)


def _planes(bits: np.ndarray) -> torch.Tensor:
    """``(..., n)`` uint32 bits -> ``(..., n, 16)`` float 0/1 bit-planes."""
    return torch.from_numpy(((bits[..., None] >> np.arange(_PLANES)) & 1).astype(np.float32))


def _from_planes(planes: torch.Tensor) -> np.ndarray:
    """``(n, 16)`` non-negative planes -> uint32 bits (a plane is set where it is > 0)."""
    on = (planes > 0).numpy().astype(np.uint32)
    return (on << np.arange(_PLANES, dtype=np.uint32)).sum(axis=1).astype(np.uint32)


# ---- Qwen2-VL / Qwen2.5-VL ------------------------------------------------------------------------
def qwen2_vl_reader(*, patch_size: int, merge_size: int, min_pixels: int, max_pixels: int) -> Reader:
    """Reader for Qwen2-VL's image processor (``Qwen2VLImageProcessorPil``)."""
    from transformers import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=patch_size,
        merge_size=merge_size,
        resample=Image.Resampling.NEAREST,
        do_rescale=False,
        do_normalize=False,
    )

    def read(mask: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        out = processor(images=[mask], return_tensors="np")
        rows = np.asarray(out["pixel_values"])  # (patches, C * T * P * P), merge groups consecutive
        t = processor.temporal_patch_size
        px = rows.reshape(-1, merge_size * merge_size, 3, t, patch_size, patch_size)
        if not (px[:, :, 2] == _IMAGE_BLUE).all():
            raise RuntimeError("processed mask has pixels that are not image pixels")
        bits = px[:, :, 0].astype(np.uint32) | (px[:, :, 1].astype(np.uint32) << 8)
        token_bits = np.bitwise_or.reduce(bits.reshape(bits.shape[0], -1), axis=1)
        return token_bits, np.zeros(len(token_bits), dtype=bool)

    return read


# ---- Gemma-3 ----------------------------------------------------------------------------------------
def gemma3_reader(*, image_size: int, patch_size: int, tokens_per_image: int) -> Reader:
    """Reader for Gemma-3's image processor and its projector's patch pooling."""
    from transformers import Gemma3Config, Gemma3ImageProcessorPil
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

    processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        resample=Image.Resampling.NEAREST,
        do_rescale=False,
        do_normalize=False,
        do_pan_and_scan=False,
    )
    config = Gemma3Config(
        vision_config={"hidden_size": _PLANES, "image_size": image_size, "patch_size": patch_size},
        text_config={"hidden_size": _PLANES, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 4},
        mm_tokens_per_image=tokens_per_image,
    )
    projector = Gemma3MultiModalProjector(config).eval()
    with torch.no_grad():
        projector.mm_input_projection_weight.copy_(torch.eye(_PLANES))
        projector.mm_soft_emb_norm.weight.zero_()  # Gemma's RMSNorm scales by (1 + weight)

    def read(mask: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        view = np.asarray(processor(images=[mask], return_tensors="np")["pixel_values"])[0]  # (3, S, S)
        bits = _patch_bits(view, patch_size)
        with torch.no_grad():
            tokens = projector(_planes(bits)[None])[0]  # (tokens, 16)
        token_bits = _from_planes(tokens)
        return token_bits, np.zeros(len(token_bits), dtype=bool)

    return read


# ---- PaliGemma ----------------------------------------------------------------------------------------
def siglip_reader(*, image_size: int, patch_size: int) -> Reader:
    """Reader for PaliGemma's SigLIP image processor: one token per patch (a per-patch linear projector)."""
    from transformers import SiglipImageProcessorPil

    processor = SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        resample=Image.Resampling.NEAREST,
        do_rescale=False,
        do_normalize=False,
    )

    def read(mask: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        view = np.asarray(processor(images=[mask], return_tensors="np")["pixel_values"])[0]  # (3, S, S)
        bits = _patch_bits(view, patch_size)
        return bits, np.zeros(len(bits), dtype=bool)

    return read


# ---- Idefics3 / SmolVLM -------------------------------------------------------------------------------
def idefics3_reader(
    *, longest_edge: int, tile_size: int, patch_size: int, scale_factor: int, splitting: bool = True
) -> Reader:
    """Reader for the Idefics3 / SmolVLM image processor (tiles + global view) and pixel shuffle."""
    from transformers import Idefics3ImageProcessorPil
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    processor = Idefics3ImageProcessorPil(
        size={"longest_edge": longest_edge},
        max_image_size={"longest_edge": tile_size},
        do_image_splitting=splitting,
        resample=Image.Resampling.NEAREST,
        do_rescale=False,
        do_normalize=False,
    )

    def read(mask: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        frames = np.asarray(processor(images=[mask], return_tensors="np")["pixel_values"])[0]  # (F, 3, M, M)
        bits = np.stack([_patch_bits(frame, patch_size) for frame in frames])  # (F, patches)
        with torch.no_grad():
            shuffled = Idefics3Connector.pixel_shuffle(None, _planes(bits), scale_factor)  # (F, T, 16 * s * s)
        per_token = shuffled.reshape(-1, scale_factor * scale_factor, _PLANES).amax(dim=1)  # (F * T, 16)
        token_bits = _from_planes(per_token)
        return token_bits, np.zeros(len(token_bits), dtype=bool)

    return read


# ---- InternVL -------------------------------------------------------------------------------------
def internvl_reader(*, tile_size: int, patch_size: int, scale_factor: int, min_tiles: int = 1, max_tiles: int = 12) -> Reader:
    """Reader for InternVL's image processor (``GotOcr2ImageProcessorPil``: tiles + thumbnail) and its
    model's own pixel shuffle."""
    from transformers import GotOcr2ImageProcessorPil
    from transformers.models.internvl.modeling_internvl import InternVLModel

    processor = GotOcr2ImageProcessorPil(
        size={"height": tile_size, "width": tile_size},
        crop_to_patches=True,
        min_patches=min_tiles,
        max_patches=max_tiles,
        resample=Image.Resampling.NEAREST,
        do_rescale=False,
        do_normalize=False,
    )
    side = tile_size // patch_size

    def read(mask: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        frames = np.asarray(processor(images=[mask], return_tensors="np")["pixel_values"])  # (F, 3, T, T)
        bits = np.stack([_patch_bits(frame, patch_size) for frame in frames])  # (F, patches), row-major
        planes = _planes(bits).reshape(len(frames), side, side, _PLANES)  # as get_image_features reshapes
        with torch.no_grad():
            shuffled = InternVLModel.pixel_shuffle(None, planes, scale_factor=1 / scale_factor)  # (F, s', s', 16 * k)
        per_token = shuffled.reshape(-1, scale_factor * scale_factor, _PLANES).amax(dim=1)  # (F * T, 16)
        token_bits = _from_planes(per_token)
        return token_bits, np.zeros(len(token_bits), dtype=bool)

    return read


# ---- videos -------------------------------------------------------------------------------------------
def qwen_video_oracle(
    frame_size: tuple[int, int],
    frame_boxes: Sequence[Sequence[Box]],
    *,
    resized: tuple[int, int],
    patch_size: int,
    merge_size: int,
    temporal_patch_size: int,
) -> np.ndarray:
    """Bool ``(model frames, tokens per frame)``: which tokens of a Qwen-VL video show a box pixel.

    Each frame's mask is resized to the video's size (``NEAREST``) and patched by the real
    ``Qwen2VLImageProcessorPil`` (pixel bounds pinned to that size, so it resizes no further); a
    model frame's token is related when its patch in any frame of the temporal group shows one
    (the last frame repeated to fill the last group, as the video processors do).
    """
    width, height = resized
    read = qwen2_vl_reader(patch_size=patch_size, merge_size=merge_size, min_pixels=width * height, max_pixels=width * height)
    per_frame = []
    for boxes in frame_boxes:
        mask = _bit_mask(frame_size, [_key(frame_size, boxes)[1]]).resize((width, height), Image.Resampling.NEAREST)
        bits, _ = read(mask)
        per_frame.append((bits & 1).astype(bool))
    per_frame += [per_frame[-1]] * (-len(per_frame) % temporal_patch_size)
    frames = np.stack(per_frame).reshape(-1, temporal_patch_size, len(per_frame[0]))
    return frames.any(axis=1)


def onevision_video_oracle(frame_size: tuple[int, int], boxes: Sequence[Box], *, view_size: int, patch_size: int) -> np.ndarray:
    """Bool ``(pooled tokens,)``: which pooled tokens of a LLaVA-OneVision video frame show a box pixel.

    The mask is resized to the square view by a PIL image processor (``NEAREST``), cut into patches
    (the convolution never sees the last ``view mod patch`` pixels), and the per-patch bits go through
    the model's own ``LlavaOnevisionModel.apply_pooling`` (bilinear, to half the grid, rounded up).
    """
    from types import SimpleNamespace

    from transformers import SiglipImageProcessorPil
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    processor = SiglipImageProcessorPil(
        size={"height": view_size, "width": view_size}, resample=Image.Resampling.NEAREST, do_rescale=False, do_normalize=False
    )
    view = np.asarray(processor(images=[_bit_mask(frame_size, [_key(frame_size, boxes)[1]])], return_tensors="np")["pixel_values"])[0]
    bits = _patch_bits(view, patch_size)
    stub = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(image_size=view_size, patch_size=patch_size)))
    with torch.no_grad():
        pooled = LlavaOnevisionModel.apply_pooling(stub, _planes(bits)[None])[0]  # (pooled tokens, 16)
    return (_from_planes(pooled) & 1).astype(bool)
