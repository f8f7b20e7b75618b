"""``report.html`` of ``vlmflow demo``: what to notice, the summary and the figures, on one page.

``vlmflow demo`` writes it after :func:`~vlmflow.organism.demo.run_demo` (the report layer reads the
organism's results, never the other way round).

Self-contained (figures as ``data:`` URIs, the study report's stylesheet inline), so it opens from
anywhere. Its parts:

* **What to notice**: a few sentences drawn from the numbers (:func:`what_to_notice`): how many
  questions the model answers, which flow hurts the answer most and where, which flows do nothing
  (by the explicit threshold :data:`~vlmflow.analysis.stats.EFFECT_THRESHOLD`), where the logit lens
  finds the answer, and how to compare a small model with the paper. Nothing there is written for
  one particular model: it reads the same for the plain organism, the planted one or a checkpoint
  of your own.
* **Summary**: ``summary.md`` as HTML (every table the demo's summary holds).
* **Figures**: per task type, the flow figure and the lens figures, with how to read them.

>>> write_demo_report(result)     # doctest: +SKIP
PosixPath('runs/demo/report.html')
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmflow.analysis.stats import EFFECT_THRESHOLD
from vlmflow.positions.groups import Flow
from vlmflow.report.markup import _data_uri
from vlmflow.report.style import CSS

if TYPE_CHECKING:
    from vlmflow.organism.demo import DemoResult

__all__ = ["what_to_notice", "write_demo_report"]

_e = html.escape

_EXTRA_CSS = """
main { max-width: 1200px; }
.notice { border-left: 4px solid #0b57d0; background: #f3f7ff; padding: 8px 16px; margin: 10px 0 16px; }
.notice li { margin: 5px 0; }
.pair { display: grid; grid-template-columns: repeat(auto-fill, minmax(900px, 1fr)); gap: 12px; margin-top: 12px; }
.pair figure { max-width: 900px; }
.howto { font-size: 13px; color: var(--muted); }
"""


def write_demo_report(result: DemoResult) -> Path:
    """Write ``report.html`` into the demo folder and return its path."""
    summary = result.summary
    title = f"vlmflow demo: {Path(str(summary.get('model'))).name} ({summary.get('n_layers')} layers), window {summary.get('window')}"
    md_path = result.summary_files[1]
    summary_html = _markdown(md_path.read_text(encoding="utf-8")) if md_path.is_file() else ""
    summary_html = summary_html.replace("<h1>", "<h3 hidden>").replace("</h1>", "</h3>")  # the page has its own title
    notes = "".join(f"<li>{item}</li>" for item in what_to_notice(summary))
    body = (
        f"<section id=\"notice\"><h2>What to notice</h2><ul class=\"notice\">{notes}</ul></section>"
        f"<section id=\"summary\"><h2>Summary</h2>{summary_html}</section>"
        f"<section id=\"figures\"><h2>Figures</h2>{_howto()}{_figures(result)}</section>"
        f"<section id=\"files\"><h2>Files</h2>{_files(result)}</section>"
    )
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
        f"<style>{CSS}{_EXTRA_CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><div class=\"muted\">{_e(_scope(summary))} · written {generated}</div></header>"
        f"<main>{body}</main></body></html>\n"
    )
    result.report.write_text(page, encoding="utf-8")
    return result.report


def what_to_notice(summary: Mapping[str, Any]) -> list[str]:
    """A few sentences (HTML) on what the demo's numbers show, each drawn from ``summary``.

    >>> summary = {"n_layers": 6, "window": 1, "tasks": {"ChooseAttr": {"samples": 4, "correct": 4,
    ...     "flows": {"question->last": {"min_mean_rel_change": -80.0, "layer": 2, "drop": True},
    ...               "image->last": {"min_mean_rel_change": -0.01, "layer": None, "drop": False},
    ...               "image->question": {"min_mean_rel_change": -40.0, "layer": 0, "drop": True}},
    ...     "lens_first_top1": {"raw": 4.0}}}}
    >>> for line in what_to_notice(summary): print(line)
    The model answers 4 of 4 questions correctly (100%); as in the paper, the flow curves use the correctly answered ones only.
    Cutting <b>question ↛ last</b> hurts the answer most: down to -80% (ChooseAttr, at layer 2).
    <b>image ↛ last</b> has no effect in any task type (the answer's probability changes by less than 5% at every layer), yet <b>image ↛ question</b> does: the image reaches the answer through the question's positions, not directly.
    The answer becomes the logit lens' most likely token at layer 4 of 6, after the last drop at layer 2: the flows that matter act before the answer appears.
    This model has 6 layers and a window of 1 layer; the paper's LLaVA models have 32-40 and a window of 9. Compare which flows matter and in which order, not the layer numbers.
    """
    tasks: Mapping[str, Any] = summary.get("tasks", {})
    if not tasks:
        return ["No task type was run."]
    notes = []
    correct = sum(int(t.get("correct", 0)) for t in tasks.values())
    total = sum(int(t.get("samples", 0)) for t in tasks.values())
    if total:
        notes.append(
            f"The model answers {correct} of {total} questions correctly ({100 * correct / total:.0f}%); as in the paper, "
            "the flow curves use the correctly answered ones only."
        )
    drops = _drops(tasks)
    flows = list(dict.fromkeys(flow for t in tasks.values() for flow in t.get("flows", {})))
    if drops:
        flow, task, change, layer = min(drops, key=lambda d: d[2])
        notes.append(f"Cutting {_flow(flow)} hurts the answer most: down to {change:+.0f}% ({_e(task)}, at layer {layer}).")
    else:
        notes.append(f"No flow changes the answer's probability by {EFFECT_THRESHOLD:g}% or more at any layer.")
    quiet = [f for f in flows if not any(d[0] == f for d in drops)]
    if quiet and drops:
        names = _join([_flow(f) for f in quiet])
        verb = "has" if len(quiet) == 1 else "have"
        line = (
            f"{names} {verb} no effect in any task type (the answer's probability changes by less than "
            f"{EFFECT_THRESHOLD:g}% at every layer)"
        )
        if "image->last" in quiet and any(d[0] == "image->question" for d in drops):
            line += f", yet {_flow('image->question')} does: the image reaches the answer through the question's positions, not directly"
        notes.append(line + ".")
    lens = [t["lens_first_top1"]["raw"] for t in tasks.values() if (t.get("lens_first_top1") or {}).get("raw") is not None]
    if lens:
        low, high = min(lens), max(lens)  # each a median over the task's samples
        depth = summary.get("n_layers")
        where = f"at layer {low:g} of {depth}" if low == high else f"between layers {low:g} and {high:g} of {depth}, depending on the task type"
        line = f"The answer becomes the logit lens' most likely token {where}"
        last_drop = max((d[3] for d in drops), default=None)
        if last_drop is not None and low > last_drop:
            line += f", after the last drop at layer {last_drop}: the flows that matter act before the answer appears"
        notes.append(line + ".")
    if summary.get("planted"):
        notes.append(
            "The shaded bands of the flow figures are where this model's routes were planted; the last table says for "
            "each flow whether its strongest drop falls inside its band."
        )
    notes.append(
        f"This model has {summary.get('n_layers')} layers and a window of {summary.get('window')} layer"
        f"{'' if summary.get('window') == 1 else 's'}; the paper's LLaVA models have 32-40 and a window of 9. "
        "Compare which flows matter and in which order, not the layer numbers."
    )
    return notes


def _drops(tasks: Mapping[str, Any]) -> list[tuple[str, str, float, int]]:
    """``(flow, task, change, layer)`` of every flow's drop that reaches the threshold."""
    out = []
    for task, entry in tasks.items():
        for flow, value in entry.get("flows", {}).items():
            change = float(value["min_mean_rel_change"])
            if change <= -EFFECT_THRESHOLD and value.get("layer") is not None:
                out.append((flow, task, change, int(value["layer"])))
    return out


def _join(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _flow(name: str) -> str:
    try:
        label = Flow.parse(name).label
    except ValueError:
        label = name
    return f"<b>{_e(label)}</b>"


def _scope(summary: Mapping[str, Any]) -> str:
    tasks = summary.get("tasks", {})
    n = max((int(t.get("samples", 0)) for t in tasks.values()), default=0)
    return f"{len(tasks)} task types, up to {n} questions each, scenes in {summary.get('scenes')}"


def _howto() -> str:
    return (
        "<p class=\"howto\">Flow figures: each curve is one flow <i>source ↛ target</i> (the target positions may not "
        "attend to the source positions in a window of layers centred on the x value); the y value is the mean change of "
        "the answer's probability in %, with its 95% bootstrap band; 0 means the cut changes nothing, -100 that the "
        "answer is gone. Curves lying on top of each other keep their own markers. Lens figures: the probability of the "
        "answer (and of the false option) read out of the last position after each layer.</p>"
    )


def _figures(result: DemoResult) -> str:
    parts = []
    for i, (task, runs) in enumerate(result.runs.items()):
        figures = [
            _figure(Path(runs[run]) / "figures" / name, caption)
            for run, name, caption in (
                ("flows", f"flows_{task}.png", "Attention knockout: change of the answer's probability per flow"),
                ("lens", "lens_raw.png", "Logit lens: the answer's probability at the last position, layer by layer"),
                ("lens", "flows_over_lens.png", "Both on one layer axis: where the flows act, and where the answer appears"),
            )
            if run in runs
        ]
        if not any(figures):
            continue
        flows, lens, both = figures + [""] * (3 - len(figures))
        open_attr = " open" if i == 0 else ""
        parts.append(
            f"<details{open_attr}><summary><b>{_e(task)}</b></summary>{flows}<div class=\"pair\">{lens}{both}</div></details>"
        )
    return "".join(parts) or "<p class=\"muted\">No figures (run without --no-plot to draw them).</p>"


def _figure(path: Path, caption: str) -> str:
    if not path.is_file():
        return ""
    return f'<figure><img alt="{_e(caption)}" src="{_data_uri(path)}"><figcaption>{_e(caption)} ({_e(str(path))})</figcaption></figure>'


def _files(result: DemoResult) -> str:
    json_path, md_path = result.summary_files
    rows = "".join(
        f"<li><code>{_e(str(runs[name]))}</code> ({name} run of {_e(task)})</li>"
        for task, runs in result.runs.items()
        for name in runs
    )
    return (
        f"<p>Summary: <code>{_e(str(md_path))}</code>, <code>{_e(str(json_path))}</code>. Scenes: "
        f"<code>{_e(str(result.scenes))}</code>. Run directories (tables in Parquet; <code>vlmflow plot DIR</code> redraws "
        "a run's figures, <code>vlmflow.load_run(DIR)</code> reads it in Python):</p>"
        f"<ul>{rows}</ul>"
    )


def _markdown(text: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
