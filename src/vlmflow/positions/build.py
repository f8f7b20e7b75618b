"""Resolve every :class:`~vlmflow.positions.groups.Group` for one encoded sample.

Groups come from the real token sequence: image tokens are the positions holding the model's image
token id; the question is the set of tokens overlapping the question's character span (tokenizer
offsets); related/other/padding patches come from the family's :class:`ImageLayout` mapped onto
the image-token positions. A group that comes out empty is recorded as *missing* with its reason, so
a flow that needs it fails loudly for that sample instead of silently blocking nothing.

A prompt with several images or a video has one :class:`~vlmflow.positions.layout.VisualBlock` per
image or frame; their tokens are the visual tokens of the sequence in order, block by block. The
``image`` group holds all of them and has one item per image (a video is one), ``frame`` one item
per frame, ``tile`` one per tile; an object's box (``SceneObject.image``: which image or input frame
it is in) maps through the layouts of the blocks that show that image or frame.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from vlmflow.data.sample import Sample
from vlmflow.errors import SampleError
from vlmflow.inputs import Encoded
from vlmflow.positions.groups import Group, PositionGroups
from vlmflow.positions.layout import ImageLayout, PlacedImage, VisualBlock
from vlmflow.positions.text import find_word, tokens_in_span


def build_position_groups(
    encoded: Encoded,
    blocks: Sequence[VisualBlock],
    sample: Sample,
    *,
    random_draw: int = 0,
    patch_groups: bool = True,
) -> PositionGroups:
    """All position groups of one sample.

    Args:
        encoded: the processor output with offsets (:meth:`InputPipeline.encode <vlmflow.adapters.pipeline.InputPipeline.encode>`).
        blocks: the visual blocks (one per image, or per frame of a video) in sequence order
            (:meth:`InputPipeline.visual_blocks <vlmflow.adapters.pipeline.InputPipeline.visual_blocks>`).
        sample: the sample (boxes, options, object name).
        random_draw: index of the size-matched random control draw (:attr:`Group.RANDOM`).
        patch_groups: resolve the groups that need the patch layouts (related, other, padding, ...).

    Raises:
        SampleError: the sequence has no image tokens, the question is not in the prompt, the
            image-token count differs from the layouts', or groups overlap where they must not.
    """
    ids = encoded.input_ids.numpy()
    seq_len = len(ids)
    positions: dict[Group, tuple[int, ...]] = {}
    missing: dict[Group, str] = {}
    token_ids = sorted({int(b.token_id) for b in blocks})
    image_pos = np.flatnonzero(np.isin(ids, token_ids))
    if len(image_pos) == 0:
        spelled = ", ".join(str(t) for t in token_ids) or "none"
        raise SampleError(f"no image tokens (id {spelled}) in the {seq_len}-token sequence", stage="groups")
    positions[Group.IMAGE] = _t(image_pos)
    block_pos = _split_blocks(ids, image_pos, blocks)
    units = _unit_items(blocks, block_pos, positions, missing)

    question = tokens_in_span(encoded.offsets, encoded.question_span)
    if not question:
        raise SampleError(
            f"question text {sample.question!r} not found in the prompt's tokens: no token's character offsets "
            f"overlap characters {encoded.question_span[0]}..{encoded.question_span[1]} of the prompt (a tokenizer "
            "without offset mapping cannot be used)",
            stage="groups",
        )
    if set(question) & set(positions[Group.IMAGE]):
        raise SampleError("question tokens overlap image tokens", stage="groups")
    last = seq_len - 1
    if last in question or last in set(positions[Group.IMAGE]):
        raise SampleError("the last position is inside the question or the image; the prompt has no suffix", stage="groups")
    positions[Group.QUESTION] = question
    positions[Group.LAST] = (last,)
    _put(positions, missing, Group.SYSTEM, np.arange(0, int(image_pos[0])), "nothing precedes the image")
    suffix = np.setdiff1d(np.arange(question[-1] + 1, last), image_pos)
    _put(positions, missing, Group.SUFFIX, suffix, "nothing between the question and the last position")

    _option_groups(encoded, sample, positions, missing)
    if patch_groups:
        _patch_groups(blocks, block_pos, sample, positions, missing, random_draw)
    _alias_groups(positions, missing)
    return PositionGroups(seq_len=seq_len, positions=positions, missing=missing, units=units)


def placed_images(encoded: Encoded, blocks: Sequence[VisualBlock]) -> tuple[PlacedImage, ...]:
    """Where each visual block (image, or frame of a video) sits in the sequence, with its layout:
    what ``box:`` and ``grid:`` expressions map through.

    >>> [len(p.positions) for p in placed_images(encoded, loaded.inputs.visual_blocks(encoded))]   # doctest: +SKIP
    [576]
    """
    ids = encoded.input_ids.numpy()
    image_pos = np.flatnonzero(np.isin(ids, sorted({int(b.token_id) for b in blocks})))
    return tuple(
        PlacedImage(_t(pos), block.layout, block.size) for block, pos in zip(blocks, _split_blocks(ids, image_pos, blocks), strict=True)
    )


def _split_blocks(ids: np.ndarray, image_pos: np.ndarray, blocks: Sequence[VisualBlock]) -> list[np.ndarray]:
    """The sequence positions of each block's tokens: the image tokens in order, block by block."""
    counts = [int(b.layout.n_tokens) for b in blocks]
    if sum(counts) != len(image_pos):
        what = "this image's patch layout has" if len(blocks) == 1 else f"the patch layouts of its {len(blocks)} images or frames have"
        raise SampleError(
            f"image-token count mismatch: the sequence has {len(image_pos)} image tokens but {what} {sum(counts)}",
            stage="groups",
        )
    out = np.split(image_pos, np.cumsum(counts)[:-1])
    for k, (block, pos) in enumerate(zip(blocks, out, strict=True)):
        if not bool((ids[pos] == block.token_id).all()):
            raise SampleError(
                f"image or frame {k} should hold tokens of id {block.token_id} but its positions hold others; the "
                "images and frames are not in the order the layouts list them",
                stage="groups",
            )
    return out


