"""vlmflow: how information moves between image and text inside multimodal LLMs.

Attention knockout of source->target position groups in windows of layers, and the logit-lens
readout of answer emergence, after Zhang et al., "Cross-modal Information Flow in Multimodal Large
Language Models" (CVPR 2025), on Hugging Face ``transformers`` checkpoints.

Importing ``vlmflow`` is cheap and has no side effects: the names below are loaded on first use.

>>> import vlmflow
>>> vlmflow.Flow.parse("image->question").label
'image ↛ question'
>>> run = vlmflow.run_flows(model="llava-hf/llava-1.5-7b-hf", data="gqa:ChooseAttr",
...                         images="gqa/images", window=9, out="runs")       # doctest: +SKIP
>>> run.plot()                                                                # doctest: +SKIP

Names:
    run_flows, run_lens: run an experiment over a dataset into a run directory (:mod:`vlmflow.api`).
    load_run, Run: read a run directory back (tables as DataFrames, figures).
    show_groups: one sample's position groups, their tokens and image patches (``vlmflow groups``).
    load_model: load a checkpoint with its processor and family adapter (:mod:`vlmflow.loading`).
    LoadSpec, FlowSettings, LensSettings: how to load a model and run an experiment, as typed
        objects (:mod:`vlmflow.load_spec`, :mod:`vlmflow.experiments.settings`).
    load_samples: read a task CSV or ``gqa:TASK`` into typed samples (:mod:`vlmflow.data.datasets`).
    Flow, Group, PAPER_FLOWS: the vocabulary of flows (:mod:`vlmflow.positions.groups`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> module that defines it (imported on first attribute access).
_LAZY: dict[str, str] = {
    "run_flows": "vlmflow.api",
    "run_lens": "vlmflow.api",
    "show_groups": "vlmflow.api",
    "load_run": "vlmflow.api",
    "Run": "vlmflow.api",
    "load_model": "vlmflow.loading",
    "LoadedModel": "vlmflow.loading",
    "LoadSpec": "vlmflow.load_spec",
    "FlowSettings": "vlmflow.experiments.settings",
    "LensSettings": "vlmflow.experiments.settings",
    "load_samples": "vlmflow.data.datasets",
    "Flow": "vlmflow.positions.routes",
    "Group": "vlmflow.positions.groups",
    "PAPER_FLOWS": "vlmflow.positions.routes",
}

__all__ = [
    "PAPER_FLOWS",
    "Flow",
    "FlowSettings",
    "Group",
    "LensSettings",
    "LoadSpec",
    "LoadedModel",
    "Run",
    "__version__",
    "load_model",
    "load_run",
    "load_samples",
    "run_flows",
    "run_lens",
    "show_groups",
]

if TYPE_CHECKING:
    from vlmflow.api import Run, load_run, run_flows, run_lens, show_groups
    from vlmflow.data.datasets import load_samples
    from vlmflow.experiments.settings import FlowSettings, LensSettings
    from vlmflow.load_spec import LoadSpec
    from vlmflow.loading import LoadedModel, load_model
    from vlmflow.positions.groups import Group
    from vlmflow.positions.routes import PAPER_FLOWS, Flow


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("vlmflow")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree
            return "0+unknown"
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vlmflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
