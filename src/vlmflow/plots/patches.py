"""Where image tokens' patches lie in the original image, and a figure outlining a group's patches.

:func:`patch_rectangles` asks the family's own image layout which original columns and rows each
image token shows (``ImageLayout.related`` on one-pixel-wide boxes, the same mapping ``related`` and
``box:`` use), so it works for every family's geometry. A token that shows no original pixel
(padding, a newline token) has no rectangle.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from vlmflow.data.sample import Box
from vlmflow.positions.layout import ImageLayout

__all__ = ["outline_figure", "patch_rectangles"]


def patch_rectangles(layout: ImageLayout, size: tuple[int, int]) -> list[tuple[int, int, int, int] | None]:
    """Per image token, the original-pixel rectangle ``(x0, y0, x1, y1)`` (inclusive) spanning the pixels its
    patch shows (a downscaling resize samples every other pixel here: the first and last shown bound it).

    >>> from vlmflow.positions.patches import llava_geometry
    >>> layout = ImageLayout(4, llava_geometry((8, 8), mode="resize", view_size=4, patch_size=2))
    >>> patch_rectangles(layout, (8, 8))[:2]
    [(1, 1, 3, 3), (5, 1, 7, 3)]
    """
    width, height = size
    by_column = np.stack([layout.related([Box(x, 0, 1, height)]) for x in range(width)], axis=1)  # [tokens, width]
    by_row = np.stack([layout.related([Box(0, y, width, 1)]) for y in range(height)], axis=1)  # [tokens, height]
    out: list[tuple[int, int, int, int] | None] = []
    for cols, rows in zip(by_column, by_row, strict=True):
        xs, ys = np.flatnonzero(cols), np.flatnonzero(rows)
        out.append((int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1])) if len(xs) and len(ys) else None)
    return out


def outline_figure(
    image: Image.Image,
    rectangles: Sequence[tuple[int, int, int, int] | None],
    tokens: Sequence[int],
    title: str,
) -> Figure:
    """The image with the patches of image tokens ``tokens`` (indices into ``rectangles``) outlined.

    >>> fig = outline_figure(Image.new("RGB", (8, 8)), [(0, 0, 3, 3), None], [0, 1], "demo")
    >>> len(fig.axes[0].patches)
    1
    """
    fig = Figure(figsize=(6, 6 * image.height / max(1, image.width) + 0.4))
    ax = fig.add_subplot()
    ax.imshow(np.asarray(image.convert("RGB")))
    shown = 0
    for token in tokens:
        rect = rectangles[token]
        if rect is None:
            continue
        x0, y0, x1, y1 = rect
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, edgecolor="#ff2d2d", linewidth=0.8))
        shown += 1
    ax.set_title(f"{title}: {shown} patches", fontsize=10)
    ax.set_axis_off()
    fig.tight_layout()
    return fig
