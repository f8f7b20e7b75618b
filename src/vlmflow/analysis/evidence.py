"""What the analyses of one model x task read: curves and counts computed once from the run tables.

:func:`cell_evidence` takes the result tables of one model on one task (the flows, lens and
controls runs' tables, as :meth:`RunStore.read` returns them; any may be missing) and computes the
flow curves with bootstrap intervals, the lens curves, the baseline counts and the random-patch
control comparison. The claims checklist (:mod:`vlmflow.analysis.claims`) and the report both use
it, so every number the report shows comes from one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from vlmflow.analysis.stats import Bootstrap, Curve, bootstrap_curve, frame_curve, per_sample_matrix
from vlmflow.positions.groups import Group
from vlmflow.positions.routes import Flow
from vlmflow.results.tables import flows_of

#: The answer and the false option in either case; their per-sample maximum is a lens curve of its own.
ANSWER_FORMS = ("answer", "answer_capitalized")
FALSE_FORMS = ("false_option", "false_option_capitalized")
EITHER_ANSWER = "answer_either"
EITHER_FALSE = "false_option_either"


@dataclass
class ControlComparison:
    """Related patches vs size-matched random patches, paired by sample (both ``-> target``).

    Attributes:
        target: the group both flows go to.
        related: curve of the related flow on the paired samples.
        random: curve of the random control (per sample, the mean over its draws).
        difference: curve of ``related - random`` per sample (negative: related hurts more).
        draws: random draws per sample.
        n_related_tokens: mean number of image tokens blocked by either (they are equal by design).
    """

    target: Group
    related: Curve
    random: Curve
    difference: Curve
    draws: int
    n_related_tokens: float


@dataclass
class CellEvidence:
    """Everything computed for one model on one task.

    Attributes:
        samples: the ``samples`` table (baseline answers; from the flows run, else the lens run).
        flows: flow -> curve of ``rel_change`` (%), kept samples.
        flow_tokens: flow -> mean number of source positions blocked.
        exact_last: flow -> max ``|rel_change|`` over windows confined to the last layer
            (present only when the window size is 1, so that such a window exists).
        lens: ``(readout, form)`` -> curve of the probability (%) at the last position.
        lens_tokens: per kept sample, the token ids of the tracked forms (columns = forms).
        control: target group -> the random-patch comparison.
    """

    model: str
    task: str
    depth: int | None = None
    window: int | None = None
    samples: pd.DataFrame | None = None
    flows: dict[Flow, Curve] = field(default_factory=dict)
    flow_tokens: dict[Flow, float] = field(default_factory=dict)
    exact_last: dict[Flow, float] = field(default_factory=dict)
    lens: dict[tuple[str, str], Curve] = field(default_factory=dict)
    lens_tokens: pd.DataFrame | None = None
    control: dict[Group, ControlComparison] = field(default_factory=dict)

    @property
    def kept_ids(self) -> set[str]:
        if self.samples is None or self.samples.empty:
            return set()
        return set(self.samples.loc[self.samples["kept"], "sample_id"].astype(str))


def _kept(frame: pd.DataFrame, kept: set[str] | None) -> pd.DataFrame:
    return frame if kept is None else frame[frame["sample_id"].astype(str).isin(kept)]


def cell_evidence(
    model: str,
    task: str,
    *,
    flows: pd.DataFrame | None = None,
    lens: pd.DataFrame | None = None,
    samples: pd.DataFrame | None = None,
    controls: pd.DataFrame | None = None,
    only: set[str] | None = None,
    boot: Bootstrap | None = None,
) -> CellEvidence:
    """Compute the evidence of one model x task from its tables.

    ``only`` restricts every table to those sample ids (e.g. the questions every model answers
    correctly, for cross-model comparisons). Rows of samples that are not kept are ignored.

    >>> ev = cell_evidence("m", "ChooseAttr", flows=store.read("flows"), samples=store.read("samples"))  # doctest: +SKIP
    >>> ev.flows[Flow.parse("image->question")].mean                                                      # doctest: +SKIP
    """
    boot = boot or Bootstrap()
    ev = CellEvidence(model=model, task=task, samples=samples)
    kept = ev.kept_ids if samples is not None else None
    if only is not None:
        kept = set(only) if kept is None else kept & set(only)
    flow_parts: dict[Flow, pd.DataFrame] = {}
    if flows is not None and not flows.empty:
        flow_parts = _by_flow(_kept(flows, kept))
        ev.depth = int(flows["layer"].max()) + 1
        ev.window = int(flows["window"].iloc[0])
        for flow, part in flow_parts.items():
            ev.flows[flow] = frame_curve(part, "rel_change", ev.depth, boot)
            ev.flow_tokens[flow] = float(part["n_source"].mean())
            confined = part[part["layers_blocked"].map(lambda x: list(x) == [ev.depth - 1])]
            if len(confined):
                ev.exact_last[flow] = float(confined["rel_change"].abs().max())
    if lens is not None and not lens.empty:
        frame = _kept(lens[lens["group"] == "last"], kept)
        if ev.depth is None and len(frame):
            ev.depth = int(frame["layer"].max())
        frame = frame.assign(pct=frame["prob"] * 100.0)
        for (readout, form), part in frame.groupby(["readout", "form"], sort=False):
            ev.lens[(str(readout), str(form))] = frame_curve(part, "pct", ev.depth, boot)
        for readout, part in frame.groupby("readout", sort=False):
            for label, forms in ((EITHER_ANSWER, ANSWER_FORMS), (EITHER_FALSE, FALSE_FORMS)):
                sub = part[part["form"].isin(forms)]
                if len(sub):
                    # Per sample and layer the more probable of the two cases, then the mean over samples.
                    either = sub.groupby(["sample_id", "layer"], as_index=False)["pct"].max()
                    ev.lens[(str(readout), label)] = frame_curve(either, "pct", ev.depth, boot)
        if len(frame):
            ev.lens_tokens = frame.pivot_table(index="sample_id", columns="form", values="token_id", aggfunc="first")
    if controls is not None and not controls.empty and flows is not None:
        by_flow = _by_flow(_kept(controls, kept))
        for flow in sorted(by_flow, key=lambda f: f.target.value):
            part = by_flow[flow]
            related = flow_parts.get(Flow(Group.RELATED, flow.target))
            if related is None:
                continue
            ev.control[flow.target] = _control(flow.target, related, part, ev.depth or 0, boot)
    return ev


def _by_flow(frame: pd.DataFrame) -> dict[Flow, pd.DataFrame]:
    """Rows of a ``flows`` or ``controls`` table by flow, in order of appearance."""
    flow_of = flows_of(frame["flow"])
    return {flow_of[name]: part for name, part in frame.groupby("flow", sort=False)}


def _control(target: Group, related: pd.DataFrame, random: pd.DataFrame, depth: int, boot: Bootstrap) -> ControlComparison:
    rel, rel_layers, rel_ids = per_sample_matrix(related, "rel_change")
    rnd, rnd_layers, rnd_ids = per_sample_matrix(random, "rel_change")  # pivot averages the draws
    common = sorted(set(rel_ids) & set(rnd_ids))
    if not np.array_equal(rel_layers, rnd_layers):
        raise ValueError("the control and the flows run have different window centres; rerun with the same window")
    a = rel[[rel_ids.index(s) for s in common]]
    b = rnd[[rnd_ids.index(s) for s in common]]
    return ControlComparison(
        target=target,
        related=bootstrap_curve(a, rel_layers, depth, boot),
        random=bootstrap_curve(b, rel_layers, depth, boot),
        difference=bootstrap_curve(a - b, rel_layers, depth, boot),
        draws=int(random["draw"].nunique()),
        n_related_tokens=float(related["n_source"].mean()),
    )


def capitalization(ev: CellEvidence) -> dict[str, int] | None:
    """Of the kept samples, how many generated the capitalised / lowercase answer's first sub-token.

    ``None`` without lens rows (the token ids come from the lens table).
    """
    tokens = ev.lens_tokens
    if tokens is None or "generated" not in tokens or "answer_capitalized" not in tokens:
        return None
    gen = tokens["generated"]
    return {
        "samples": len(tokens),
        "capitalized": int((gen == tokens["answer_capitalized"]).sum()),
        "lowercase": int((gen == tokens["answer"]).sum()) if "answer" in tokens else 0,
    }
