"""The study report in a real headless Chromium: it loads offline with no console errors, every
section is there and visible, and the sample viewer works. Screenshots go to the test artefacts
folder (``$VLMFLOW_TEST_ARTIFACTS``, else a temporary folder).

Chromium comes from the system packages (``.ci/run`` installs it); the browser is driven by
Playwright with that binary, never a downloaded one. Locally the test is skipped when there is no
Chromium binary; in CI (``VLMFLOW_REQUIRE_BROWSER=1``) a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_study import SHAPE, write_study

from vlmflow.analysis.claims import CLAIMS
from vlmflow.report.html import SECTIONS, write_report
from vlmflow.study.config import load_config
from vlmflow.study.reproduce import reproduce

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def artefacts(test_artifacts: Path) -> Path:
    folder = test_artifacts / "report-browser"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser_page():
    binary = chromium_binary()
    if binary is None:
        if os.environ.get("VLMFLOW_REQUIRE_BROWSER"):
            pytest.fail("VLMFLOW_REQUIRE_BROWSER is set but no chromium binary is on PATH (apt-get install chromium)")
        pytest.skip("no chromium binary on PATH (install the system package: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=binary, args=FLAGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_checkpoint, tiny_loaded) -> Path:
    folder = tmp_path_factory.mktemp("browser-study")
    config = load_config(write_study(folder / "input", tiny_checkpoint(SHAPE), n=2))
    outcome = reproduce(config, folder / "out", loader=lambda entry: tiny_loaded(SHAPE))
    assert not outcome.failed
    return write_report(folder / "out", formats=("svg",))


def open_offline(browser, report: Path, shots: Path, prefix: str = "report"):
    """Open ``report`` in a new page, screenshot it (``PREFIX-top.png``, ``PREFIX-full.png`` into
    ``shots``), check that it loaded without a console error and fetched nothing; return the page."""
    shots.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    requests: list[str] = []
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type in ("error", "warning") else None)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("requestfailed", lambda request: problems.append(f"request failed: {request.url}"))
    page.on("request", lambda request: requests.append(request.url))
    page.goto(report.as_uri(), wait_until="load")
    page.screenshot(path=str(shots / f"{prefix}-top.png"))
    page.screenshot(path=str(shots / f"{prefix}-full.png"), full_page=True)
    assert problems == []
    assert [u for u in requests if not u.startswith(("data:", "file:"))] == []  # works offline
    return page


def check_report(browser, report: Path, shots: Path) -> None:
    """Load ``report`` and check it: no console error, nothing fetched, every section there and
    filled, a verdict per claim, figures rendered, images decoded; screenshots into ``shots``."""
    page = open_offline(browser, report, shots)
    assert page.title().startswith("vlmflow study")
    for sid, title in SECTIONS:
        section = page.locator(f"section#{sid}")
        assert section.count() == 1, sid
        assert section.is_visible(), sid
        assert section.locator("h2").inner_text() == title
        assert len(section.inner_text()) > len(title) + 20, sid  # has content
        section.screenshot(path=str(shots / f"section-{sid}.png"))
    # The checklist has a verdict for every claim and cell; the figure grids hold rendered SVG figures.
    cells = page.locator("#checklist table").first.locator("thead th").count() - 1  # the claims x cells matrix
    assert cells >= 1
    for claim in CLAIMS:
        assert page.locator(f'#checklist [data-claim="{claim}"] .badge').count() == cells, claim
    for sid in ("flows", "lens", "controls"):
        box = page.locator(f"#{sid} figure svg").first.bounding_box()
        assert box is not None and box["width"] > 200 and box["height"] > 100, sid
    assert page.locator("#samples img.base").count() >= 1
    assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    page.close()


def test_report_loads_offline_without_errors_and_shows_every_section(browser_page, report: Path, artefacts: Path):
    check_report(browser_page, report, artefacts)
    assert report.read_text().count('class="base"') == 2


def test_sample_viewer_pages_and_toggles_the_overlay(browser_page, report: Path, artefacts: Path):
    page = browser_page.new_page(viewport={"width": 1200, "height": 900})
    page.goto(report.as_uri())
    viewer = page.locator(".viewer").first
    assert viewer.locator(".pos").inner_text() == "1 / 2"
    slides = viewer.locator(".slide")
    assert slides.nth(0).is_visible() and not slides.nth(1).is_visible()
    viewer.locator("button.next").click()
    assert viewer.locator(".pos").inner_text() == "2 / 2"
    assert slides.nth(1).is_visible() and not slides.nth(0).is_visible()
    overlay = slides.nth(1).locator("img.overlay")
    assert overlay.is_visible()
    viewer.locator("input.overlay-toggle").uncheck()
    assert not overlay.is_visible()
    viewer.locator("input.overlay-toggle").check()
    viewer.locator("button.prev").click()
    assert viewer.locator(".pos").inner_text() == "1 / 2"
    viewer.screenshot(path=str(artefacts / "sample-viewer.png"))
