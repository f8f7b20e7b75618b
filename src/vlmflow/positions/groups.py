"""Named position groups: the vocabulary of every knockout.

A :class:`Group` names a set of positions in one sample's language-model sequence (all image
tokens, the question tokens, the last position, ...). :class:`PositionGroups` holds where each
group sits for one sample, and its *items* (a whole image per image, a position otherwise).

Groups combine into expressions (:mod:`vlmflow.positions.expressions`) and routes
(:mod:`vlmflow.positions.routes`: :class:`~vlmflow.positions.routes.Flow`, also importable from
here); strings from users become those typed objects once, at the edge (CLI, config).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from vlmflow.errors import ConfigError, SampleError


class Group(StrEnum):
    """Named position groups. Values are what users type in a flow (``"image->last"``)."""

    IMAGE = "image"  # every image token in the LM sequence (for LLaVA-NeXT: base, grid and newlines); items: whole images
    QUESTION = "question"  # tokens of the question text (not the system prompt, role tags or suffix)
    LAST = "last"  # the final prompt position, which predicts the first answer token
    RELATED = "related"  # image tokens whose patch overlaps a box of the question's objects
    OTHER = "other"  # image tokens minus related minus newline tokens (the paper's "other patches")
    PADDING = "padding"  # image tokens whose patch holds only padding (pad-to-square, anyres fill)
    OTHER_CONTENT = "other_content"  # OTHER minus PADDING: non-related patches that show the image
    IMAGE_BASE = "image_base"  # LLaVA-NeXT: tokens of the low-resolution base view
    IMAGE_GRID = "image_grid"  # LLaVA-NeXT: tokens of the high-resolution grid (newlines excluded)
    IMAGE_NEWLINE = "image_newline"  # LLaVA-NeXT: one learned newline token per grid row
    TRUE_OPTION = "true_option"  # tokens of the true option word(s) inside the question
    FALSE_OPTION = "false_option"  # tokens of the false option word(s) inside the question
    OBJECT_WORD = "object_word"  # tokens of the central object's name inside the question
    SYSTEM = "system"  # everything before the image (system prompt, role tag)
    SUFFIX = "suffix"  # text tokens after the question and before the last position
    RANDOM = "random"  # size-matched random control: as many non-related patches as RELATED
    FRAME = "frame"  # video: the tokens of every frame; items: whole frames, in time order
    TILE = "tile"  # InternVL, Idefics3: the tokens of every tile (thumbnail / global view excluded); items: whole tiles
    # Named aliases for groups of the paper's code (its names in parentheses):
    QUESTION_WITHOUT_OPTIONS = "question_without_options"  # QUESTION minus the option words ("Question without Options")
    RELATED_IN_GRID = "related_in_grid"  # anyres: RELATED & IMAGE_GRID ("Image Central Object in HD Patch")
    GRID_WITHOUT_RELATED = "grid_without_related"  # anyres: IMAGE_GRID - RELATED ("HD Patch Without Central Object")
    GRID_WITH_NEWLINES = "grid_with_newlines"  # anyres: IMAGE_GRID | IMAGE_NEWLINE ("Image HD Patch", newlines included)
    OTHER_WITH_NEWLINES = "other_with_newlines"  # anyres: OTHER | IMAGE_NEWLINE ("Image Without Central Object with pad")

    @classmethod
    def parse(cls, text: str) -> Group:
        """Parse a group name (case-insensitive; ``-`` and spaces read as ``_``).

        >>> Group.parse("Other Content")
        <Group.OTHER_CONTENT: 'other_content'>
        """
        key = text.strip().lower().replace("-", "_").replace(" ", "_")
        try:
            return cls(key)
        except ValueError:
            valid = ", ".join(g.value for g in cls)
            raise ConfigError(f"unknown position group {text!r}; valid: {valid}") from None


#: Groups whose items (``GROUP[i]``) are whole units (an image, a frame, a tile), not positions.
UNIT_GROUPS: tuple[Group, ...] = (Group.IMAGE, Group.FRAME, Group.TILE)


@dataclass(frozen=True)
class PositionGroups:
    """Where each :class:`Group` sits in one sample's language-model sequence.

    ``positions`` maps a group to sorted, unique 0-based sequence positions. ``missing`` maps a
    group that could not be resolved for this sample to the reason (e.g. no option words in a
    QueryAttr question); asking for it raises :class:`SampleError` with that reason.

    ``units`` holds the *items* of the groups whose items are whole units (:data:`UNIT_GROUPS`): for
    ``image`` one tuple of positions per image of the prompt (a video counts as one), for ``frame``
    one per frame of the video, for ``tile`` one per tile, in sequence order. They partition the
    group's positions. :meth:`items` gives the items of any group (one position each for the others),
    which is what ``GROUP[i]`` and ``GROUP[A:B]`` select.

    >>> g = PositionGroups(5, {Group.IMAGE: (1, 2), Group.LAST: (4,)})
    >>> g[Group.IMAGE]
    (1, 2)
    >>> g[Group.QUESTION]
    Traceback (most recent call last):
    ...
    vlmflow.errors.SampleError: position group 'question' is not available for this sample
    """

    seq_len: int
    positions: Mapping[Group, tuple[int, ...]]
    missing: Mapping[Group, str] = field(default_factory=dict)
    units: Mapping[Group, tuple[tuple[int, ...], ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for group, pos in self.positions.items():
            if any(p < 0 or p >= self.seq_len for p in pos):
                raise SampleError(
                    f"group {group.value!r} has positions outside the sequence of length {self.seq_len}",
                    stage="groups",
                )
            if list(pos) != sorted(set(pos)):
                raise SampleError(f"group {group.value!r} positions are not sorted and unique", stage="groups")
        for group, items in self.units.items():
            flat = [p for item in items for p in item]
            if group not in self.positions or flat != list(self.positions[group]) or not all(items):
                raise SampleError(
                    f"the items of group {group.value!r} do not partition its positions in sequence order", stage="groups"
                )

    def __getitem__(self, group: Group) -> tuple[int, ...]:
        if group in self.positions:
            return self.positions[group]
        reason = self.missing.get(group)
        detail = f": {reason}" if reason else ""
        raise SampleError(f"position group {group.value!r} is not available for this sample{detail}", stage="groups")

    def __contains__(self, group: object) -> bool:
        return group in self.positions

    def items(self, group: Group) -> tuple[tuple[int, ...], ...]:
        """The items of ``group`` in sequence order (see the class docstring).

        >>> g = PositionGroups(6, {Group.IMAGE: (1, 2, 3, 4)}, units={Group.IMAGE: ((1, 2), (3, 4))})
        >>> g.items(Group.IMAGE)[-1], PositionGroups(6, {Group.LAST: (5,)}).items(Group.LAST)
        ((3, 4), ((5,),))
        """
        if group in self.units:
            return self.units[group]
        return tuple((p,) for p in self[group])

    def sizes(self) -> dict[str, int]:
        """Number of positions per available group, keyed by group name."""
        return {g.value: len(p) for g, p in self.positions.items()}


def __getattr__(name: str) -> object:
    # Flow and PAPER_FLOWS moved to vlmflow.positions.routes; importing them from here still works.
    if name in ("Flow", "PAPER_FLOWS", "Route"):
        from vlmflow.positions import routes

        return getattr(routes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
