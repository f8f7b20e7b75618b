"""Turn a sample and its image into model inputs plus resolved position groups.

Per-sample problems (missing or corrupt image, wrong recorded size, an answer with no usable token,
question not found, input the processor rejects, bad boxes)
raise :class:`~vlmflow.errors.SampleError` with the stage that failed, so a long run can record them
and go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from vlmflow.data.sample import Sample, find_frames, find_image
from vlmflow.errors import SampleError
from vlmflow.experiments.answer_tokens import first_subtoken
from vlmflow.inputs import DEFAULT_FPS, Encoded, Video, Visuals
from vlmflow.loading import LoadedModel
from vlmflow.positions.build import build_position_groups, placed_images
from vlmflow.positions.groups import PositionGroups
from vlmflow.positions.layout import PlacedImage


@dataclass
class PreparedSample:
    """A sample ready for the engine: encoded inputs, position groups, and where its images are.

    ``images`` holds each image's token positions and patch layout (what ``box:`` and ``grid:``
    expressions map through); one per image of the prompt.
    """

    sample: Sample
    encoded: Encoded
    groups: PositionGroups
    images: tuple[PlacedImage, ...] = ()


def open_visuals(sample: Sample, images_dir: Path) -> Image.Image | Visuals:
    """What the sample shows: its image, its several images (``sample.images``) or its video
    (``sample.frames``), opened and checked like :func:`open_image`.

    >>> open_visuals(sample, Path("images"))   # doctest: +SKIP
    <PIL.Image.Image image mode=RGB size=500x375>
    """
    size = sample.image_size
    if sample.frames is not None:  # every frame has the recorded size
        frames = tuple(_open(path, size) for path in find_frames(images_dir, sample.frames))
        return Visuals(video=Video(frames, fps=sample.fps or DEFAULT_FPS))
    if sample.images:  # the recorded size is the first image's (image_id); the others may differ
        return Visuals(
            images=tuple(_open(find_image(images_dir, i), size if k == 0 else None) for k, i in enumerate(sample.images))
        )
    return open_image(sample, images_dir)


def open_image(sample: Sample, images_dir: Path) -> Image.Image:
    """Open and fully decode the sample's image; check its size against the recorded one.

    Raises:
        SampleError: file missing (stage ``image``), unreadable or corrupt, or of another size than
            the dataset records (boxes would then be in another coordinate system).
    """
    return _open(find_image(images_dir, sample.image_id), sample.image_size)


def _open(path: Path, expected: tuple[int, int] | None) -> Image.Image:
    try:
        with Image.open(path) as handle:
            handle.load()
            image = handle.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise SampleError(f"cannot read image {path.name!r}: {exc}", stage="image") from exc
    if expected is not None and tuple(image.size) != tuple(expected):
        raise SampleError(
            f"image {path.name!r} is {image.size[0]}x{image.size[1]} but the dataset records "
            f"{expected[0]}x{expected[1]}",
            stage="image",
        )
    return image


def check_answer_tokens(tokenizer: Any, sample: Sample) -> None:
    """Raise :class:`SampleError` (stage ``answer``) if the gold answer has no usable first token.

    An answer that encodes to nothing, to word-boundary pieces only, or to the unknown token can
    never be produced by the model, so the sample would be scored wrong for a reason that has
    nothing to do with the model's answer.

    >>> from vlmflow.tiny.tokenizers import build_tokenizer
    >>> check_answer_tokens(build_tokenizer("word"), Sample("q1", "i", "Is it red?", "zebra"))
    Traceback (most recent call last):
    ...
    vlmflow.errors.SampleError: answer 'zebra' tokenises to nothing the model can produce (ids [1]: '<unk>'); valid answers have a first token in the model's vocabulary
    """
    if first_subtoken(tokenizer, sample.answer.strip()) is not None:
        return
    ids = list(tokenizer.encode(sample.answer.strip(), add_special_tokens=False))
    spelled = " ".join(repr(t) for t in tokenizer.convert_ids_to_tokens(ids[:8])) if ids else "none"
    raise SampleError(
        f"answer {sample.answer!r} tokenises to nothing the model can produce (ids {ids[:8]}: {spelled}); "
        "valid answers have a first token in the model's vocabulary",
        stage="answer",
    )


def prepare_sample(
    loaded: LoadedModel,
    sample: Sample,
    image: Image.Image | Visuals,
    *,
    random_draw: int = 0,
    check_answer: bool = True,
) -> PreparedSample:
    """Encode ``sample`` with ``image`` (an image, or :class:`~vlmflow.inputs.Visuals`: several images
    or a video) for ``loaded`` and resolve all its position groups.

    Raises :class:`SampleError` for a question that holds the image placeholder, an answer with no
    usable token (unless ``check_answer=False``), an input the processor rejects, or a problem
    with the position groups.

    >>> prepared = prepare_sample(loaded, sample, image)            # doctest: +SKIP
    >>> prepared.groups[Group.QUESTION]                             # doctest: +SKIP
    (42, 43, 44, 45, 46, 47)
    """
    pipeline = loaded.inputs
    if check_answer:
        check_answer_tokens(loaded.tokenizer, sample)
    for placeholder in pipeline.placeholders:
        if placeholder and placeholder in sample.question:
            raise SampleError(
                f"question {sample.question!r} contains the image placeholder {placeholder!r}, so the question text "
                "would not be found in the prompt; questions must not contain it",
                stage="prompt",
            )
    try:
        encoded = pipeline.encode(sample.question, image)
    except (ValueError, TypeError) as exc:  # the processor rejects this input (e.g. an image it cannot resize)
        raise SampleError(f"the model's processor rejects this sample: {type(exc).__name__}: {exc}", stage="encode") from exc
    blocks = pipeline.visual_blocks(encoded)
    groups = build_position_groups(encoded, blocks, sample, random_draw=random_draw)
    return PreparedSample(sample=sample, encoded=encoded, groups=groups, images=placed_images(encoded, blocks))
