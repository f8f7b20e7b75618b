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
vlmflow.errors.ConfigError: group expression 'qestion': unknown position group 'qestion' at character 1; expected one of: image, question, last, related, other, padding, other_content, image_base, image_grid, image_newline, true_option, false_option, object_word, system, suffix, random, question_without_options, related_in_grid, grid_without_related, grid_with_newlines, other_with_newlines, or a form such as text:"WORDS" (docs/routes.md)
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
    "ExprParser",
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
    parser = ExprParser(text, "group expression")
    expr = parser.expression()
    parser.expect_end()
    return expr


# --- lexing and parsing --------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<arrow><->|->)
    | (?P<number>\d+(?:\.\d+)?)
    | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<punct>[-|&()\[\]:,#@+])
    )""",
    re.VERBOSE,
)
_KEYWORDS = ("text", "regex", "tokens", "box", "grid", "col", "custom")


@dataclass(frozen=True)
class Tok:
    kind: str  # arrow, number, name, string, punct, end
    text: str
    at: int  # 0-based character offset in the parsed string


def lex(text: str) -> list[Tok]:
    """The tokens of ``text``; a character no token starts with is an error naming it."""
    out: list[Tok] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            out.append(Tok("end", "", len(text)))
            return out
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            if text[pos] in "\"'":
                raise _error(text, pos, f"unterminated string starting at character {pos + 1}", f"a closing {text[pos]}")
            raise _error(text, pos, f"unexpected character {text[pos]!r} at character {pos + 1}", "a group, ( or a form such as text:\"WORDS\"")
        kind = match.lastgroup or ""
        out.append(Tok(kind, match.group(kind), match.start(kind)))
        pos = match.end()


def _error(text: str, at: int, problem: str, expected: str, what: str = "group expression") -> ConfigError:
    return ConfigError(f"{what} {text!r}: {problem}; expected {expected}")


class ExprParser:
    """Recursive-descent parser of group expressions over :func:`lex` tokens (subclassed for routes)."""

    def __init__(self, text: str, what: str) -> None:
        self.text, self.what = text, what
        self.tokens = lex(text)
        self.i = 0

    # --- token access --------------------------------------------------------------------------
    @property
    def tok(self) -> Tok:
        return self.tokens[self.i]

    def take(self) -> Tok:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def at(self, text: str) -> bool:
        return self.tok.kind in ("punct", "arrow") and self.tok.text == text

    def fail(self, expected: str, tok: Tok | None = None, problem: str | None = None) -> ConfigError:
        tok = tok or self.tok
        found = "the end" if tok.kind == "end" else repr(tok.text)
        return _error(self.text, tok.at, problem or f"found {found} at character {tok.at + 1}", expected, self.what)

    def expect(self, text: str, expected: str | None = None) -> Tok:
        if not self.at(text):
            raise self.fail(expected or repr(text))
        return self.take()

    def expect_end(self) -> None:
        if self.tok.kind != "end":
            raise self.fail("the end, or an operator | & -")

    # --- grammar ---------------------------------------------------------------------------------
    def expression(self) -> Expr:
        expr = self._inter()
        while self.at("|"):
            self.take()
            expr = Union(expr, self._inter())
        return expr

    def _inter(self) -> Expr:
        expr = self._diff()
        while self.at("&"):
            self.take()
            expr = Intersection(expr, self._diff())
        return expr

    def _diff(self) -> Expr:
        expr = self._postfix()
        while self.at("-"):
            self.take()
            expr = Difference(expr, self._postfix())
        return expr

    def _postfix(self) -> Expr:
        expr = self._atom()
        while self.at("["):
            self.take()
            selector = self.selector()
            self.expect("]", "']' closing the index")
            expr = Items(expr, selector)
        return expr

    def _atom(self) -> Expr:
        tok = self.tok
        if self.at("("):
            self.take()
            expr = self.expression()
            self.expect(")", "')' closing the parenthesis")
            return expr
        if tok.kind != "name":
            raise self.fail("a group name, ( or a form such as text:\"WORDS\"")
        self.take()
        keyword = tok.text.lower()
        if keyword in _KEYWORDS and self.at(":"):
            self.take()
            return getattr(self, f"_{keyword}")()
        if keyword in _KEYWORDS:
            raise self.fail(f"':' after {keyword}")
        return self._group(tok)

    def _group(self, tok: Tok) -> Group:
        try:
            return Group(tok.text.lower())
        except ValueError:
            pass
        hint = ""
        before = self.tokens[self.i - 3 : self.i - 1] if self.i >= 3 else []  # NAME '-' before it (other-content)
        after = self.tokens[self.i : self.i + 2]  # '-' NAME after it
        candidates = []
        if len(before) == 2 and before[0].kind == "name" and before[1].text == "-":
            candidates.append(f"{before[0].text}_{tok.text}".lower())
        if len(after) == 2 and after[0].text == "-" and after[1].kind == "name":
            candidates.append(f"{tok.text}_{after[1].text}".lower())
        joined = next((c for c in candidates if c in {g.value for g in Group}), None)
        if joined:
            hint = f" (names are written with '_': {joined}; '-' is the difference)"
        valid = ", ".join(g.value for g in Group)
        raise _error(
            self.text, tok.at, f"unknown position group {tok.text!r} at character {tok.at + 1}{hint}",
            f"one of: {valid}, or a form such as text:\"WORDS\" (docs/routes.md)", self.what,
        )

    def _text(self) -> Text:
        words = self.string("the words in quotes, e.g. text:\"red\"")
        if not words:
            raise self.fail("non-empty words", self.tokens[self.i - 1], "text:\"\" is empty")
        occurrence = None
        if self.at("#"):
            self.take()
            tok = self.tok
            occurrence = self.integer("the occurrence number N (from 1) after #")
            if occurrence < 1:
                raise self.fail("an occurrence from 1", tok, f"occurrence #{occurrence} at character {tok.at + 1}")
        return Text(words, occurrence)

    def _regex(self) -> Regex:
        tok = self.tok
        pattern = self.string("the pattern in quotes, e.g. regex:\"colou?r\"")
        try:
            return Regex(pattern)
        except ConfigError as exc:
            raise self.fail("a valid Python regular expression", tok, f"{exc} at character {tok.at + 1}") from None

    def _tokens(self) -> Tokens:
        return Tokens(self.selector())

    def _box(self) -> BoxRegion:
        values = [self.number("the box x (pixels)")]
        for name in ("y", "w", "h"):
            self.expect(",", f"',' and the box {name} (box:X,Y,W,H)")
            values.append(self.number(f"the box {name} (pixels)"))
        return BoxRegion(*values)

    def _grid(self) -> GridRegion:
        view = None
        if self.tok.kind == "name":
            view = self.take().text.lower()
            self.expect(":", "':' after the view name (grid:VIEW:R0:R1,C0:C1)")
        rows = self.selector()
        self.expect(",", "',' and the columns (grid:R0:R1,C0:C1)")
        return GridRegion(rows, self.selector(), view)

    def _col(self) -> Column:
        if self.tok.kind == "name":
            return Column(self.take().text)
        return Column(self.string("a column name (col:NAME or col:\"NAME WITH SPACES\")"))

    def _custom(self) -> Custom:
        return Custom(self._name("the callable's name (custom:module.function)"))

    # --- pieces ------------------------------------------------------------------------------------
    def _name(self, expected: str) -> str:
        if self.tok.kind != "name":
            raise self.fail(expected)
        return self.take().text

    def string(self, expected: str) -> str:
        tok = self.tok
        if tok.kind != "string":
            raise self.fail(expected)
        self.take()
        body = tok.text[1:-1]
        return re.sub(r"\\([\\\"'])", r"\1", body)

    def integer(self, expected: str) -> int:
        sign = -1 if self.at("-") else 1
        if sign < 0:
            self.take()
        tok = self.tok
        if tok.kind != "number" or "." in tok.text:
            raise self.fail(expected)
        self.take()
        return sign * int(tok.text)

    def number(self, expected: str) -> float:
        tok = self.tok
        if tok.kind != "number":
            raise self.fail(expected)
        self.take()
        value = float(tok.text)
        return int(value) if value.is_integer() else value

    def _optional_integer(self) -> int | None:
        if self.tok.kind == "number" or (self.at("-") and self.tokens[self.i + 1].kind == "number"):
            return self.integer("an integer")
        return None

    def selector(self) -> Selector:
        """``INT`` or ``[INT]:[INT]`` (a Python index or slice)."""
        start = self._optional_integer()
        if not self.at(":"):
            if start is None:
                raise self.fail("an index such as 0, -1 or a slice such as 0:2")
            return start
        self.take()
        return Slice(start, self._optional_integer())
