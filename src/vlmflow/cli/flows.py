"""``vlmflow flows``: run attention-knockout flows over a dataset into a run directory."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmflow.cli.common import (
    RAY_OPTION,
    SHARD_SIZE_OPTION,
    WORKERS_OPTION,
    console,
    err_console,
    print_errors,
    progress_bar,
    ray_options,
    setup_logging,
)
from vlmflow.cli.options import settings_options
from vlmflow.cli.usage import examples
from vlmflow.experiments.settings import FlowSettings
from vlmflow.load_spec import LoadSpec


@settings_options(load=LoadSpec, settings=FlowSettings)
def flows(
    *,
    load: LoadSpec,
    data: str = typer.Option(..., "--data", "-d", help="Task CSV (released GQA layout) or gqa:TASK (packaged GQA files)."),
    images: Path | None = typer.Option(None, "--images", help="Folder with the images ({img_id}.jpg/.png). Default: beside the CSV."),
    settings: FlowSettings,
    out: Path = typer.Option(Path("runs"), "--out", "-o", help="Parent folder of run directories."),
    name: str | None = typer.Option(None, "--name", help="Run directory name (default: derived from the spec)."),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N samples."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write the flow figure when done."),
    ray: str | None = RAY_OPTION,
    workers: int | None = WORKERS_OPTION,
    shard_size: int | None = SHARD_SIZE_OPTION,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
) -> None:
    """Knock out attention flows in windows of layers and record how the answer probability changes."""
    setup_logging(verbose)
    on_ray = ray_options(ray, workers, shard_size)
    from vlmflow.api import run_flows

    with progress_bar("samples") as update:
        run = run_flows(
            load, data, settings=settings, images=images, out=out, name=name, limit=limit, progress=update, ray=on_ray
        )
    summary = run.summary
    console.print(
        f"[bold]{summary['samples']}[/] samples, {summary['correct']} correct, {summary['kept']} kept, "
        f"{summary['errors']} errors, {summary.get('flow_errors', 0)} flow errors, "
        f"{len(summary.get('route_errors', []))} configuration errors, {summary['flow_rows']} flow rows"
    )
    print_errors(summary)
    console.print(f"run directory: [bold]{run.path}[/]")
    if summary["samples"] and not summary["kept"]:
        console.print(
            "no sample was answered correctly, so no flows were computed (the paper keeps only correct "
            "answers); --keep-all computes them for every sample"
        )
    if plot and summary["flow_rows"]:
        from vlmflow.plots.flows import write_flow_figures

        for path in write_flow_figures(run.path):
            console.print(f"figure: {path}")
    raise typer.Exit(run_exit_code(summary))


def run_exit_code(summary: dict) -> int:
    """0 when flows were computed; 2 when a flow is a configuration error (no sample of a task can
    resolve it; the other flows were computed); 1 when no sample is kept or every flow failed."""
    if summary.get("route_errors"):
        for message in summary["route_errors"]:
            err_console.print(f"[bold red]configuration error:[/] {message}", highlight=False)
        return 2
    return 0 if summary.get("kept") and summary.get("flow_rows") else 1


def register(app: typer.Typer) -> None:
    """Add ``flows`` to ``app``."""
    app.command(
        "flows",
        epilog=examples(
            "vlmflow organism scenes scenes && vlmflow flows -m organism -d scenes/scenes_ChooseAttr.csv --window 1",
            'vlmflow flows -m llava-hf/llava-1.5-7b-hf -d gqa:ChooseAttr --images gqa/images -f "image->last" -f "question->last"',
        ),
    )(flows)