def _unit_items(
    blocks: Sequence[VisualBlock],
    block_pos: Sequence[np.ndarray],
    positions: dict[Group, tuple[int, ...]],
    missing: dict[Group, str],
) -> dict[Group, tuple[tuple[int, ...], ...]]:
    """The items of the unit groups: whole images (a video is one), whole frames, whole tiles."""
    by_image: dict[int, list[int]] = {}
    frames: list[tuple[int, ...]] = []
    tiles: list[tuple[int, ...]] = []
    for block, pos in zip(blocks, block_pos, strict=True):
        by_image.setdefault(block.image, []).extend(int(p) for p in pos)
        if block.frame is not None:
            frames.append(_t(pos))
        tiles.extend(_t(pos[np.asarray(index, dtype=int)]) for index in block.layout.units.get(Group.TILE, ()))
    units = {Group.IMAGE: tuple(_t(np.asarray(p)) for _, p in sorted(by_image.items()))}
    for group, items, reason in (
        (Group.FRAME, frames, "the sample shows no video"),
        (Group.TILE, tiles, "no image of the sample is split into tiles"),
    ):
        if items:
            positions[group] = _t(np.concatenate([np.asarray(i) for i in items]))
            units[group] = tuple(items)
        else:
            missing[group] = reason
    return units


#: Named aliases for groups of the paper's code: (alias, how it is made, the groups it needs).
_ALIASES: tuple[tuple[Group, str, tuple[Group, ...]], ...] = (
    (Group.RELATED_IN_GRID, "&", (Group.RELATED, Group.IMAGE_GRID)),
    (Group.GRID_WITHOUT_RELATED, "-", (Group.IMAGE_GRID, Group.RELATED)),
    (Group.GRID_WITH_NEWLINES, "|", (Group.IMAGE_GRID, Group.IMAGE_NEWLINE)),
    (Group.OTHER_WITH_NEWLINES, "|", (Group.OTHER, Group.IMAGE_NEWLINE)),
)


def _alias_groups(positions: dict[Group, tuple[int, ...]], missing: dict[Group, str]) -> None:
    """The paper code's groups vlmflow names as aliases (``Group.QUESTION_WITHOUT_OPTIONS``, ...).

    The question without its options drops whichever option words the question holds (all of it
    when it names none, e.g. QueryAttr). The anyres aliases need the grid (and newline) groups, so
    other families lack them, with the reason.
    """
    options = set(positions.get(Group.TRUE_OPTION, ())) | set(positions.get(Group.FALSE_OPTION, ()))
    rest = np.setdiff1d(np.array(positions[Group.QUESTION]), np.array(sorted(options), dtype=int))
    _put(positions, missing, Group.QUESTION_WITHOUT_OPTIONS, rest, "the question is nothing but its options")
    for alias, op, (a, b) in _ALIASES:
        lacking = [g for g in (a, b) if g not in positions]
        if lacking:
            reasons = "; ".join(f"{g.value}: {missing.get(g, 'not available')}" for g in lacking)
            missing[alias] = f"needs {' and '.join(g.value for g in lacking)} ({reasons})"
            continue
        left, right = np.array(positions[a]), np.array(positions[b])
        result = {"&": np.intersect1d, "-": np.setdiff1d, "|": np.union1d}[op](left, right)
        _put(positions, missing, alias, result, f"{a.value} {op} {b.value} is empty")


def _t(array: np.ndarray) -> tuple[int, ...]:
    return tuple(int(x) for x in np.unique(array))


