"""Where one image's tokens lie in the image: :class:`ImageLayout`, the raw material of the patch groups.

A family's input pipeline builds it from the image's size and the family's geometry
(:mod:`vlmflow.positions.patches`, :mod:`~vlmflow.positions.anyres`, ...); position finding
(:mod:`vlmflow.positions.build`) maps it onto the image-token positions of the sequence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from vlmflow.positions.groups import Group


class TokenGeometry(Protocol):
    """What a family's image geometry answers, in image-token order (bool arrays over image tokens)."""

    @property
    def n_tokens(self) -> int: ...

    def related_tokens(self, boxes: Sequence[Any]) -> np.ndarray: ...

    def padding_tokens(self) -> np.ndarray: ...


@dataclass
class ImageLayout:
    """Where the image tokens' patches are, for one image, in image-token order.

    ``related(boxes)`` returns a bool array over image tokens; ``padding`` and ``subgroups`` are
    bool arrays over image tokens too (``subgroups`` holds family-specific groups such as the
    LLaVA-NeXT base view, high-resolution grid and newline tokens).

    >>> from vlmflow.positions.patches import llava_geometry
    >>> layout = ImageLayout(16, llava_geometry((64, 64), mode="resize", view_size=64, patch_size=16))
    >>> int(layout.padding().sum())
    0
    """

    n_tokens: int
    geometry: TokenGeometry
    subgroups: Mapping[Group, np.ndarray] = field(default_factory=dict)
    excluded_from_other: np.ndarray | None = None  # e.g. newline tokens: not patches at all

    def related(self, boxes: Sequence[Any]) -> np.ndarray:
        return np.asarray(self.geometry.related_tokens(boxes), dtype=bool)

    def padding(self) -> np.ndarray:
        return np.asarray(self.geometry.padding_tokens(), dtype=bool)

    def views(self) -> dict[str, np.ndarray]:
        """The patch grids of this image by name (``"base"``; anyres and tiling families also ``"hd"``):
        int ``(rows, cols)`` arrays of image-token indices, what ``grid:VIEW:R0:R1,C0:C1`` addresses.

        A geometry names its views with a ``views()`` method; one without it has none (a ``grid:``
        expression then fails for that sample, naming the family).

        >>> from vlmflow.positions.patches import llava_geometry
        >>> ImageLayout(16, llava_geometry((64, 64), mode="resize", view_size=64, patch_size=16)).views()["base"].tolist()[0]
        [0, 1, 2, 3]
        """
        views = getattr(self.geometry, "views", None)
        return dict(views()) if callable(views) else {}


@dataclass(frozen=True)
class PlacedImage:
    """One image of a prompt where the sequence holds it: its token positions and patch layout.

    Attributes:
        positions: sequence positions of the image's tokens, in image-token order (``layout``'s order).
        layout: where those tokens' patches are (``None``: the family maps no patches).
        size: ``(width, height)`` of the original image (boxes are in its pixels).
    """

    positions: tuple[int, ...]
    layout: ImageLayout | None
    size: tuple[int, int]
