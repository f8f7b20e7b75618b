"""Resolve group expressions against one prepared sample: an expression in, sequence positions out.

What each form selects (``docs/routes.md`` shows them on an example):

* a named group: its positions (:class:`~vlmflow.positions.groups.PositionGroups`);
* ``text:"WORDS"`` / ``regex:"P"``: tokens whose character span (the tokenizer's offsets) overlaps
  an occurrence / match in the prompt text (exact, case-sensitive); ``#N`` the N-th occurrence;
* ``tokens:A:B``: prompt positions ``range(seq_len)[A:B]``;
* ``GROUP[i]`` / ``GROUP[A:B]``: items in sequence order (whole images for ``image``, else positions);
* ``box:X,Y,W,H``: image tokens whose patch shows a pixel of the box, through the family's own
  layout (:meth:`ImageLayout.related <vlmflow.positions.layout.ImageLayout.related>`, minus the
  tokens that are no patch, exactly as ``related`` is made from the sample's boxes);
* ``grid:[VIEW:]R,C``: image tokens in rows ``R`` and columns ``C`` of a view's patch grid
  (:meth:`ImageLayout.views <vlmflow.positions.layout.ImageLayout.views>`; default ``base``);
* ``col:NAME``: the sample's value in data column ``NAME``: boxes (``x,y,w,h`` or a JSON list)
  resolve like ``box:``, other text like ``text:``;
* ``custom:NAME``: the positions its Python callable returns for the prepared sample;
* ``|``, ``&``, ``-``: union, intersection, difference.

Strictness: a named group the sample lacks raises with the group's reason, and every other form
(text, regex, tokens, items, box, grid, column, custom) must select at least one position, so a
typo never quietly shrinks a knockout; an expression whose result is empty is an error naming it.
All are :class:`~vlmflow.errors.SampleError` (stage ``groups``): an error for that (sample, flow).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from vlmflow.data.sample import Box, Sample, parse_boxes
from vlmflow.errors import SampleError
from vlmflow.positions.expressions import (
    BoxRegion,
    Column,
    Custom,
    Difference,
    Expr,
    GridRegion,
    Intersection,
    Items,
    Regex,
    Text,
    Tokens,
    Union,
    select,
)
from vlmflow.positions.groups import Group, PositionGroups
from vlmflow.positions.layout import PlacedImage
from vlmflow.positions.text import tokens_in_span

__all__ = ["Resolver", "data_needs", "unmet_need"]


class Prepared(Protocol):
    """What resolution reads of a prepared sample (:class:`vlmflow.experiments.prepare.PreparedSample`)."""

    sample: Sample
    groups: PositionGroups
    images: tuple[PlacedImage, ...]

    @property
    def encoded(self) -> Any: ...  # text, offsets [seq, 2], seq_len


class Resolver:
    """Resolves expressions for one prepared sample (``groups``: another draw of its groups).

    ``prepared`` may be ``None`` when only ``groups`` are known: named groups, their items and
    ``tokens:`` resolve; forms that read the prompt, the images or the data raise.

    >>> Resolver(prepared).positions(parse_expression('question[0:2] | text:"red"'))   # doctest: +SKIP
    (41, 42, 47)
    >>> Resolver(None, PositionGroups(5, {Group.QUESTION: (1, 2, 3)})).positions(Items(Group.QUESTION, -1))
    (3,)
    """

    def __init__(self, prepared: Prepared | None, groups: PositionGroups | None = None) -> None:
        if prepared is None and groups is None:
            raise ValueError("a resolver needs a prepared sample or its position groups")
        self.prepared = prepared
        self.groups: PositionGroups = groups if groups is not None else prepared.groups  # type: ignore[union-attr]
        self.seq_len: int = int(prepared.encoded.seq_len) if prepared is not None else self.groups.seq_len

    def _need_prepared(self, expr: Expr) -> Prepared:
        if self.prepared is None:
            raise SampleError(f"{expr} needs the prepared sample (prompt, images, data), not only its groups", stage="groups")
        return self.prepared

    def positions(self, expr: Expr) -> tuple[int, ...]:
        """Sorted, unique positions of ``expr``; :class:`SampleError` when it selects none (or a part fails)."""
        found = self._resolve(expr)
        if not found:
            raise SampleError(f"{expr} resolves to no position for this sample", stage="groups")
        return tuple(sorted(found))

    # --- one method per form -----------------------------------------------------------------------
    def _resolve(self, expr: Expr) -> set[int]:
        if isinstance(expr, Group):
            return set(self.groups[expr])  # raises with the reason when the sample lacks it
        if isinstance(expr, Union):
            return self._resolve(expr.left) | self._resolve(expr.right)
        if isinstance(expr, Intersection):
            return self._resolve(expr.left) & self._resolve(expr.right)
        if isinstance(expr, Difference):
            return self._resolve(expr.left) - self._resolve(expr.right)
        handler = {
            Text: self._text, Regex: self._regex, Tokens: self._tokens, Items: self._items, BoxRegion: self._box,
            GridRegion: self._grid, Column: self._column, Custom: self._custom,
        }[type(expr)]
        found: set[int] = handler(expr)
        if not found:
            raise SampleError(f"{expr} selects no position for this sample", stage="groups")
        return found

    def _spans(self, expr: Expr, spans: Sequence[tuple[int, int]]) -> set[int]:
        offsets = np.asarray(self._need_prepared(expr).encoded.offsets)
        out: set[int] = set()
        for span in spans:
            out.update(tokens_in_span(offsets, span))
        return out

    def _prompt(self, expr: Expr) -> str:
        return str(self._need_prepared(expr).encoded.text)

    def _text(self, expr: Text) -> set[int]:
        spans = [(m.start(), m.end()) for m in re.finditer(re.escape(expr.words), self._prompt(expr))]
        if expr.occurrence is not None:
            if len(spans) < expr.occurrence:
                raise SampleError(
                    f"{expr}: the prompt holds {expr.words!r} {len(spans)} time(s), not {expr.occurrence}", stage="groups"
                )
            spans = [spans[expr.occurrence - 1]]
        return self._spans(expr, spans)

    def _regex(self, expr: Regex) -> set[int]:
        matches = re.finditer(expr.pattern, self._prompt(expr))
        return self._spans(expr, [(m.start(), m.end()) for m in matches if m.end() > m.start()])

    def _tokens(self, expr: Tokens) -> set[int]:
        return set(select(list(range(self.seq_len)), expr.selector))

    def _items(self, expr: Items) -> set[int]:
        if isinstance(expr.base, Group):
            items = list(self.groups.items(expr.base))
        else:
            items = [(p,) for p in sorted(self._resolve(expr.base))]
        return {p for item in select(items, expr.selector) for p in item}

    def _images(self, expr: Expr) -> tuple[PlacedImage, ...]:
        images = tuple(i for i in self._need_prepared(expr).images if i.layout is not None)
        if not images:
            raise SampleError(f"{expr}: this family maps no image tokens to patches", stage="groups")
        return images

    def _box(self, expr: BoxRegion) -> set[int]:
        return self._boxes(expr, (Box(expr.x, expr.y, expr.w, expr.h),))

    def _boxes(self, expr: Expr, boxes: tuple[Box, ...]) -> set[int]:
        out: set[int] = set()
        for image in self._images(expr):
            layout = image.layout
            assert layout is not None
            for box in boxes:
                box.check(image.size)
            related = layout.related(boxes)
            if layout.excluded_from_other is not None:  # tokens that are no patch (newlines), as for `related`
                related &= ~np.asarray(layout.excluded_from_other, dtype=bool)
            out.update(np.asarray(image.positions)[related].tolist())
        return out

    def _grid(self, expr: GridRegion) -> set[int]:
        out: set[int] = set()
        for image in self._images(expr):
            assert image.layout is not None
            views = image.layout.views()
            name = expr.view or "base"
            if name not in views:
                valid = ", ".join(views) or "none (this family describes no patch grid)"
                raise SampleError(f"{expr}: no view {name!r} in this image; views: {valid}", stage="groups")
            grid = views[name]
            rows = select(list(range(grid.shape[0])), expr.rows)
            cols = select(list(range(grid.shape[1])), expr.cols)
            picked = grid[np.ix_(rows, cols)].reshape(-1)
            out.update(np.asarray(image.positions)[picked].tolist())
        return out

    def _column(self, expr: Column) -> set[int]:
        value = self._need_prepared(expr).sample.column(expr.name)
        if value is None or not value.strip():
            raise SampleError(f"{expr}: the sample has no value in column {expr.name!r}", stage="groups")
        boxes = parse_boxes(value)
        if boxes is not None:
            return self._boxes(expr, boxes)
        return self._text(Text(value.strip()))  # a phrase: as text:"VALUE"

    def _custom(self, expr: Custom) -> set[int]:
        if expr.function is None:
            raise SampleError(f"{expr} has no function here; give the callable in Python", stage="groups")
        prepared = self._need_prepared(expr)
        try:
            values = [int(v) for v in expr.function(prepared)]
        except (TypeError, ValueError) as exc:
            raise SampleError(f"{expr} did not return integer positions: {exc}", stage="groups") from exc
        bad = [v for v in values if not 0 <= v < self.seq_len]
        if bad:
            raise SampleError(f"{expr} returned positions {bad[:5]} outside the sequence 0..{self.seq_len - 1}", stage="groups")
        return set(values)


# --- what an expression needs from the data (checked before any model is loaded) --------------------

#: Sample fields the named groups need: group -> (what, test).
_GROUP_NEEDS: dict[Group, tuple[str, Any]] = {
    Group.TRUE_OPTION: ("a true option", lambda s: bool(s.true_option)),
    Group.FALSE_OPTION: ("a false option", lambda s: bool(s.false_option)),
    Group.OBJECT_WORD: ("an object name", lambda s: bool(s.object_name)),
}
_BOXES = ("object boxes", lambda s: bool(s.boxes))
for _group in (
    Group.RELATED, Group.OTHER, Group.OTHER_CONTENT, Group.RANDOM, Group.RELATED_IN_GRID,
    Group.GRID_WITHOUT_RELATED, Group.OTHER_WITH_NEWLINES,
):
    _GROUP_NEEDS[_group] = _BOXES


def data_needs(expr: Expr) -> list[tuple[str, Any]]:
    """What ``expr`` needs from a sample's data: ``(what, test(sample) -> bool)`` pairs.

    >>> from vlmflow.positions.expressions import parse_expression
    >>> [what for what, _ in data_needs(parse_expression("true_option | col:objects"))]
    ['a true option', "a value in column 'objects'"]
    """
    if isinstance(expr, Group):
        return [_GROUP_NEEDS[expr]] if expr in _GROUP_NEEDS else []
    if isinstance(expr, Union | Intersection | Difference):
        return data_needs(expr.left) + data_needs(expr.right)
    if isinstance(expr, Items):
        return data_needs(expr.base)
    if isinstance(expr, Column):
        name = expr.name
        return [(f"a value in column {name!r}", lambda s: bool((s.column(name) or "").strip()))]
    return []


def unmet_need(expr: Expr, sample: Sample) -> str | None:
    """What ``sample``'s data lacks for ``expr`` (``None``: nothing it can tell without the model)."""
    for what, test in data_needs(expr):
        if not test(sample):
            return what
    return None
