"""What one prompt with its image(s) or video becomes before it meets the model: :class:`Encoded`.

What a prompt shows is :class:`Visuals`: one image (the paper's case), several images, or one
:class:`Video` given as its frames. A family's input pipeline
(:class:`vlmflow.adapters.pipeline.InputPipeline`) renders the prompt, runs the processor and
records what position finding needs (token offsets, the question's character span, the images'
sizes); positions, experiments and the engine read it. It carries no family-specific fields: what
a family's decoder needs per sample is derived from ``inputs`` by its decoder map (e.g. the
attention pattern from ``token_type_ids``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from vlmflow.errors import SampleError
from vlmflow.prompts import RenderedPrompt

#: Frames per second assumed for a video given as frames, when nothing says otherwise (the rate the
#: Qwen-VL processors sample videos at).
DEFAULT_FPS = 2.0


@dataclass(frozen=True)
class Video:
    """A video given as its frames (PIL images of one size, in time order), sampled at ``fps``.

    >>> Video((Image.new("RGB", (8, 6)),) * 2).size
    (8, 6)
    """

    frames: tuple[Image.Image, ...]
    fps: float = DEFAULT_FPS

    def __post_init__(self) -> None:
        if not self.frames:
            raise SampleError("a video needs at least one frame", stage="image")
        sizes = {frame.size for frame in self.frames}
        if len(sizes) != 1:
            raise SampleError(f"the frames of a video must have one size, got {sorted(sizes)}", stage="image")
        if not self.fps > 0:
            raise SampleError(f"a video's fps must be > 0, got {self.fps}", stage="image")

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of every frame."""
        return self.frames[0].size


@dataclass(frozen=True)
class Visuals:
    """What one prompt shows: one or more images, or one video (not both).

    >>> v = Visuals.of([Image.new("RGB", (4, 4)), Image.new("RGB", (6, 2))])
    >>> v.sizes, v.video is None
    (((4, 4), (6, 2)), True)
    """

    images: tuple[Image.Image, ...] = ()
    video: Video | None = None

    def __post_init__(self) -> None:
        if bool(self.images) == (self.video is not None):
            raise SampleError("a prompt shows either one or more images or one video", stage="image")

    @classmethod
    def of(cls, visual: Image.Image | Sequence[Image.Image] | Video | Visuals) -> Visuals:
        """``visual`` as :class:`Visuals`: an image, a sequence of images, a :class:`Video`, or already one."""
        if isinstance(visual, Visuals):
            return visual
        if isinstance(visual, Video):
            return cls(video=visual)
        if isinstance(visual, Image.Image):
            return cls(images=(visual,))
        return cls(images=tuple(visual))

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """``(width, height)`` of every image, or of every frame of the video."""
        if self.video is not None:
            return tuple(frame.size for frame in self.video.frames)
        return tuple(image.size for image in self.images)


@dataclass
class Encoded:
    """One prompt + image turned into model inputs, with what position finding needs.

    Attributes:
        inputs: keyword arguments for ``model(**inputs)`` (batch of one), on the model's device.
        input_ids: ``[seq]`` token ids on CPU.
        offsets: ``[seq, 2]`` character offsets of each token in ``text`` (``(0, 0)`` for
            special and image tokens).
        text: the prompt text after image placeholders were expanded.
        question_span: character span of the question in ``text``.
        image_size: ``(width, height)`` of the (first) image as given (before any padding).
        image_sizes: ``(width, height)`` of every image, or of every input frame of a video, in
            prompt order (empty: just ``image_size``).
        video: the prompt shows a video (``image_sizes`` are its frames).

    >>> e = Encoded({}, torch.tensor([1, 5, 5, 9]), np.zeros((4, 2), int), "x", (0, 1), (8, 8))
    >>> e.seq_len
    4
    """

    inputs: dict[str, Any]
    input_ids: torch.Tensor
    offsets: np.ndarray
    text: str
    question_span: tuple[int, int]
    image_size: tuple[int, int]
    image_sizes: tuple[tuple[int, int], ...] = ()
    video: bool = False

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """``(width, height)`` of every image (or input frame), in prompt order."""
        return self.image_sizes or (self.image_size,)

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def device(self) -> torch.device:
        """Where the model inputs live (the model's device)."""
        return self.inputs["input_ids"].device


def model_inputs(batch: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """Processor outputs as ``model(**inputs)`` keywords: tensors on the model's device, floats in its dtype.

    >>> model_inputs({"pixel_values": torch.zeros(1, dtype=torch.float64)}, nn.Linear(1, 1))["pixel_values"].dtype
    torch.float32
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if value.is_floating_point():
                value = value.to(dtype)
        inputs[key] = value
    return inputs


def expand_placeholders(rendered: RenderedPrompt, replacements: Sequence[Mapping[str, Any]]) -> tuple[str, tuple[int, int]]:
    """The prompt text with image placeholders replaced, and the question's span in it.

    ``replacements`` are the processor's text replacements: each has the placeholder's ``span`` in
    the rendered text, its ``new_span`` and the ``replacement`` text.

    Raises:
        SampleError: a placeholder lies inside the question, or the question is not where expected.

    >>> from vlmflow.prompts import get_template
    >>> r = get_template("vicuna_v1").render("Is it red?", image_token="<image>")
    >>> s, e = r.image_spans[0]
    >>> text, span = expand_placeholders(r, [{"span": (s, e), "new_span": (s, s + 14), "replacement": "<image>" * 2}])
    >>> text[span[0]:span[1]]
    'Is it red?'
    """
    start, end = rendered.question_span
    shift_start = shift_end = 0
    text = rendered.text
    for rep in replacements:
        old_start, old_end = rep["span"]
        new_start, new_end = rep["new_span"]
        delta = (new_end - new_start) - (old_end - old_start)
        if old_end <= start:
            shift_start += delta
        if old_end <= end:
            shift_end += delta
        if old_start < end and old_end > start:
            raise SampleError("an image placeholder lies inside the question text", stage="prompt")
    # Rebuild the expanded text to check the span really holds the question.
    pieces, cursor = [], 0
    for rep in sorted(replacements, key=lambda r: r["span"][0]):
        pieces.append(text[cursor : rep["span"][0]])
        pieces.append(rep["replacement"])
        cursor = rep["span"][1]
    pieces.append(text[cursor:])
    expanded = "".join(pieces)
    span = (start + shift_start, end + shift_end)
    if expanded[span[0] : span[1]] != rendered.question:
        raise SampleError(
            f"question {rendered.question!r} not found at its expected place in the expanded prompt", stage="prompt"
        )
    return expanded, span