def _put(
    positions: dict[Group, tuple[int, ...]],
    missing: dict[Group, str],
    group: Group,
    array: np.ndarray,
    reason_if_empty: str,
) -> None:
    if len(array):
        positions[group] = _t(array)
    else:
        missing[group] = reason_if_empty


def _option_groups(
    encoded: Encoded, sample: Sample, positions: dict[Group, tuple[int, ...]], missing: dict[Group, str]
) -> None:
    for group, word in (
        (Group.TRUE_OPTION, sample.true_option),
        (Group.FALSE_OPTION, sample.false_option),
        (Group.OBJECT_WORD, sample.object_name),
    ):
        if not word:
            missing[group] = f"the sample has no {group.value.replace('_', ' ')}"
            continue
        span = find_word(encoded.text, word, encoded.question_span)
        if span is None:
            missing[group] = f"{group.value.replace('_', ' ')} {word!r} does not occur in the question {sample.question!r}"
            continue
        toks = tokens_in_span(encoded.offsets, span)
        _put(positions, missing, group, np.array(toks, dtype=int), f"{word!r} maps to no token")


def _patch_groups(
    blocks: Sequence[VisualBlock],
    block_pos: Sequence[np.ndarray],
    sample: Sample,
    positions: dict[Group, tuple[int, ...]],
    missing: dict[Group, str],
    random_draw: int,
) -> None:
    """Related, other, padding, random and the layouts' subgroups, over every image or frame."""
    image_pos = np.concatenate(list(block_pos))
    n_sources = 1 + max((s for b in blocks for s in b.sources), default=0)
    boxes = sample.boxes
    reason = "the sample has no object boxes" if not boxes else None
    try:  # a bad box fails the flows that need the boxes, not the sample
        for obj in sample.objects:
            if obj.box is not None and not 0 <= obj.image < n_sources:
                raise SampleError(
                    f"object {obj.name!r} has its box in image or frame {obj.image}, but the sample shows {n_sources} "
                    f"(valid: 0..{n_sources - 1})",
                    stage="boxes",
                )
            if obj.box is not None:
                obj.box.check(next(b.size for b in blocks if obj.image in b.sources))
    except SampleError as exc:
        reason = exc.reason
    parts: dict[str, list[np.ndarray]] = {"excluded": [], "padding": [], "related": []}
    for block in blocks:
        layout = block.layout
        excluded = (
            np.zeros(layout.n_tokens, dtype=bool)
            if layout.excluded_from_other is None
            else np.asarray(layout.excluded_from_other, dtype=bool)
        )
        parts["excluded"].append(excluded)
        parts["padding"].append(layout.padding() & ~excluded)
        mine = [] if reason else [obj.box for obj in sample.objects if obj.box is not None and obj.image in block.sources]
        parts["related"].append(layout.related(mine) & ~excluded if mine else np.zeros(layout.n_tokens, dtype=bool))
    excluded = np.concatenate(parts["excluded"])
    padding = np.concatenate(parts["padding"])
    for group in dict.fromkeys(g for block in blocks for g in block.layout.subgroups):
        mask = np.concatenate([_subgroup(block.layout, group) for block in blocks])
        _put(positions, missing, group, image_pos[mask], f"no {group.value} tokens")
    _put(positions, missing, Group.PADDING, image_pos[padding], "no padding-only patches")
    if reason is not None:
        for group in (Group.RELATED, Group.OTHER, Group.OTHER_CONTENT, Group.RANDOM):
            missing[group] = reason
        return
    related = np.concatenate(parts["related"])
    other = ~related & ~excluded
    _put(positions, missing, Group.RELATED, image_pos[related], f"no image patch overlaps the boxes {boxes}")
    _put(positions, missing, Group.OTHER, image_pos[other], "every image patch is related")
    _put(positions, missing, Group.OTHER_CONTENT, image_pos[other & ~padding], "no non-related content patch")
    n_related = int(related.sum())
    pool = np.flatnonzero(other)
    if n_related == 0:
        missing[Group.RANDOM] = "related group is empty, so the size-matched control is too"
    elif len(pool) < n_related:
        missing[Group.RANDOM] = f"only {len(pool)} non-related patches for a control of size {n_related}"
    else:
        seed = int.from_bytes(hashlib.sha256(f"{sample.sample_id}/{random_draw}".encode()).digest()[:8], "little")
        pick = np.random.default_rng(seed).choice(pool, size=n_related, replace=False)
        positions[Group.RANDOM] = _t(image_pos[pick])


def _subgroup(layout: ImageLayout, group: Group) -> np.ndarray:
    """Bool over the layout's tokens: its ``group`` subgroup (all False where it has none)."""
    mask = layout.subgroups.get(group)
    return np.zeros(layout.n_tokens, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
