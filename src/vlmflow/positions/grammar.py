"""Lexing and parsing of group expressions and routes (the grammar is in
:mod:`vlmflow.positions.expressions`; routes extend it in :mod:`vlmflow.positions.routes`).

A parse error names the character where it went wrong (1-based), what was found there and what was
expected.

>>> parser = ExprParser("question[0:2] | last", "group expression")
>>> parser.expression()
Union(left=Items(base=<Group.QUESTION: 'question'>, selector=Slice(start=0, stop=2)), right=<Group.LAST: 'last'>)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vlmflow.errors import ConfigError
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
    Selector,
    Slice,
    Text,
    Tokens,
    Union,
)
from vlmflow.positions.groups import Group

__all__ = ["ExprParser", "Tok", "lex"]

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
