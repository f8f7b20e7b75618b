"""``vlmflow plot``: draw the figures of a finished (or partly finished) run directory."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmflow.cli.common import console, setup_logging
from vlmflow.cli.usage import examples

__all__ = ["plot", "register"]


def plot(
    run_dir: Path = typer.Argument(..., help="A run directory written by `vlmflow flows` or `vlmflow lens`."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Folder for the figures (default: RUN_DIR/figures)."),
    format: list[str] | None = typer.Option(
        None, "--format", help="png, pdf or svg (repeatable or comma-separated). Default: png and pdf."
    ),
    flows_run: Path | None = typer.Option(
        None, "--flows-run", help="For a lens run: a flows run over the same data, to draw flows over the lens."
    ),
    # The paper's axes: one option, kept apart from the figure's other settings.
    paper_axes: bool = typer.Option(
        False,
        "--paper-axes",
        help="Flow figure on the paper's axes: y ticks <= 0 only, x axis cut at layer 31 (as its 13b figures); labelled so.",
    ),
) -> None:
    """Draw a run's figures: the paper's knockout figure (one file per task) and/or its lens figures."""
    setup_logging(False)
    from vlmflow.errors import ConfigError
    from vlmflow.plots.common import DEFAULT_FORMATS, check_formats
    from vlmflow.plots.flows import write_flow_figures
    from vlmflow.plots.lens import write_lens_figures
    from vlmflow.results.store import RunStore

    formats = check_formats([f for item in format for f in item.split(",") if f.strip()]) if format else DEFAULT_FORMATS
    tables = RunStore.load(run_dir).tables()
    written = write_flow_figures(run_dir, out=out, formats=formats, paper_axes=paper_axes)
    written += write_lens_figures(run_dir, flows_run=flows_run, out=out, formats=formats)
    if not written:
        what = ", ".join(tables) or "no tables"
        raise ConfigError(f"nothing to plot in {str(run_dir)!r}: it holds {what} but no kept samples with flows or lens rows")
    for path in written:
        console.print(f"figure: {path}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``plot`` to ``app``."""
    app.command(
        "plot",
        epilog=examples(
            "vlmflow plot runs/flows-organism-scenes_ChooseAttr-1a2b3c4d",
            "vlmflow plot runs/lens-organism-scenes_ChooseAttr-5e6f7a8b --flows-run runs/flows-organism-scenes_ChooseAttr-1a2b3c4d --format svg",
        ),
    )(plot)
