"""What each shipped organism is, and what it is and is not expected to show (the study report's banner).

A checkpoint that declares planted routes speaks for itself (the ``description``, ``expected`` and
``not_expected`` texts of its ``planted_routes.json``); the plain organism, trained for accuracy only,
gets the texts below.

>>> expectation_for("llava-hf/llava-1.5-7b-hf") is None
True
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlmflow.aliases import resolve_model_name
from vlmflow.errors import ConfigError
from vlmflow.organism import ALIAS, organism_path
from vlmflow.validation.routes import routes_for_model


@dataclass(frozen=True)
class Expectation:
    """What a model is (``what``), what it is expected to show, and what not."""

    what: str
    expected: str
    not_expected: str


#: The plain organism: its routes are whatever training for accuracy found.
PLAIN_ORGANISM = Expectation(
    what="plain organism: a 6-layer LLaVA trained for accuracy only; its routes are whatever training found, not planted",
    expected=(
        "a correct baseline, and knockout effects where its own mechanism puts them: object information moves from the "
        "image into the question words in its first layers and the last position reads the question, so with a "
        "one-layer window most flows peak at the lowest layers"
    ),
    not_expected=(
        "the paper's staged story (two image->question dips, related patches in the middle layers, question->last in "
        "the middle or upper layers): most depth claims of the checklist are expected not to hold for it, and that "
        "says nothing about the method"
    ),
)


def expectation_for(model: str | Path) -> Expectation | None:
    """The expectations of a model name (an organism alias or a checkpoint folder), ``None`` when unknown."""
    try:
        routes = routes_for_model(model)
        folder = Path(resolve_model_name(model))
    except ConfigError:
        return None
    if routes is not None:
        return Expectation(routes.description, routes.expected, routes.not_expected)
    if folder.is_dir() and folder.resolve() == organism_path(ALIAS).resolve():
        return PLAIN_ORGANISM
    return None
