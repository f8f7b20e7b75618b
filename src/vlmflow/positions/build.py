"""Resolve every :class:`~vlmflow.positions.groups.Group` for one encoded sample.

Groups come from the real token sequence: image tokens are the positions holding the model's image
token id; the question is the set of tokens overlapping the question's character span (tokenizer
offsets); related/other/padding patches come from the family's :class:`ImageLayout` mapped onto
the image-token positions. A group that comes out empty is recorded as *missing* with its reason, so
a flow that needs it fails loudly for that sample instead of silently blocking nothing.
"""

from __future__ import annotations

import hashlib

import numpy as np

from vlmflow.data.sample import Sample
from vlmflow.errors import SampleError
from vlmflow.inputs import Encoded
from vlmflow.positions.groups import Group, PositionGroups
from vlmflow.positions.layout import ImageLayout
from vlmflow.positions.text import find_word, tokens_in_span


def build_position_groups(
    encoded: Encoded,
    image_token_id: int,
    layout: ImageLayout | None,
    sample: Sample,
    *,
    random_draw: int = 0,
) -> PositionGroups:
    """All position groups of one sample.

    Args:
        encoded: the processor output with offsets (:meth:`InputPipeline.encode <vlmflow.adapters.pipeline.InputPipeline.encode>`).
        image_token_id: id of the image token in ``encoded.input_ids``.
        layout: the image tokens' patch layout; ``None`` skips the patch groups.
        sample: the sample (boxes, options, object name).
        random_draw: index of the size-matched random control draw (:attr:`Group.RANDOM`).

    Raises:
        SampleError: the sequence has no image tokens, the question is not in the prompt, the
            image-token count differs from the layout's, or groups overlap where they must not.
    """
    ids = encoded.input_ids.numpy()
    seq_len = len(ids)
    positions: dict[Group, tuple[int, ...]] = {}
    missing: dict[Group, str] = {}

    image_pos = np.flatnonzero(ids == image_token_id)
    if len(image_pos) == 0:
        raise SampleError(f"no image tokens (id {image_token_id}) in the {seq_len}-token sequence", stage="groups")
    positions[Group.IMAGE] = _t(image_pos)

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
    if layout is not None:
        _patch_groups(layout, image_pos, sample, encoded.image_size, positions, missing, random_draw)
    _alias_groups(positions, missing)
    # One image: one item of the image group (a family with several images gives one item each).
    units = {Group.IMAGE: (positions[Group.IMAGE],)}
    return PositionGroups(seq_len=seq_len, positions=positions, missing=missing, units=units)


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
    layout: ImageLayout,
    image_pos: np.ndarray,
    sample: Sample,
    image_size: tuple[int, int],
    positions: dict[Group, tuple[int, ...]],
    missing: dict[Group, str],
    random_draw: int,
) -> None:
    if layout.n_tokens != len(image_pos):
        raise SampleError(
            f"image-token count mismatch: the sequence has {len(image_pos)} image tokens but this "
            f"image's patch layout has {layout.n_tokens}",
            stage="groups",
        )
    excluded = (
        np.zeros(layout.n_tokens, dtype=bool)
        if layout.excluded_from_other is None
        else np.asarray(layout.excluded_from_other, dtype=bool)
    )
    padding = layout.padding() & ~excluded
    for group, mask in layout.subgroups.items():
        _put(positions, missing, group, image_pos[np.asarray(mask, dtype=bool)], f"no {group.value} tokens")
    _put(positions, missing, Group.PADDING, image_pos[padding], "no padding-only patches")
    boxes = sample.boxes
    reason = "the sample has no object boxes" if not boxes else None
    try:
        for box in boxes:
            box.check(image_size)
    except SampleError as exc:  # a bad box fails the flows that need the boxes, not the sample
        reason = exc.reason
    if reason is not None:
        for group in (Group.RELATED, Group.OTHER, Group.OTHER_CONTENT, Group.RANDOM):
            missing[group] = reason
        return
    related = layout.related(boxes) & ~excluded
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

