"""Boxes to image tokens for image-splitting models (Idefics3, SmolVLM): tiles plus a global view.

The Idefics3 / SmolVLM image processor

1. resizes the image so that its longest side is ``longest_edge`` (aspect ratio kept, the other
   side truncated to an integer and made even; never above 4096),
2. with splitting on, resizes again so that both sides are multiples of the tile size ``M``
   (``max_image_size``), and cuts that into ``rows x cols`` tiles of ``M x M``, row-major, followed
   by the whole (step-2) image resized to ``M x M`` (the *global* view); an image that fits into one
   tile is only resized to ``M x M`` and has no tiles,
3. (without splitting) resizes the step-1 image to ``M x M``.

Each ``M x M`` frame goes through the vision tower in ``patch`` x ``patch`` patches (a stride-``patch``
convolution: when ``patch`` does not divide ``M`` the last ``M mod patch`` pixel rows and columns are
never seen, e.g. 6 of 384 at patch 14), and the connector's pixel shuffle folds every
``scale x scale`` block of patches into one token, row-major (13 x 13 tokens of 28 px for Idefics3
at 364/14/2, 9 x 9 of 42 px for SmolVLM-2B at 384/14/3, 8 x 8 of 64 px for SmolVLM-256M at 512/16/4).
The language model sees the frames' tokens in frame order: tiles, then the global view.
The pixel oracle of the tests (``tests/support/family_oracles.py``) checks this against the real
processor and pixel shuffle.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from vlmflow.errors import ConfigError
from vlmflow.positions.patches import Axis, GridPart, PatchGrid, TokenLayout, View, _check_size

#: The processors' absolute bound on the resized image's longest side.
MAX_IMAGE_SIDE = 4096


def longest_edge_size(width: int, height: int, longest_edge: int) -> tuple[int, int]:
    """``(width, height)`` after step 1: longest side ``longest_edge``, the other side even.

    >>> longest_edge_size(500, 375, 1456)
    (1456, 1092)
    """
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    width, height = max(width, 1), max(height, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIDE:
        width, height = MAX_IMAGE_SIDE, max(int(MAX_IMAGE_SIDE / aspect), 1)
    elif height > width and height > MAX_IMAGE_SIDE:
        height, width = MAX_IMAGE_SIDE, max(int(MAX_IMAGE_SIDE * aspect), 1)
    return width, height


def tile_multiple_size(width: int, height: int, tile: int) -> tuple[int, int]:
    """``(width, height)`` after step 2: both sides rounded up to multiples of ``tile``.

    >>> tile_multiple_size(1456, 1092, 364)
    (1456, 1092)
    >>> tile_multiple_size(1092, 1456, 364)
    (1092, 1456)
    """
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return width, height


@dataclass(frozen=True, eq=False)
class SplitLayout(TokenLayout):
    """A :class:`TokenLayout` of ``rows x cols`` tiles (row-major) and then the global view."""

    rows: int = 0
    cols: int = 0

    @property
    def n_tiles(self) -> int:
        return self.rows * self.cols

    def views(self) -> dict[str, np.ndarray]:
        """``"base"``: the global view's token grid; ``"hd"`` (with tiles): the tiles' token grids put
        side by side as the tiles lie in the image. Int arrays of image-token indices.

        >>> g = split_geometry((500, 375), longest_edge=1456, tile_size=364, patch_size=14, scale_factor=2)
        >>> {name: grid.shape for name, grid in g.views().items()}
        {'base': (13, 13), 'hd': (39, 52)}
        """
        offsets = np.cumsum([0] + [part.n_tokens for part in self.parts])
        grids = [part.token_grid() + offsets[i] for i, part in enumerate(self.parts)]
        out = {"base": grids[-1]}
        if self.n_tiles:
            out["hd"] = np.block([[grids[r * self.cols + c] for c in range(self.cols)] for r in range(self.rows)])
        return out

    def global_tokens(self) -> np.ndarray:
        """Bool ``(n_tokens,)``: the token belongs to the global (whole-image) view."""
        sizes = [part.n_tokens for part in self.parts]
        out = np.zeros(sum(sizes), dtype=bool)
        out[sum(sizes[:-1]) :] = True
        return out

    def tile_items(self) -> list[np.ndarray]:
        """The token indices of each tile, in tile order (none when the image is one view).

        >>> [len(t) for t in SplitLayout((*[_frame(Axis.identity(8), Axis.identity(8), 4, 8)] * 3,), rows=1, cols=2).tile_items()]
        [4, 4]
        """
        sizes = [part.n_tokens for part in self.parts[: self.n_tiles]]
        starts = np.cumsum([0, *sizes[:-1]])
        return [np.arange(start, start + n) for start, n in zip(starts, sizes, strict=True)]


def split_geometry(
    image_size: tuple[int, int],
    *,
    longest_edge: int,
    tile_size: int,
    patch_size: int,
    scale_factor: int,
    splitting: bool = True,
) -> SplitLayout:
    """Token layout of one image in Idefics3 / SmolVLM.

    Args:
        image_size: ``(width, height)`` of the original image.
        longest_edge: the processor's ``size["longest_edge"]`` (1456 for Idefics3-8B).
        tile_size: ``max_image_size["longest_edge"]``, the side of every frame (364).
        patch_size: the vision tower's patch size (14).
        scale_factor: the connector's pixel-shuffle factor (2).
        splitting: the processor's ``do_image_splitting``.

    >>> g = split_geometry((500, 375), longest_edge=1456, tile_size=364, patch_size=14, scale_factor=2)
    >>> (g.rows, g.cols, g.n_tokens)
    (3, 4, 2197)
    """
    if min(longest_edge, tile_size, patch_size, scale_factor) <= 0 or (tile_size // patch_size) % scale_factor:
        raise ConfigError(
            f"{tile_size // max(patch_size, 1)} patches per tile side (tile {tile_size}, patch {patch_size}) "
            f"do not fold into tokens of {scale_factor} x {scale_factor} patches"
        )
    return _split_geometry(
        _check_size(image_size), int(longest_edge), int(tile_size), int(patch_size), int(scale_factor), bool(splitting)
    )


@functools.lru_cache(maxsize=4096)
def _split_geometry(
    image_size: tuple[int, int], longest: int, tile: int, patch: int, scale: int, splitting: bool
) -> SplitLayout:
    token = patch * scale
    seen = (tile // patch) * patch  # pixels the stride-`patch` convolution covers
    width, height = image_size
    w1, h1 = longest_edge_size(width, height, longest)
    x, y = Axis.identity(width).resize(w1), Axis.identity(height).resize(h1)
    if not splitting:
        return SplitLayout((_frame(x.resize(tile), y.resize(tile), token, seen),))
    w2, h2 = tile_multiple_size(w1, h1, tile)
    x, y = x.resize(w2), y.resize(h2)
    if w2 <= tile and h2 <= tile:
        return SplitLayout((_frame(x, y, token, seen),))
    rows, cols = h2 // tile, w2 // tile
    tiles = [_frame(x.crop(c * tile, tile), y.crop(r * tile, tile), token, seen) for r in range(rows) for c in range(cols)]
    return SplitLayout((*tiles, _frame(x.resize(tile), y.resize(tile), token, seen)), rows=rows, cols=cols)


def _frame(x: Axis, y: Axis, token: int, seen: int) -> GridPart:
    return GridPart(PatchGrid(View(y=y.crop(0, seen), x=x.crop(0, seen)), token))
