"""The paper's claims checklist (its replication spec, section 10), evaluated from the results.

Every claim is a rule over the curves of :mod:`vlmflow.analysis.evidence` with explicit thresholds
(:class:`ClaimThresholds`, settable in the study config under ``claims:``). Each evaluation gives
``holds``, ``does not hold`` or ``not run`` (an experiment or flow the rule needs is missing), the
conditions it checked, and the numbers. ``docs/study.md`` states every rule in words.

Conventions used by the rules:

* flow curves are mean relative changes of the answer probability (%), negative = a drop; the
  *drop* at a layer is ``-mean``. A *significant* drop has its 95% bootstrap interval below zero.
* relative depth of a window centre ``l`` of an ``L``-layer model is ``l / (L - 1)``; of a lens
  point ``j`` it is ``j / L``. "Lowest layers" are below ``lower_band``, "middle" inside
  ``middle_band``, "upper" at or above ``upper_band``.
* dips are found by :func:`vlmflow.analysis.stats.find_dips` (deep enough, significant, and
  separated by a recovery of at least ``separation`` of the shallower dip).

Modules: :mod:`~vlmflow.analysis.claims.checklist` (the claims, their wording and thresholds),
:mod:`~vlmflow.analysis.claims.landmarks` (peaks, dips, onsets and rises the rules look for),
:mod:`~vlmflow.analysis.claims.flow_rules` and :mod:`~vlmflow.analysis.claims.lens_rules` (the rules
of one model x task), :mod:`~vlmflow.analysis.claims.evaluate` (the stage order, the study-level
rules, and the evaluation of a cell and of a study).
"""

from vlmflow.analysis.claims.checklist import (
    CLAIMS,
    STUDY_CLAIMS,
    Claim,
    ClaimResult,
    ClaimThresholds,
    Status,
)
from vlmflow.analysis.claims.evaluate import RULES, evaluate_cell, evaluate_study

__all__ = [
    "CLAIMS",
    "RULES",
    "STUDY_CLAIMS",
    "Claim",
    "ClaimResult",
    "ClaimThresholds",
    "Status",
    "evaluate_cell",
    "evaluate_study",
]
