"""The demo's ``report.html`` in a real headless Chromium (as :mod:`test_report_browser` does for the
study report): it loads offline without console errors, "What to notice" comes first and says what
the numbers say, and every figure is decoded. Screenshots go to the test artefacts folder.

The demo folder is made by hand (two run directories of known curves, their figures, the summary),
so the page's sentences can be checked against the numbers; ``test_first_hour`` runs the real demo.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_report_browser import browser_page, open_offline  # noqa: F401 - the fixture is used by name

from support.runs import write_flows_run, write_lens_run
from vlmflow.organism.demo import DemoResult, summary_markdown
from vlmflow.plots.flows import write_flow_figures
from vlmflow.plots.lens import write_lens_figures
from vlmflow.positions.groups import PAPER_FLOWS
from vlmflow.report.demo import write_demo_report


def _demo_folder(folder: Path) -> DemoResult:
    """A one-task demo folder: the paper's six flows as :func:`write_flows_run` writes them (the first
    three drop by 10, 20 and 30% at layers 0, 1 and 2, the other three stay at 0), a lens where the
    answer rises with depth, their figures, and the summary of those numbers."""
    flows = write_flows_run(folder / "flows_ChooseAttr", data="scenes/ChooseAttr.csv")
    lens = write_lens_run(folder / "lens_ChooseAttr", data="scenes/ChooseAttr.csv")
    result = DemoResult(path=folder, scenes=folder / "scenes", runs={"ChooseAttr": {"flows": flows, "lens": lens}})
    result.figures += write_flow_figures(flows, formats=("png",))
    result.figures += write_lens_figures(lens, flows_run=flows, formats=("png",))
    drops = {
        str(flow): {"min_mean_rel_change": -10.0 * (i + 1), "layer": i, "drop": True}
        if i < 3
        else {"min_mean_rel_change": 0.0, "layer": None, "drop": False}
        for i, flow in enumerate(PAPER_FLOWS)
    }
    result.summary = {
        "model": "models/tiny-llava", "n_layers": 6, "window": 1, "scenes": str(result.scenes),
        "tasks": {"ChooseAttr": {"samples": 3, "correct": 3, "lens_first_top1": {"raw": 4.0, "normed": 3.0}, "flows": drops}},
    }  # fmt: skip
    result.summary_files[1].write_text(summary_markdown(result.summary) + "\n")
    write_demo_report(result)
    return result


@pytest.mark.slow  # a browser start and three figures: ~15 s on a busy 2-core machine
def test_the_demo_report_loads_offline_and_says_what_to_notice_first(browser_page, tmp_path, test_artifacts):  # noqa: F811
    result = _demo_folder(tmp_path / "demo")
    shots = test_artifacts / "demo-report"
    page = open_offline(browser_page, result.report, shots, "demo-report")  # no console error, nothing fetched
    assert [h.inner_text() for h in page.locator("main h2").all()] == ["What to notice", "Summary", "Figures", "Files"]
    notes = page.locator("#notice li").all_inner_texts()
    assert notes[0].startswith("The model answers 3 of 3 questions correctly (100%)")
    strongest, flat = PAPER_FLOWS[2].label, [f.label for f in PAPER_FLOWS[3:]]
    assert notes[1] == f"Cutting {strongest} hurts the answer most: down to -30% (ChooseAttr, at layer 2)."
    assert f"{flat[0]}, {flat[1]} and {flat[2]} have no effect in any task type" in notes[2]
    assert "(the answer's probability changes by less than 5% at every layer)" in notes[2]
    assert "Compare which flows matter and in which order, not the layer numbers." in notes[-1]
    table = page.locator("#summary table").first.inner_text()
    assert "no drop" in table and "-30 @ 2" in table and "-0 @" not in table
    images = page.locator("#figures img")
    assert images.count() == 3  # the flow figure, the lens figure, flows over lens
    assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    box = images.first.bounding_box()
    assert box is not None and box["width"] > 600  # shown large enough to read
    page.locator("#notice").screenshot(path=str(shots / "demo-report-notice.png"))
    page.close()
