"""Group expressions: which positions of a sample a route names, as typed values parsed once.

The grammar (``docs/routes.md`` has one example per form)::

    expr    := inter ('|' inter)*               union
    inter   := diff ('&' diff)*                 intersection
    diff    := postfix ('-' postfix)*           difference (binds tightest, as in Python)
    postfix := atom ('[' index ']')*            items of a group in sequence order
    atom    := NAME | '(' expr ')'              a named group (Group)
             | 'text:' STRING ['#' INT]          tokens overlapping WORDS in the prompt (the N-th occurrence)
             | 'regex:' STRING                   tokens overlapping a match of PATTERN
             | 'tokens:' index                   sequence positions (Python slice, negative from the end)
             | 'box:' NUM ',' NUM ',' NUM ',' NUM    image tokens showing a box (x, y, w, h pixels)
             | 'grid:' [VIEW ':'] index ',' index    patch-grid rows and columns of a view
             | 'col:' (NAME | STRING)             the phrase or box in a data column
             | 'custom:' NAME                     a Python callable (given in Python; named in results)
    index   := INT | [INT] ':' [INT]            (INT may be negative)

Each form is a frozen dataclass (a named group is the :class:`~vlmflow.positions.groups.Group`
itself); ``str()`` of any expression is its canonical text and parses back to an equal value.
Resolution against a sample lives in :mod:`vlmflow.positions.resolve`; routes and flows built from
expressions in :mod:`vlmflow.positions.routes`. A parse error names the character where it went
wrong (1-based), what was found there and what was expected.

>>> parse_expression('(question - true_option) | text:"red"#2')
Union(left=Difference(left=<Group.QUESTION: 'question'>, right=<Group.TRUE_OPTION: 'true_option'>), right=Text(words='red', occurrence=2))
>>> str(parse_expression("question[0:2] | image[-1]"))
'question[0:2] | image[-1]'
>>> parse_expression("qestion")
Traceback (most recent call last):
...
vlmflow.errors.ConfigError: group expression 'qestion': unknown position group 'qestion' at character 1; expected one of: image, question, last, related, other, padding, other_content, image_base, image_grid, image_newline, true_option, false_option, object_word, system, suffix, random, frame, tile, question_without_options, related_in_grid, grid_without_related, grid_with_newlines, other_with_newlines, or a form such as text:"WORDS" (docs/routes.md)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vlmflow.errors import ConfigError
from vlmflow.positions.groups import Group

__all__ = [
    "BoxRegion",
    "Column",
    "Custom",
    "Difference",
    "Expr",
    "GridRegion",
    "Intersection",
    "Items",
    "Regex",
    "Slice",
    "Text",
    "Tokens",
    "Union",
    "parse_expression",
]


@dataclass(frozen=True)
class Slice:
    """A Python slice ``start:stop`` (``None``: open end; negative: from the end).

    >>> str(Slice(None, -1)), list(range(5))[Slice(1, None).python]
    (':-1', [1, 2, 3, 4])
    """

    start: int | None
    stop: int | None

    @property
    def python(self) -> slice:
        return slice(self.start, self.stop)

    def __str__(self) -> str:
        return f"{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}"


#: An index of items: one item (``int``, negative from the end) or a slice.
Selector = int | Slice


def select(items: list[Any], selector: Selector) -> list[Any]:
    """The items ``selector`` picks, in order (an index out of range picks nothing).

    >>> select([10, 20, 30], -1), select([10, 20, 30], Slice(0, 2)), select([10], 3)
    ([30], [10, 20], [])
    """
    if isinstance(selector, Slice):
        return items[selector.python]
    return [items[selector]] if -len(items) <= selector < len(items) else []


@dataclass(frozen=True)
class Text:
    """Tokens whose characters overlap an occurrence of ``words`` in the prompt text (exact, case-sensitive);
    ``occurrence``: only the N-th occurrence (from 1)."""

    words: str
    occurrence: int | None = None

    def __str__(self) -> str:
        return f"text:{_quote(self.words)}" + (f"#{self.occurrence}" if self.occurrence is not None else "")


@dataclass(frozen=True)
class Regex:
    """Tokens whose characters overlap a match of ``pattern`` (Python ``re``) in the prompt text."""

    pattern: str

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ConfigError(f"regex {self.pattern!r} does not compile: {exc}") from None

    def __str__(self) -> str:
        return f"regex:{_quote(self.pattern)}"


@dataclass(frozen=True)
class Tokens:
    """Sequence positions of the prompt: one (``tokens:-1``) or a Python slice (``tokens:5:9``)."""

    selector: Selector

    def __str__(self) -> str:
        return f"tokens:{self.selector}"


@dataclass(frozen=True)
class Items:
    """Items of ``base`` in sequence order: for ``image``/``frame`` an item is a whole image/frame,
    otherwise a position (``question[0:2]`` = the first two question tokens)."""

    base: Expr
    selector: Selector

    def __str__(self) -> str:
        return f"{_wrap(self.base, _POSTFIX)}[{self.selector}]"


@dataclass(frozen=True)
class BoxRegion:
    """Image tokens whose patch shows a pixel of the box ``x, y, w, h`` (original-image pixels),
    mapped through the family's own geometry, as ``related`` maps a sample's boxes."""

    x: float
    y: float
    w: float
    h: float

    def __str__(self) -> str:
        return "box:" + ",".join(_number(v) for v in (self.x, self.y, self.w, self.h))


@dataclass(frozen=True)
class GridRegion:
    """Image tokens in rows ``rows`` and columns ``cols`` of a view's patch grid (``view`` ``None``:
    the base view, see :meth:`vlmflow.positions.layout.ImageLayout.views`)."""

    rows: Selector
    cols: Selector
    view: str | None = None

    def __str__(self) -> str:
        return "grid:" + (f"{self.view}:" if self.view else "") + f"{self.rows},{self.cols}"


@dataclass(frozen=True)
class Column:
    """The value of data column ``name`` for the sample: a box (``x,y,w,h`` or a JSON list of boxes)
    selects image tokens like ``box:``; any other text selects tokens like ``text:``."""

    name: str

    def __str__(self) -> str:
        return f"col:{self.name if _IDENT.fullmatch(self.name) else _quote(self.name)}"


@dataclass(frozen=True)
class Custom:
    """Positions computed by a Python callable from a prepared sample (``function(prepared)`` -> ints).

    Only Python code can give the callable; text names it (``custom:NAME``), e.g. in a result's
    ``flow`` column, where it reads back without its function.
    """

    name: str
    function: Callable[[Any], Any] | None = field(default=None, compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, function: Callable[[Any], Any]) -> Custom:
        """Wrap a callable, named by its module and qualified name.

        >>> Custom.of(len).name
        'builtins.len'
        """
        name = f"{getattr(function, '__module__', None) or 'custom'}.{getattr(function, '__qualname__', type(function).__name__)}"
        return cls(re.sub(r"[^A-Za-z0-9_.]", "_", name), function)

    def __str__(self) -> str:
        return f"custom:{self.name}"


@dataclass(frozen=True)
class Union:
    left: Expr
    right: Expr

    def __str__(self) -> str:
        return f"{_wrap(self.left, _UNION)} | {_wrap(self.right, _UNION + 1)}"


@dataclass(frozen=True)
class Intersection:
    left: Expr
    right: Expr

    def __str__(self) -> str:
        return f"{_wrap(self.left, _INTER)} & {_wrap(self.right, _INTER + 1)}"


@dataclass(frozen=True)
class Difference:
    left: Expr
    right: Expr

    def __str__(self) -> str:
        return f"{_wrap(self.left, _DIFF)} - {_wrap(self.right, _DIFF + 1)}"


#: A group expression.
Expr = Group | Text | Regex | Tokens | Items | BoxRegion | GridRegion | Column | Custom | Union | Intersection | Difference
EXPR_TYPES: tuple[type, ...] = (
    Group, Text, Regex, Tokens, Items, BoxRegion, GridRegion, Column, Custom, Union, Intersection, Difference,
)

_UNION, _INTER, _DIFF, _POSTFIX = 1, 2, 3, 4
_PRECEDENCE = {Union: _UNION, Intersection: _INTER, Difference: _DIFF}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _wrap(expr: Expr, least: int) -> str:
    """``str(expr)``, in parentheses when it binds less tightly than ``least``."""
    return f"({expr})" if _PRECEDENCE.get(type(expr), _POSTFIX + 1) < least else str(expr)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def as_expression(value: Any) -> Expr:
    """An expression from an expression, a string (parsed) or a callable (:meth:`Custom.of`).

    >>> as_expression("last"), as_expression(Group.IMAGE)
    (<Group.LAST: 'last'>, <Group.IMAGE: 'image'>)
    """
    if isinstance(value, EXPR_TYPES):
        return value
    if isinstance(value, str):
        return parse_expression(value)
    if callable(value):
        return Custom.of(value)
    raise ConfigError(f"expected a group expression (text, Group or callable), got {value!r}")


def parse_expression(text: str) -> Expr:
    """Parse a group expression (see the module docstring).

    >>> parse_expression("tokens:-3:")
    Tokens(selector=Slice(start=-3, stop=None))
    """
    from vlmflow.positions.grammar import ExprParser  # the parser builds these types

    parser = ExprParser(text, "group expression")
    expr = parser.expression()
    parser.expect_end()
    return expr
