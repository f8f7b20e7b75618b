"""Planted routes: the ground truth of a model whose information routes are known by construction.

A checkpoint folder may hold ``planted_routes.json`` (:data:`ROUTES_FILE`), which says in which
decoder layers each attention flow was planted. ``vlmflow validate`` scores knockouts, attention
weights and the logit lens against it; ``vlmflow demo`` shades its bands; the study report shows its
``expected`` / ``not_expected`` texts above the claims checklist. The format (version 1)::

    {
      "format": 1,
      "n_layers": 8,                                   # decoder layers of the model
      "flows": {                                       # required: the scored flows and their bands
        "question->last": [6],                         #   0-based layers where the flow is planted
        "image->last": [],                             #   [] = planted nowhere (must stay ~0)
        ...
      },
      "routes": [                                      # optional: the routes left open in training
        {"source": "image", "target": "question", "layers": [2]}, ...
      ],
      "bands": {"lower": [2], "middle": [4], "upper": [6]},   # optional: named bands, for people
      "unscored": ["last->last"],                      # optional: flows deliberately not scored
      "description": "...", "expected": "...", "not_expected": "..."   # optional texts
    }

A flow missing from ``flows`` is not scored. To plant your own: train a model whose routes you
control, write the file by hand or with :meth:`PlantedRoutes.from_routes` (which derives each flow's
band from the open routes) and :meth:`PlantedRoutes.write`, then run ``vlmflow validate --model DIR``.

>>> routes = PlantedRoutes.from_routes(
...     [Route(Group.IMAGE, Group.QUESTION, (2,)), Route(Group.RELATED, Group.QUESTION, (4,))], n_layers=8,
...     flows=[Flow.parse("image->question"), Flow.parse("other->question"), Flow.parse("image->last")])
>>> {str(f): band for f, band in routes.flows.items()}
{'image->question': (2, 4), 'other->question': (2,), 'image->last': ()}
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmflow.errors import ConfigError
from vlmflow.experiments.windows import window_layers
from vlmflow.positions.groups import Flow, Group

ROUTES_FILE = "planted_routes.json"
FORMAT = 1

#: Groups that hold other groups' positions (transitively): a flow out of ``related`` is part of a
#: route out of ``image``. Groups not related here (``related`` and ``other``) are disjoint.
_PARTS: dict[Group, frozenset[Group]] = {
    Group.IMAGE: frozenset(
        {Group.RELATED, Group.OTHER, Group.PADDING, Group.OTHER_CONTENT, Group.IMAGE_BASE, Group.IMAGE_GRID,
         Group.IMAGE_NEWLINE, Group.RANDOM}
    ),
    Group.OTHER: frozenset({Group.OTHER_CONTENT, Group.PADDING, Group.RANDOM}),
    Group.QUESTION: frozenset({Group.TRUE_OPTION, Group.FALSE_OPTION, Group.OBJECT_WORD}),
}  # fmt: skip


def groups_overlap(a: Group, b: Group) -> bool:
    """Whether two groups can share positions (equal, or one holds the other).

    >>> groups_overlap(Group.IMAGE, Group.RELATED), groups_overlap(Group.RELATED, Group.OTHER)
    (True, False)
    """
    return a == b or b in _PARTS.get(a, ()) or a in _PARTS.get(b, ())


@dataclass(frozen=True)
class Route:
    """An attention route left open in training: ``target`` positions may read ``source`` ones in ``layers``."""

    source: Group
    target: Group
    layers: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source.value, "target": self.target.value, "layers": list(self.layers)}


@dataclass(frozen=True)
class PlantedRoutes:
    """The ground truth of a planted-route model (see the module docstring for the file format).

    Attributes:
        n_layers: decoder layers of the model.
        flows: per scored flow, the sorted layers where it is planted (empty: nowhere).
        routes: the open routes the bands follow from (informative).
        bands: named bands, e.g. ``{"lower": (2,)}`` (informative).
        unscored: flows deliberately left out of the scores.
        description / expected / not_expected: what the model is, what it is and is not expected to show.
    """

    n_layers: int
    flows: Mapping[Flow, tuple[int, ...]]
    routes: tuple[Route, ...] = ()
    bands: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    unscored: tuple[Flow, ...] = ()
    description: str = ""
    expected: str = ""
    not_expected: str = ""

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise ConfigError(f"planted routes: n_layers must be >= 1, got {self.n_layers}")
        if not self.flows:
            raise ConfigError("planted routes: 'flows' names no flow to score")
        for flow, band in self.flows.items():
            bad = [layer for layer in band if not 0 <= layer < self.n_layers]
            if bad or list(band) != sorted(set(band)):
                raise ConfigError(
                    f"planted routes: the band of {flow} must be sorted, unique layers in 0..{self.n_layers - 1}, got {list(band)}"
                )

    @property
    def planted_flows(self) -> list[Flow]:
        """Scored flows with a non-empty band, in file order."""
        return [flow for flow, band in self.flows.items() if band]

    def band(self, flow: Flow | str) -> tuple[int, ...]:
        """The band of a scored flow (``KeyError`` for an unscored one)."""
        return self.flows[flow if isinstance(flow, Flow) else Flow.parse(flow)]

    @classmethod
    def from_routes(
        cls, routes: Sequence[Route], n_layers: int, flows: Iterable[Flow], **texts: Any
    ) -> PlantedRoutes:
        """Derive each flow's band from the open routes: a flow is planted in a layer when some route
        open there has a source and a target overlapping the flow's (:func:`groups_overlap`)."""
        bands = {
            flow: tuple(
                sorted(
                    {
                        layer
                        for route in routes
                        if groups_overlap(route.source, flow.source) and groups_overlap(route.target, flow.target)
                        for layer in route.layers
                    }
                )
            )
            for flow in flows
        }
        return cls(n_layers=n_layers, flows=bands, routes=tuple(routes), **texts)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "n_layers": self.n_layers,
            "flows": {str(flow): list(band) for flow, band in self.flows.items()},
            "routes": [route.to_json() for route in self.routes],
            "bands": {name: list(band) for name, band in self.bands.items()},
            "unscored": [str(flow) for flow in self.unscored],
            "description": self.description,
            "expected": self.expected,
            "not_expected": self.not_expected,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = ROUTES_FILE) -> PlantedRoutes:
        """Read the JSON object of :data:`ROUTES_FILE` (``ConfigError`` naming ``where`` if malformed)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("format", FORMAT) != FORMAT:
            raise ConfigError(f"{where}: format {data.get('format')!r} is not supported (this vlmflow reads {FORMAT})")
        try:
            flows = {Flow.parse(name): tuple(int(x) for x in band) for name, band in dict(data["flows"]).items()}
            routes = tuple(
                Route(Group.parse(r["source"]), Group.parse(r["target"]), tuple(int(x) for x in r["layers"]))
                for r in data.get("routes", [])
            )
            return cls(
                n_layers=int(data["n_layers"]),
                flows=flows,
                routes=routes,
                bands={str(k): tuple(int(x) for x in v) for k, v in dict(data.get("bands", {})).items()},
                unscored=tuple(Flow.parse(f) for f in data.get("unscored", [])),
                description=str(data.get("description", "")),
                expected=str(data.get("expected", "")),
                not_expected=str(data.get("not_expected", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: malformed planted routes ({type(exc).__name__}: {exc})") from exc

    def write(self, folder: str | Path) -> Path:
        """Write :data:`ROUTES_FILE` into a checkpoint folder; return its path."""
        path = Path(folder) / ROUTES_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


def read_planted_routes(folder: str | Path) -> PlantedRoutes | None:
    """The planted routes of a checkpoint folder, or ``None`` when it declares none.

    >>> read_planted_routes("/nonexistent") is None
    True
    """
    path = Path(folder) / ROUTES_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    return PlantedRoutes.from_json(data, where=str(path))


def touches(center: int, band: Sequence[int], window: int, n_layers: int) -> bool:
    """Whether the knockout window centred on ``center`` blocks a layer of ``band``.

    >>> [touches(c, (4,), 3, 8) for c in range(8)]
    [False, False, False, True, True, True, False, False]
    """
    return bool(set(window_layers(center, window, n_layers)) & set(band))


def routes_for_model(name: str | Path) -> PlantedRoutes | None:
    """The planted routes of a model name (an organism alias or a local folder); ``None`` when it declares none.

    >>> routes_for_model("llava-hf/llava-1.5-7b-hf") is None
    True
    """
    from vlmflow.aliases import resolve_model_name

    folder = Path(resolve_model_name(name))
    return read_planted_routes(folder) if folder.is_dir() else None


def band_names(routes: PlantedRoutes, band: Sequence[int]) -> str:
    """A band in words, by the named bands it is made of: ``"lower (2) + middle (4)"``; ``"none"`` if empty.

    >>> band_names(PlantedRoutes(8, {Flow.parse("image->last"): ()}, bands={"lower": (2,), "middle": (4,)}), (2, 4))
    'lower (2) + middle (4)'
    """
    if not band:
        return "none"
    named = [f"{name} ({', '.join(map(str, layers))})" for name, layers in routes.bands.items() if layers and set(layers) <= set(band)]
    covered = {layer for name, layers in routes.bands.items() if layers and set(layers) <= set(band) for layer in layers}
    rest = [str(layer) for layer in band if layer not in covered]
    return " + ".join(named + ([f"layers {', '.join(rest)}"] if rest else []))
