"""Boxes to image tokens for InternVL's dynamic tiling: tiles chosen by aspect ratio, plus a thumbnail.

The InternVL image processor (``GotOcr2ImageProcessor`` with ``crop_to_patches``)

1. picks a grid of ``cols x rows`` tiles, ``min_tiles <= cols * rows <= max_tiles``, whose aspect
   ratio is closest to the image's (ties go to the grid with more tiles while the image has more
   than half of that grid's pixels: :func:`tile_grid`),
2. resizes the whole image to ``cols * T`` x ``rows * T`` (the aspect ratio is not kept) and cuts it
   into ``T`` x ``T`` tiles, row-major,
3. when there is more than one tile, appends a thumbnail: the whole image resized to ``T`` x ``T``;
   a single tile is itself the whole image resized.

Each tile goes through the vision tower in ``patch`` x ``patch`` patches (448 / 14 = 32 per side for
the released checkpoints) and the pixel shuffle folds every ``scale x scale`` block of patches into
one token, row-major (16 x 16 tokens of 28 px per tile, 256 per tile). The language model sees the
tiles' tokens in tile order, then the thumbnail's. The pixel oracle of the tests
(``tests/support/family_oracles.py``) checks this against the real processor and pixel shuffle.
"""

from __future__ import annotations

import functools

from vlmflow.errors import ConfigError
from vlmflow.positions.patches import Axis, _check_size
from vlmflow.positions.split_tiles import SplitLayout, _frame


def tile_grid(width: int, height: int, *, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """``(cols, rows)`` of the tile grid InternVL picks for a ``width`` x ``height`` image.

    Candidates are all grids with ``min_tiles <= cols * rows <= max_tiles``, in order of tile
    count; the first one with the smallest aspect-ratio difference wins, and a later one with the
    same difference replaces it while the image has more than half the pixels of that grid.

    >>> tile_grid(500, 375, tile=448, min_tiles=1, max_tiles=12)
    (4, 3)
    >>> tile_grid(448, 448, tile=448, min_tiles=1, max_tiles=12)
    (1, 1)
    """
    candidates = sorted(
        ((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if min_tiles <= c * r <= max_tiles),
        key=lambda grid: grid[0] * grid[1],
    )
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidates:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def internvl_geometry(
    image_size: tuple[int, int],
    *,
    tile_size: int = 448,
    patch_size: int = 14,
    scale_factor: int = 2,
    min_tiles: int = 1,
    max_tiles: int = 12,
    tiling: bool = True,
) -> SplitLayout:
    """Token layout of one image in InternVL: ``rows x cols`` tiles (row-major), then the thumbnail.

    Args:
        image_size: ``(width, height)`` of the original image.
        tile_size: the processor's ``size`` (448), the vision tower's ``image_size``.
        patch_size: the vision tower's patch size (14).
        scale_factor: patches per token side, ``1 / downsample_ratio`` (2).
        min_tiles / max_tiles: the processor's ``min_patches`` / ``max_patches`` (1 / 12).
        tiling: the processor's ``crop_to_patches`` (with ``max_tiles > 1``); off: one resized view.

    >>> g = internvl_geometry((500, 375))
    >>> (g.rows, g.cols, g.n_tiles, g.n_tokens)
    (3, 4, 12, 3328)
    """
    if min(tile_size, patch_size, scale_factor) <= 0 or tile_size % patch_size or (tile_size // patch_size) % scale_factor:
        raise ConfigError(
            f"tiles of {tile_size} px in {patch_size}-px patches do not fold into tokens of {scale_factor} x "
            f"{scale_factor} patches"
        )
    if not 1 <= min_tiles <= max_tiles:
        raise ConfigError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles} and {max_tiles}")
    return _internvl_geometry(
        _check_size(image_size), int(tile_size), int(patch_size), int(scale_factor), int(min_tiles), int(max_tiles),
        bool(tiling and max_tiles > 1),
    )


@functools.lru_cache(maxsize=4096)
def _internvl_geometry(
    image_size: tuple[int, int], tile: int, patch: int, scale: int, min_tiles: int, max_tiles: int, tiling: bool
) -> SplitLayout:
    token = patch * scale
    width, height = image_size
    x, y = Axis.identity(width), Axis.identity(height)
    cols, rows = tile_grid(width, height, tile=tile, min_tiles=min_tiles, max_tiles=max_tiles) if tiling else (1, 1)
    if cols * rows == 1:
        return SplitLayout((_frame(x.resize(tile), y.resize(tile), token, tile),))
    x2, y2 = x.resize(cols * tile), y.resize(rows * tile)
    tiles = [_frame(x2.crop(c * tile, tile), y2.crop(r * tile, tile), token, tile) for r in range(rows) for c in range(cols)]
    return SplitLayout((*tiles, _frame(x.resize(tile), y.resize(tile), token, tile)), rows=rows, cols=cols)
