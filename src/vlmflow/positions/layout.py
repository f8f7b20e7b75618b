"""Where one image's tokens lie in the image: :class:`ImageLayout`, the raw material of the patch groups.

A family's input pipeline builds it from the image's size and the family's geometry
(:mod:`vlmflow.positions.patches`, :mod:`~vlmflow.positions.anyres`, ...); position finding
(:mod:`vlmflow.positions.build`) maps it onto the image-token positions of the sequence.

A prompt with several images, or with a video, has one :class:`VisualBlock` per image or per
frame of the video (as the model sees it), in sequence order: its layout, the token id its tokens
carry, and which inputs' pixels (so which boxes) it shows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
    LLaVA-NeXT base view, high-resolution grid and newline tokens). ``related`` follows the
    geometry's pixel overlap unless ``related_rule`` gives another rule (``patch_rule="paper"``,
    :mod:`vlmflow.positions.paper_rule`); ``geometry.related_tokens`` always answers which tokens
    show which pixels.

    >>> from vlmflow.positions.patches import llava_geometry
    >>> layout = ImageLayout(16, llava_geometry((64, 64), mode="resize", view_size=64, patch_size=16))
    >>> int(layout.padding().sum())
    0
    """

    n_tokens: int
    geometry: TokenGeometry
    subgroups: Mapping[Group, np.ndarray] = field(default_factory=dict)
    excluded_from_other: np.ndarray | None = None  # e.g. newline tokens: not patches at all
    #: Per unit group (``tile``), its items in this image: indices into the image's tokens, in order.
    units: Mapping[Group, Sequence[np.ndarray]] = field(default_factory=dict)
    related_rule: Callable[[Sequence[Any]], np.ndarray] | None = None  # boxes -> bool (n_tokens,)
    # A rule renders a mask per call: the control's random draws ask again for the same boxes.
    _ruled: dict[tuple[Any, ...], np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def related(self, boxes: Sequence[Any]) -> np.ndarray:
        """Bool ``(n_tokens,)``: the tokens related to ``boxes`` under the layout's patch rule."""
        if self.related_rule is None:
            return np.asarray(self.geometry.related_tokens(boxes), dtype=bool)
        key = tuple(boxes)
        if key not in self._ruled:
            related = np.asarray(self.related_rule(boxes), dtype=bool)
            if related.shape != (self.n_tokens,):
                raise ValueError(f"the patch rule gave {related.shape} related flags for {self.n_tokens} image tokens")
            related.setflags(write=False)
            self._ruled[key] = related
        return self._ruled[key]

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
class VisualBlock:
    """The tokens of one image, or of one frame of a video, in the language-model sequence.

    Attributes:
        layout: where its tokens' patches are.
        token_id: the id its tokens carry in ``input_ids`` (the image or the video token).
        image: which image of the prompt it belongs to (a video is one image).
        frame: for a video, which frame as the model sees it (``None`` for an image).
        sources: which inputs' pixels it shows, so whose boxes map through its layout: the image's
            index for an image; for a video the indices of the input frames folded into this one
            (two per model frame for Qwen-VL's temporal patches of 2).
        size: ``(width, height)`` of those inputs, before any processing.

    >>> from vlmflow.positions.patches import llava_geometry
    >>> block = VisualBlock(ImageLayout(4, llava_geometry((8, 8), mode="resize", view_size=8, patch_size=4)), 32, 0, None, (0,), (8, 8))
    >>> block.layout.n_tokens, block.sources
    (4, (0,))
    """

    layout: ImageLayout
    token_id: int
    image: int
    frame: int | None
    sources: tuple[int, ...]
    size: tuple[int, int]


@dataclass(frozen=True)
class PlacedImage:
    """One image (or one frame of a video) of a prompt where the sequence holds it: its token
    positions and patch layout.

    Attributes:
        positions: sequence positions of the image's tokens, in image-token order (``layout``'s order).
        layout: where those tokens' patches are (``None``: the family maps no patches).
        size: ``(width, height)`` of the original image (boxes are in its pixels).
    """

    positions: tuple[int, ...]
    layout: ImageLayout | None
    size: tuple[int, int]
