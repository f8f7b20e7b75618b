"""Routes and flows: what one knockout blocks, as typed values parsed once.

A :class:`Route` ``SRC->TGT`` is information moving from the positions of expression ``SRC`` to
those of ``TGT``; *knocking it out* means the target positions (attention query rows) may not
attend to the source positions (key columns). ``SRC<->TGT`` is both directions.

A :class:`Flow` is what one knockout blocks and one ``flow`` value of the result tables names:
one or more routes knocked out together (``a->b+c->d``), in **knockout** mode (the routes' edges
are blocked) or **keep-only** mode (``keep-only:...``: the target rows may read only the route's
sources and the target positions, every other key is blocked; see :mod:`vlmflow.experiments.routes`
for the exact edges), in a sweep of layer windows or a fixed layer range (``...@A-B``, inclusive).
Grammar::

    flow   := ['keep-only:' | 'knockout:'] route ('+' route)* ['@' INT '-' INT]
    route  := expr ('->' | '<->') expr          (expr: vlmflow.positions.expressions)

``str(flow)`` is its canonical text (what the ``flow`` column stores) and parses back to an equal
flow; :func:`vlmflow.results.tables.flows_of` is where the column is read back.

>>> f = Flow.parse("image->question")
>>> f.source, f.target
(<Group.IMAGE: 'image'>, <Group.QUESTION: 'question'>)
>>> str(f), f.label
('image->question', 'image ↛ question')
>>> str(Flow.parse("keep-only: (related|question) -> last + image<->question @2-5"))
'keep-only:(related | question)->last+image<->question@2-5'
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from vlmflow.errors import ConfigError
from vlmflow.positions.expressions import Difference, Expr, Intersection, Union, as_expression
from vlmflow.positions.grammar import ExprParser
from vlmflow.positions.groups import Group

__all__ = ["PAPER_FLOWS", "Flow", "Route", "parse_route"]

KEEP_ONLY = "keep-only"
_MODES = {"keep-only": True, "keep_only": True, "knockout": False}


@dataclass(frozen=True)
class Route:
    """``source->target`` (``both``: ``source<->target``, i.e. also ``target->source``).

    >>> [str(d) for d in Route(Group.IMAGE, Group.QUESTION, both=True).directed()]
    ['image->question', 'question->image']
    """

    source: Expr
    target: Expr
    both: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", as_expression(self.source))
        object.__setattr__(self, "target", as_expression(self.target))

    def directed(self) -> tuple[Route, ...]:
        """The one-directional routes this route stands for (two for ``<->``)."""
        if not self.both:
            return (self,)
        return (Route(self.source, self.target), Route(self.target, self.source))

    def __str__(self) -> str:
        return f"{_side(self.source)}{'<->' if self.both else '->'}{_side(self.target)}"

    @property
    def label(self) -> str:
        return f"{_side(self.source)} {'↮' if self.both else '↛'} {_side(self.target)}"


@dataclass(frozen=True, repr=False)
class Flow:
    """What one knockout blocks: routes, a mode and the layers (see the module docstring).

    The first route is ``source``/``target``/``both`` (so ``Flow(Group.IMAGE, Group.LAST)`` is the
    paper's ``image->last``); ``also`` holds the routes knocked out together with it.

    Attributes:
        source / target: the first route's expressions (a :class:`Group`, text, or any expression;
            strings are parsed, a callable becomes a :class:`~vlmflow.positions.expressions.Custom`).
        both: the first route goes both ways (``<->``).
        also: further routes blocked in the same knockout (``a->b+c->d``).
        keep_only: keep-only mode instead of knockout.
        layers: a fixed inclusive layer range ``(A, B)`` (``@A-B``): one knockout, no sweep.

    >>> Flow(Group.IMAGE, Group.LAST) == Flow.parse("image->last")
    True
    >>> Flow.parse("question->last@3-1")
    Traceback (most recent call last):
    ...
    vlmflow.errors.ConfigError: flow 'question->last@3-1': layer range 3-1 ends before it starts at character 16; expected @A-B with A <= B (inclusive, 0-based)
    """

    source: Expr
    target: Expr
    both: bool = False
    also: tuple[Route, ...] = ()
    keep_only: bool = False
    layers: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", as_expression(self.source))
        object.__setattr__(self, "target", as_expression(self.target))
        object.__setattr__(self, "also", tuple(r if isinstance(r, Route) else parse_route(str(r)) for r in self.also))
        if self.layers is not None:
            a, b = (int(v) for v in self.layers)
            if not 0 <= a <= b:
                raise ConfigError(f"layer range {a}-{b} of flow {self} must satisfy 0 <= A <= B (inclusive, 0-based)")
            object.__setattr__(self, "layers", (a, b))

    @property
    def routes(self) -> tuple[Route, ...]:
        """Every route of the flow, the first one first."""
        return (Route(self.source, self.target, self.both), *self.also)

    def directed(self) -> Iterator[Route]:
        """Every one-directional route (``<->`` routes split in two), in order."""
        for route in self.routes:
            yield from route.directed()

    @property
    def is_simple(self) -> bool:
        """One one-directional route in knockout mode, swept over windows (the paper's kind of flow)."""
        return not self.both and not self.also and not self.keep_only and self.layers is None

    def with_mode(self, keep_only: bool) -> Flow:
        """The same routes in keep-only (``True``) or knockout mode."""
        return replace(self, keep_only=keep_only)

    def __repr__(self) -> str:
        return f"Flow.parse({str(self)!r})"

    def __str__(self) -> str:
        text = "+".join(str(r) for r in self.routes)
        if self.layers is not None:
            text += f"@{self.layers[0]}-{self.layers[1]}"
        return f"{KEEP_ONLY}:{text}" if self.keep_only else text

    @property
    def label(self) -> str:
        """Human-readable label: the paper's "does not flow to" arrow; "only" for keep-only."""
        text = " + ".join(r.label for r in self.routes)
        if self.keep_only:
            text = "only " + text.replace("↛", "→").replace("↮", "↔")
        if self.layers is not None:
            text += f" @ layers {self.layers[0]}-{self.layers[1]}"
        return text

    @classmethod
    def parse(cls, text: str) -> Flow:
        """Parse a flow (see the module docstring). Used at the edges only: the CLI, configs, and
        reading a ``flow`` column back (:func:`vlmflow.results.tables.flows_of`)."""
        if not isinstance(text, str):
            raise ConfigError(f"expected a flow written 'source->target' (e.g. 'image->last'), got {text!r}")
        return _FlowParser(text).flow()

    @classmethod
    def from_config(cls, entry: Mapping[str, Any]) -> Flow:
        """A flow written as a mapping in a study config: ``route`` (one or more routes, text), and
        optionally ``mode`` (``knockout`` or ``keep-only``) and ``layers`` (``[A, B]``, inclusive).

        >>> str(Flow.from_config({"route": "image->question", "mode": "keep-only", "layers": [2, 5]}))
        'keep-only:image->question@2-5'
        """
        unknown = sorted(set(entry) - {"route", "mode", "layers"})
        if unknown or "route" not in entry:
            raise ConfigError(f"a flow mapping takes route (required), mode and layers; got keys {sorted(entry)}")
        flow = cls.parse(str(entry["route"]))
        mode = str(entry.get("mode", KEEP_ONLY if flow.keep_only else "knockout")).strip().lower()
        if mode not in _MODES:
            raise ConfigError(f"unknown mode {entry['mode']!r}; valid: knockout, keep-only")
        layers = entry.get("layers", flow.layers)
        if layers is not None:
            if isinstance(layers, str) or len(layers) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers):
                raise ConfigError(f"layers must be [A, B] (two integers, inclusive), got {layers!r}")
            layers = (layers[0], layers[1])
        return replace(flow, keep_only=_MODES[mode], layers=layers)

    @classmethod
    def of(cls, value: Any) -> Flow:
        """A flow from a :class:`Flow`, its text, or a ``(source, target)`` pair of expressions.

        >>> str(Flow.of(("question", "last")))
        'question->last'
        """
        if isinstance(value, Flow):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, tuple) and len(value) == 2:
            return cls(value[0], value[1])
        raise ConfigError(f"expected a flow ('source->target', a Flow or a (source, target) pair), got {value!r}")


