"""The content of each section of the report, built from a study's analysis."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from vlmflow.analysis.claims import CLAIMS, Status
from vlmflow.analysis.stats import EFFECT_THRESHOLD, CurveSummary, format_bands
from vlmflow.positions.groups import Group
from vlmflow.positions.routes import Flow
from vlmflow.report.figures import plot_control, plot_cross_model, save_figure
from vlmflow.report.markup import _badge, _conditions, _data_uri, _e, _fmt, _pairs, _Raw, _table
from vlmflow.study.analysis import CellAnalysis, StudyAnalysis
from vlmflow.study.viewer import read_viewer

log = logging.getLogger(__name__)


class SectionBuilder:
    """One method per report section (the ids of :data:`vlmflow.report.html.SECTIONS`), each giving
    the section's HTML; figures are also saved under the study's ``figures/`` in ``formats``."""

    def __init__(self, analysis: StudyAnalysis, formats: Sequence[str]) -> None:
        self.a = analysis
        self.formats = formats
        self.inline = analysis.report.figure_format

    def figure(self, make: Callable[[], Any], folder: Path, stem: str, caption: str) -> str:
        try:
            fig = make()
        except Exception as exc:  # a figure that cannot be drawn must not lose the whole report
            log.warning("figure %s/%s not drawn: %s", folder, stem, exc)
            return f'<figure><p class="muted">figure not drawn: {_e(str(exc))}</p><figcaption>{_e(caption)}</figcaption></figure>'
        body = save_figure(fig, folder, stem, self.formats, inline=self.inline)
        return f"<figure>{body}<figcaption>{_e(caption)}</figcaption></figure>"

    def cells(self) -> list[CellAnalysis]:
        return [self.a.cells[(m, t)] for m in self.a.models for t in self.a.tasks if (m, t) in self.a.cells]

    def overview(self) -> str:
        runs = self.a.manifest.get("runs", {})
        models = []
        for model in self.a.models:
            entry = next((e for e in runs.values() if e["model"] == model and e.get("status") == "done"), None) or next(
                e for e in runs.values() if e["model"] == model
            )
            info = entry.get("model_info", {})
            models.append([model, entry.get("model_name"), entry.get("n_layers"), entry.get("window"), info.get("dtype"), info.get("device")])
        tasks = []
        for task in self.a.tasks:
            row: list[Any] = [task]
            for model in self.a.models:
                cell = self.a.cells.get((model, task))
                samples = cell.evidence.samples if cell else None
                if samples is None or samples.empty:
                    row.append("–")
                else:
                    row.append(f"{int(samples['correct'].sum())}/{len(samples)} correct, {int(samples['kept'].sum())} kept")
            tasks.append(row)
        counts = {s: sum(1 for c in self.cells() for r in c.claims if r.status is s) for s in Status}
        failed = ""
        if self.a.failed:
            failed = "<h3>Failed runs</h3>" + _table(["run", "reason"], sorted(self.a.failed.items()))
        config = yaml.safe_dump(self.a.manifest.get("config", {}), sort_keys=False, allow_unicode=True)
        return (
            f"<p>Claims over all model × task: {counts[Status.HOLDS]} hold, {counts[Status.FAILS]} do not hold, "
            f"{counts[Status.NOT_RUN]} not run. Confidence intervals: {self.a.boot.confidence:.0%} percentile bootstrap over "
            f"samples ({self.a.boot.n_boot} resamples, seed {self.a.boot.seed}).</p>"
            "<h3>Models</h3>" + _table(["model", "checkpoint", "layers", "window", "dtype", "device"], models, numeric=(2, 3))
            + "<h3>Tasks (baseline per model)</h3>" + _table(["task", *self.a.models], tasks)
            + failed
            + f"<details><summary>Study config</summary><pre>{_e(config)}</pre></details>"
        )

    def checklist(self) -> str:
        cells = self.cells()
        header = ["claim", *(f"{c.model} / {c.task}" for c in cells)]
        rows = []
        for claim_id, claim in CLAIMS.items():
            row: list[Any] = [_Raw(f"<details><summary>{_e(claim.text)}</summary><p class=\"muted\">Rule: {_e(claim.rule)}</p></details>")]
            for cell in cells:
                result = next(r for r in cell.claims if r.claim.id == claim_id)
                row.append(_Raw(f'<span title="{_e(result.evidence)}" data-claim="{claim_id}">{_badge(result.status)}</span>'))
            rows.append(row)
        study_rows = [
            [_Raw(f"<details><summary>{_e(r.claim.text)}</summary><p class=\"muted\">Rule: {_e(r.claim.rule)}</p></details>"), _Raw(_badge(r.status)), r.evidence]
            for r in self.a.study_claims
        ]
        details = []
        for cell in cells:
            items = "".join(
                f"<li>{_badge(r.status)} <b>{_e(r.claim.id)}</b>: {_e(r.evidence)}{_conditions(r)}</li>" for r in cell.claims
            )
            details.append(f"<details><summary>Evidence for {_e(cell.model)} / {_e(cell.task)}</summary><ul>{items}</ul></details>")
        return (
            self.expectations()
            + "<p class=\"note\">Each claim of the paper is evaluated by an explicit rule (expand a claim to read it; thresholds "
            "are set under <code>claims:</code> in the study config). Hover a badge for its evidence, or open the evidence "
            "lists below. Flow curves are over each model's correctly answered samples.</p>"
            + _table(header, rows)
            + "<h3>Across models and tasks</h3>"
            + _table(["claim", "status", "evidence"], study_rows)
            + "".join(details)
        )

    def expectations(self) -> str:
        """The banner above the claims checklist: what each model is and is not expected to show."""
        from vlmflow.report.banner import expectations_banner

        names = {e["model"]: e.get("model_name") for e in self.a.manifest.get("runs", {}).values()}
        return expectations_banner([(model, names.get(model)) for model in self.a.models])

    def flows(self) -> str:
        from vlmflow.plots.flows import plot_flows

        figures = []
        for cell in self.cells():
            frame = cell.tables.get("flows")
            if frame is None or frame.empty:
                continue
            frame = frame[frame["sample_id"].astype(str).isin(cell.evidence.kept_ids)]
            n = frame["sample_id"].nunique()
            title = f"{cell.model} / {cell.task}: {n} samples, window {cell.evidence.window}"
            figures.append(
                self.figure(
                    lambda frame=frame, title=title: plot_flows(frame, title=title),
                    self.a.study.figures_dir(cell.model, cell.task),
                    "flows",
                    title,
                )
            )
        if not figures:
            return "<p class=\"muted\">No flows were run.</p>"
        return (
            "<p class=\"note\">Mean relative change of the answer's probability when the flow is knocked out in a window of "
            "layers centred on each layer, with the 95% bootstrap band.</p>" + f'<div class="grid wide">{"".join(figures)}</div>'
        )

    def lens(self) -> str:
        from vlmflow.experiments.lens import Readout
        from vlmflow.plots.lens import plot_lens

        figures = []
        for cell in self.cells():
            frame = cell.tables.get("lens")
            if frame is None or frame.empty:
                continue
            for readout in (r for r in Readout if r.value in set(frame["readout"])):
                title = f"{cell.model} / {cell.task}: {readout.value} readout"

                def make(frame: Any = frame, readout: Readout = readout, title: str = title) -> Any:
                    return plot_lens(frame, readout, title=title)

                figures.append(
                    self.figure(make, self.a.study.figures_dir(cell.model, cell.task), f"lens_{readout.value}", title)
                )
        if not figures:
            return "<p class=\"muted\">The lens was not run.</p>"
        return (
            "<p class=\"note\">Probability of the answer's first sub-token read out of the residual stream at the last position "
            "after each layer (raw: no final norm below the top layer, as the paper; normed: final norm at every layer).</p>"
            + f'<div class="grid">{"".join(figures)}</div>'
        )

    def statistics(self) -> str:
        parts = [
            "<p class=\"note\">Per flow: the largest drop of the answer's probability (mean change with its 95% bootstrap "
            f"interval) and its layer (with the interval of that layer), and the layers with a clear drop: a mean drop of at "
            f"least {EFFECT_THRESHOLD:g}% whose interval lies below 0 (pointwise, not corrected for the number of layers). "
            f"A flow whose mean change stays within {EFFECT_THRESHOLD:g}% at every layer has no drop, however narrow its "
            "interval.</p>"
        ]
        for cell in self.cells():
            if not cell.summaries:
                continue
            rows = [self._summary_row(flow, s, cell.evidence.flow_tokens.get(flow)) for flow, s in cell.summaries.items()]
            parts.append(f"<h3>{_e(cell.model)} / {_e(cell.task)}</h3>" + _table(_SUMMARY_HEADER, rows, numeric=(1, 2, 3, 4, 6)))
        return "".join(parts) if len(parts) > 1 else "<p class=\"muted\">No flows were run.</p>"

    @staticmethod
    def _summary_row(flow: Flow, s: CurveSummary | None, tokens: float | None) -> list[Any]:
        if s is None:
            return [flow, 0, "–", "–", "–", "–", "–"]
        blocked = "–" if tokens is None else f"{tokens:.0f}"
        if not s.drop:
            no_drop = f"no drop (within {EFFECT_THRESHOLD:g}%)"
            return [flow, s.n, no_drop, _fmt(s.peak), f"[{_fmt(s.peak_low)}, {_fmt(s.peak_high)}]", "none", blocked]
        return [
            flow,
            s.n,
            f"{s.peak_layer} [{s.peak_layer_low}, {s.peak_layer_high}]",
            _fmt(s.peak),
            f"[{_fmt(s.peak_low)}, {_fmt(s.peak_high)}]",
            format_bands(s.bands),
            blocked,
        ]

    def controls(self) -> str:
        parts = []
        for cell in self.cells():
            for target, comparison in cell.evidence.control.items():
                caption = f"{cell.model} / {cell.task}: related vs {Flow(Group.RANDOM, target).label}"
                figure = self.figure(
                    lambda comparison=comparison, caption=caption: plot_control(comparison, caption),
                    self.a.study.figures_dir(cell.model, cell.task),
                    f"control_{target}",
                    caption,
                )
                diff = comparison.difference
                i = int(diff.mean.argmin())
                summary = (
                    f"{comparison.n_related_tokens:.0f} image tokens per sample on average, {comparison.draws} random draws, "
                    f"{diff.n} paired samples; largest paired difference {_fmt(float(diff.mean[i]))} points "
                    f"[{_fmt(float(diff.low[i]))}, {_fmt(float(diff.high[i]))}] at layer {int(diff.layers[i])}."
                )
                parts.append(f"<div>{figure}<p class=\"muted\">{_e(summary)}</p></div>")
        if not parts:
            return "<p class=\"muted\">The random-patch control was not run (set <code>controls: {random_draws: N}</code>).</p>"
        return (
            "<p class=\"note\">Related↛Question blocks few image tokens and Other↛Question many. The control blocks, for the "
            "same samples and windows, as many image tokens as the related patches, drawn at random from the non-related "
            "patches (several draws). If the related curve drops clearly below the random one, the middle-layer effect is "
            "about <em>which</em> patches, not how many.</p>" + f'<div class="grid">{"".join(parts)}</div>'
        )

    def cross_model(self) -> str:
        if not self.a.common:
            return "<p class=\"muted\">Needs at least two models with flows on the same task.</p>"
        parts = [
            "<p class=\"note\">Each model is restricted to the questions that every model answers correctly (the common set), "
            "and the curves are drawn on relative depth so that models of different depth line up.</p>"
        ]
        for task, common in self.a.common.items():
            flows = list(dict.fromkeys(f for ev in common.evidence.values() for f in ev.flows))
            curves = {m: ev.flows for m, ev in common.evidence.items()}
            title = f"{task}: {len(common.sample_ids)} questions answered correctly by all of {', '.join(common.models)}"
            parts.append(f"<h3>{_e(task)}</h3>")
            parts.append(
                self.figure(lambda curves=curves, flows=flows, title=title: plot_cross_model(curves, flows, title), self.a.study.figures_dir() / "cross-model", task, title)
            )
            rows = []
            for model, by_flow in common.summaries.items():
                depth = common.evidence[model].depth or 1
                for flow, s in by_flow.items():
                    row = self._summary_row(flow, s, None)[:-1]
                    rel = "–" if s is None else f"{s.peak_layer / max(depth - 1, 1):.2f}"
                    rows.append([model, *row, rel])
            parts.append(_table(["model", *_SUMMARY_HEADER[:-1], "relative depth of the drop"], rows, numeric=(2, 4, 7)))
        return "".join(parts)

    def samples(self) -> str:
        viewers = []
        for cell in self.cells():
            folder = self.a.study.viewer_dir(cell.model, cell.task)
            records = read_viewer(folder)
            if not records:
                continue
            slides = []
            for record in records:
                slides.append(self._slide(folder, record))
            viewers.append(
                f'<div class="viewer" data-model="{_e(cell.model)}" data-task="{_e(cell.task)}"><h3>{_e(cell.model)} / {_e(cell.task)}</h3>'
                '<div class="controls"><button type="button" class="prev">◀ previous</button><button type="button" class="next">next ▶</button>'
                '<span class="pos"></span> <label><input type="checkbox" class="overlay-toggle" checked> related patches</label></div>'
                + "".join(slides)
                + "</div>"
            )
        if not viewers:
            return "<p class=\"muted\">No viewer records (set <code>report: {viewer_samples: N}</code> and rerun reproduce).</p>"
        return (
            "<p class=\"note\">The image as the dataset gives it; red: the image patches whose tokens are the related group "
            "(as this model's preprocessing maps them); yellow: the object boxes.</p>" + "".join(viewers)
        )

    def _slide(self, folder: Path, record: dict[str, Any]) -> str:
        info = _pairs(
            [
                ["sample", record.get("sample_id")],
                ["question", record.get("question")],
                ["answer", record.get("answer")],
                ["prediction", record.get("prediction")],
                ["correct", record.get("correct")],
                ["image tokens", record.get("n_image_tokens")],
                ["related tokens", record.get("n_related_tokens")],
            ],
        )
        if "error" in record or "image" not in record:
            picture = f'<p class="muted">no image: {_e(str(record.get("error", "missing")))}</p>'
        else:
            picture = (
                f'<div class="stack"><img class="base" alt="sample {_e(str(record["sample_id"]))}" src="{_data_uri(folder / record["image"])}">'
                f'<img class="overlay" alt="related patches" src="{_data_uri(folder / record["overlay"])}"></div>'
            )
        return f'<div class="slide" hidden>{picture}<div>{info}</div></div>'

    def metadata(self) -> str:
        rows = []
        errors = []
        versions: dict[str, Any] = {}
        for cell in self.cells():
            for info in cell.runs.values():
                summary = info.summary
                provenance = info.spec.get("provenance", {})
                versions = versions or provenance.get("versions", {})
                rows.append(
                    [
                        info.key,
                        info.entry.get("status"),
                        summary.get("samples"),
                        summary.get("correct"),
                        summary.get("kept"),
                        summary.get("errors"),
                        summary.get("seconds_this_session"),
                        provenance.get("device"),
                        provenance.get("started"),
                        json.dumps(info.spec.get("settings", {}), sort_keys=True),
                    ]
                )
                if info.errors is not None and len(info.errors):
                    for r in info.errors.head(5).to_dict("records"):
                        errors.append([info.key, r["sample_id"], r["stage"], r["reason"]])
        out = _table(
            ["run", "status", "samples", "correct", "kept", "errors", "seconds (last session)", "device", "started", "settings"],
            rows,
            numeric=(2, 3, 4, 5, 6),
        )
        if versions:
            out += "<h3>Versions</h3>" + _table(["package", "version"], sorted(versions.items()))
        if errors:
            out += "<h3>Sample errors (first 5 per run)</h3>" + _table(["run", "sample", "stage", "reason"], errors)
        return out


_SUMMARY_HEADER = [
    "flow", "samples", "layer of largest drop [CI]", "largest drop (%)", "95% CI", f"layers with a drop ≥ {EFFECT_THRESHOLD:g}%", "tokens blocked",
]  # fmt: skip
