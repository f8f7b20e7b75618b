"""Turn a sample and its image into model inputs plus resolved position groups.

Per-sample problems (missing or corrupt image, wrong recorded size, question not found, bad boxes)
raise :class:`~vlmflow.errors.SampleError` with the stage that failed, so a long run can record them
and go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlmflow.adapters.base import Encoded
from vlmflow.data.sample import Sample, find_image
from vlmflow.errors import SampleError
from vlmflow.loading import LoadedModel
from vlmflow.positions.build import build_position_groups
from vlmflow.positions.groups import PositionGroups


@dataclass
class PreparedSample:
    """A sample ready for the engine: encoded inputs and position groups."""

    sample: Sample
    encoded: Encoded
    groups: PositionGroups


def open_image(sample: Sample, images_dir: Path) -> Image.Image:
    """Open and fully decode the sample's image; check its size against the recorded one.

    Raises:
        SampleError: file missing (stage ``image``), unreadable or corrupt, or of another size than
            the dataset records (boxes would then be in another coordinate system).
    """
    path = find_image(images_dir, sample.image_id)
    try:
        with Image.open(path) as handle:
            handle.load()
            image = handle.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise SampleError(f"cannot read image {path.name!r}: {exc}", stage="image") from exc
    if sample.image_size is not None and tuple(image.size) != tuple(sample.image_size):
        raise SampleError(
            f"image {path.name!r} is {image.size[0]}x{image.size[1]} but the dataset records "
            f"{sample.image_size[0]}x{sample.image_size[1]}",
            stage="image",
        )
    return image


def prepare_sample(loaded: LoadedModel, sample: Sample, image: Image.Image, *, random_draw: int = 0) -> PreparedSample:
    """Encode ``sample`` with ``image`` for ``loaded`` and resolve all its position groups.

    >>> prepared = prepare_sample(loaded, sample, image)            # doctest: +SKIP
    >>> prepared.groups[Group.QUESTION]                             # doctest: +SKIP
    (42, 43, 44, 45, 46, 47)
    """
    adapter = loaded.adapter
    encoded = adapter.encode(loaded.model, loaded.processor, loaded.template, sample.question, image, loaded.options)
    layout = adapter.image_layout(loaded.model, loaded.processor, encoded, loaded.options)
    groups = build_position_groups(
        encoded, adapter.image_token_id(loaded.model), layout, sample, random_draw=random_draw
    )
    return PreparedSample(sample=sample, encoded=encoded, groups=groups)