def _side(expr: Expr) -> str:
    """An expression as one side of a route: set operations in parentheses, for the reader."""
    return f"({expr})" if isinstance(expr, Union | Intersection | Difference) else str(expr)


def parse_route(text: str) -> Route:
    """Parse one route ``SRC->TGT`` or ``SRC<->TGT``.

    >>> parse_route("image<->question").both
    True
    """
    parser = _FlowParser(text, "route")
    route = parser.route()
    parser.expect_end()
    return route


class _FlowParser(ExprParser):
    def __init__(self, text: str, what: str = "flow") -> None:
        self.keep_only = False
        body_at = 0
        head, sep, _ = text.partition(":")
        if sep and head.strip().lower() in _MODES:
            self.keep_only = _MODES[head.strip().lower()]
            body_at = len(head) + 1
        super().__init__(text, what)
        # Skip the mode prefix: tokens before body_at belong to it.
        while self.tokens[self.i].at < body_at and self.tokens[self.i].kind != "end":
            self.i += 1

    def flow(self) -> Flow:
        routes = [self.route()]
        while self.at("+"):
            self.take()
            routes.append(self.route())
        layers = None
        if self.at("@"):
            self.take()
            start_tok = self.tok
            a = self.integer("the first layer A of @A-B")
            self.expect("-", "'-' and the last layer B of @A-B")
            b = self.integer("the last layer B of @A-B")
            if a > b or a < 0:
                raise self.fail("@A-B with A <= B (inclusive, 0-based)", start_tok,
                                f"layer range {a}-{b} ends before it starts at character {start_tok.at + 1}"
                                if a > b else f"layer {a} is negative at character {start_tok.at + 1}")
            layers = (a, b)
        if not self.at("@") and self.tok.kind != "end":
            raise self.fail("the end, '+' and another route, or '@A-B' (a fixed layer range)")
        first = routes[0]
        return Flow(first.source, first.target, first.both, tuple(routes[1:]), self.keep_only, layers)

    def route(self) -> Route:
        source = self.expression()
        if self.tok.kind != "arrow":
            raise self.fail("'->' or '<->' between the source and the target (e.g. image->last)")
        both = self.take().text == "<->"
        return Route(source, self.expression(), both)


#: The six flows of the paper, in the order of its figures.
PAPER_FLOWS: tuple[Flow, ...] = (
    Flow(Group.QUESTION, Group.LAST),
    Flow(Group.IMAGE, Group.LAST),
    Flow(Group.LAST, Group.LAST),
    Flow(Group.IMAGE, Group.QUESTION),
    Flow(Group.RELATED, Group.QUESTION),
    Flow(Group.OTHER, Group.QUESTION),
)
