"""Study configs shipped with the package (``vlmflow/resources/studies/``).

* ``organism``: the whole study on the trained organism and synthetic scenes (CPU, a few minutes);
  the demo and the tests use it.
* ``paper``: the paper's grid (four LLaVA models x the six released GQA tasks); needs the
  checkpoints, the GQA images (``$GQA_IMAGES``) and a GPU.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from vlmflow.errors import ConfigError


def bundled_configs() -> dict[str, Path]:
    """Name -> path of every bundled study config.

    >>> sorted(bundled_configs())
    ['organism', 'paper']
    """
    folder = Path(str(resources.files("vlmflow").joinpath("resources", "studies")))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def resolve_config(name_or_path: str) -> Path:
    """An existing config file, or the bundled config of that name; :class:`ConfigError` otherwise.

    >>> resolve_config("paper").name
    'paper.yaml'
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = bundled_configs()
    if name_or_path in bundled:
        return bundled[name_or_path]
    raise ConfigError(
        f"study config {name_or_path!r} is neither a file nor a bundled config; bundled: {', '.join(sorted(bundled))}"
    )
