"""Model families vlmflow refuses, each with the reason a knockout there would not be exact.

They are registered like the other families so that loading one fails at once with the reason (rather than
"no adapter"), and ``vlmflow models`` lists them. Asking for one raises
:class:`~vlmflow.errors.UnsupportedModelError`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from vlmflow.adapters.family import ModelFamily
from vlmflow.adapters.registry import register_family
from vlmflow.errors import UnsupportedModelError


class RefusedFamily(ModelFamily):
    """A family vlmflow knows but cannot analyse correctly; instantiating it raises the reason.

    >>> from vlmflow.adapters.registry import family_for_architecture
    >>> family_for_architecture("MllamaForConditionalGeneration")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    vlmflow.errors.UnsupportedModelError: MllamaForConditionalGeneration is not supported: images enter ...
    """

    refused: ClassVar[str] = ""
    default_template = ""
    several_images = False

    def __new__(cls, *args: Any, **kwargs: Any) -> RefusedFamily:
        raise UnsupportedModelError(f"{cls.architectures[0]} is not supported: {cls.refused}")


def _refuse(family: str, architectures: tuple[str, ...], reason: str) -> type[RefusedFamily]:
    cls = type(
        f"Refused_{family}",
        (RefusedFamily,),
        {"family": family, "architectures": architectures, "refused": reason, "description": f"refused: {reason}"},
    )
    return register_family(cls)


_refuse(
    "mllama",
    ("MllamaForConditionalGeneration",),
    "images enter through cross-attention layers, so the self-attention sequence has no image positions and "
    "image->question / image->last are not attention edges that can be knocked out",
)
_refuse(
    "gemma3n",
    ("Gemma3nForConditionalGeneration",),
    "its decoder layers take per-layer inputs and AltUp prediction streams that vlmflow's layer-by-layer "
    "recomputation does not supply",
)
_refuse(
    "llama4",
    ("Llama4ForConditionalGeneration",),
    "chunked local attention and no-RoPE layers are not reproduced by vlmflow's attention masks (not verified)",
)
