"""A small synthetic ChooseAttr dataset (CSV in the released layout plus PNG images), for tests,
resume checks and soak runs on the tiny models.

Every sample differs: image size, colours, the square's box and the option order vary with its
index, so results of different samples differ and a mix-up between samples would show.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from vlmflow.data.csvio import write_task_csv
from vlmflow.data.sample import Box, Sample, SceneObject, TaskType

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (230, 210, 40)}
SIZES = ((40, 30), (48, 48), (30, 44), (64, 40))


def scene_sample(index: int, *, seed: int = 0) -> tuple[Sample, Image.Image]:
    """Sample ``s<index>`` ("Is the square X or Y?") and its image, a coloured square on a background.

    >>> sample, image = scene_sample(3)
    >>> sample.sample_id, image.size == sample.image_size
    ('s3', True)
    """
    rng = random.Random(f"{seed}/{index}")
    width, height = SIZES[index % len(SIZES)]
    true, false = rng.sample(sorted(COLORS), 2)
    background = tuple(rng.randrange(40, 200) for _ in range(3))
    image = Image.new("RGB", (width, height), background)
    w, h = rng.randrange(6, width // 2), rng.randrange(6, height // 2)
    x, y = rng.randrange(0, width - w), rng.randrange(0, height - h)
    ImageDraw.Draw(image).rectangle((x, y, x + w - 1, y + h - 1), fill=COLORS[true])
    options = (true, false) if rng.random() < 0.5 else (false, true)
    sample = Sample(
        sample_id=f"s{index}",
        image_id=f"img{index}",
        question=f"Is the square {options[0]} or {options[1]}?",
        answer=true,
        task=TaskType.CHOOSE_ATTR,
        true_option=true,
        false_option=false,
        objects=(SceneObject("square", str(index), Box(x, y, w, h)),),
        image_size=(width, height),
    )
    return sample, image


def write_scene_dataset(folder: Path | str, n: int, *, seed: int = 0) -> Path:
    """Write ``n`` samples to ``folder/ChooseAttr.csv`` with their images beside it; return the CSV path.

    >>> csv = write_scene_dataset(tmp / "data", 20)  # doctest: +SKIP
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for index in range(n):
        sample, image = scene_sample(index, seed=seed)
        image.save(folder / f"{sample.image_id}.png")
        samples.append(sample)
    path = folder / "ChooseAttr.csv"
    write_task_csv(samples, path)
    return path
