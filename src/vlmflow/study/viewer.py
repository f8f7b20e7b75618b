"""Sample-viewer records: a few samples per model x task with the related patches drawn on the image.

Which image pixels a related image token shows depends on the family's preprocessing (padding,
resizing, anyres tiling). Rather than knowing each geometry, the overlay asks the sample's own
:class:`~vlmflow.positions.layout.ImageLayout`: a cell of the original image is painted when a box
around that cell maps to at least one of the sample's related tokens. Only the layout's public
``related`` rule is used, so the overlay is right for every family the engine supports.

Written per model x task into ``viewer/<model>/<task>/``: ``<n>.png`` (the image, at most
``THUMB`` pixels on its longer side), ``<n>_related.png`` (a transparent overlay of the same size:
related patches filled, the boxes outlined) and ``records.json`` (question, answer, prediction,
token counts).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vlmflow.data.sample import Box, Sample
from vlmflow.errors import SampleError
from vlmflow.experiments.prepare import open_image, prepare_sample
from vlmflow.loading import LoadedModel
from vlmflow.positions.groups import Group

log = logging.getLogger(__name__)

THUMB = 320
RECORDS = "records.json"
RELATED_RGBA = (230, 40, 40, 110)
BOX_RGBA = (255, 215, 0, 255)


def related_pixel_mask(layout: Any, related_tokens: np.ndarray, image_size: tuple[int, int], cells: int = 96) -> np.ndarray:
    """Bool ``[H, W]``: original pixels shown by at least one of ``related_tokens`` (token indices).

    The image is probed in ``cells`` x ``cells`` blocks (at most), each as a box; a block that no
    token shows (a resize skipped its pixels) takes the tokens of the block grown by a pixel.

    >>> mask = related_pixel_mask(layout, np.array([0, 1]), (40, 30))   # doctest: +SKIP
    """
    width, height = image_size
    wanted = np.zeros(layout.n_tokens, dtype=bool)
    wanted[related_tokens] = True
    step = max(1, int(np.ceil(max(width, height) / cells)))
    mask = np.zeros((height, width), dtype=bool)
    for y in range(0, height, step):
        for x in range(0, width, step):
            shown = _tokens_showing(layout, x, y, min(step, width - x), min(step, height - y), image_size)
            if (shown & wanted).any():
                mask[y : y + step, x : x + step] = True
    return mask


def _tokens_showing(layout: Any, x: int, y: int, w: int, h: int, image_size: tuple[int, int]) -> np.ndarray:
    """Tokens showing the cell; a cell that downsampling skipped borrows from a 1-px wider ring."""
    width, height = image_size
    for grow in range(4):
        x0, y0 = max(0, x - grow), max(0, y - grow)
        x1, y1 = min(width, x + w + grow), min(height, y + h + grow)
        # Which tokens show these pixels: the geometry, whatever rule picked the related tokens.
        shown = np.asarray(layout.geometry.related_tokens([Box(x0, y0, x1 - x0, y1 - y0)]), dtype=bool)
        if shown.any():
            return shown
    return shown


def write_viewer(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    images: Path,
    folder: Path,
    predictions: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """Write the viewer records of ``samples`` into ``folder``; return them.

    ``predictions`` maps a sample id to its ``samples`` row (prediction, correct) from a run. A
    sample whose image or groups cannot be prepared is recorded with the reason instead.
    """
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index, sample in enumerate(samples):
        row = predictions.get(sample.sample_id, {})
        record: dict[str, Any] = {
            "sample_id": sample.sample_id,
            "question": sample.question,
            "answer": sample.answer,
            "prediction": row.get("prediction"),
            "correct": row.get("correct"),
            "kept": row.get("kept"),
        }
        try:
            image = open_image(sample, images)
            prepared = prepare_sample(loaded, sample, image)
            layout = loaded.inputs.image_layout(prepared.encoded)
            image_pos = np.asarray(prepared.groups[Group.IMAGE])
            related = np.asarray(prepared.groups.positions.get(Group.RELATED, ()), dtype=int)
            token_index = np.searchsorted(image_pos, related)  # related positions -> image-token indices
            mask = related_pixel_mask(layout, token_index, image.size)
            _save_pair(image, mask, sample.boxes, folder, index)
            record.update(
                image=f"{index}.png",
                overlay=f"{index}_related.png",
                image_size=list(image.size),
                n_image_tokens=len(image_pos),
                n_related_tokens=len(related),
                n_question_tokens=len(prepared.groups[Group.QUESTION]),
            )
        except SampleError as exc:
            log.warning("viewer: sample %s skipped: %s", sample.sample_id, exc.reason)
            record["error"] = f"{exc.stage}: {exc.reason}"
        records.append(record)
    (folder / RECORDS).write_text(json.dumps(records, indent=2), encoding="utf-8")
    return records


def _save_pair(image: Image.Image, mask: np.ndarray, boxes: Sequence[Box], folder: Path, index: int) -> None:
    scale = min(1.0, THUMB / max(image.size))
    if max(image.size) * 2 <= THUMB:  # small synthetic images: enlarge by a whole factor, pixels visible
        scale = float(THUMB // max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    image.resize(size, resample).save(folder / f"{index}.png")
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    fill = Image.new("RGBA", image.size, RELATED_RGBA)
    overlay.paste(fill, (0, 0), Image.fromarray(mask.astype(np.uint8) * 255, mode="L"))
    overlay = overlay.resize(size, Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(overlay)
    for box in boxes:
        draw.rectangle(
            (box.x * scale, box.y * scale, (box.x + box.w) * scale - 1, (box.y + box.h) * scale - 1),
            outline=BOX_RGBA,
            width=2,
        )
    overlay.save(folder / f"{index}_related.png")


def read_viewer(folder: Path) -> list[dict[str, Any]]:
    """The records of a viewer folder (empty when there is none)."""
    path = folder / RECORDS
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
