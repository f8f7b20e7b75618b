"""``vlmflow reproduce CONFIG`` (the whole study from one config) and ``vlmflow report STUDY_DIR``."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmflow.cli.common import (
    RAY_OPTION,
    SHARD_SIZE_OPTION,
    WORKERS_OPTION,
    console,
    progress_bar,
    ray_options,
    setup_logging,
)
from vlmflow.cli.usage import examples


def reproduce(
    config: str = typer.Argument(..., help="Study config (.yaml/.yml/.toml), or the name of a bundled one: organism, paper."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Study directory. Default: studies/<config name>."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the config and list the runs; compute nothing."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write report.html when the runs are done."),
    ray: str | None = RAY_OPTION,
    workers: int | None = WORKERS_OPTION,
    shard_size: int | None = SHARD_SIZE_OPTION,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
) -> None:
    """Run the study a config describes (models x tasks x flows, controls, lens) into one study directory.

    Resumable: rerunning the same command computes only what is missing.
    """
    setup_logging(verbose)
    on_ray = ray_options(ray, workers, shard_size)
    from vlmflow.study.bundled import resolve_config
    from vlmflow.study.config import describe_model, load_config
    from vlmflow.study.reproduce import planned_runs

    path = resolve_config(config)
    study = load_config(path)
    target = out if out is not None else Path("studies") / study.name
    plan = planned_runs(study)
    console.print(f"study [bold]{study.name}[/]: {len(study.models)} model(s) x {len(study.tasks)} task(s), {len(plan)} runs -> {target}")
    if dry_run:
        for model in study.models:
            console.print(f"  model {model.label}: {describe_model(model.spec)}", highlight=False, soft_wrap=True)
        for model, task, experiment in plan:
            source = task.data or f"synthetic {task.synthetic.task.value} (n={task.synthetic.n})"  # type: ignore[union-attr]
            console.print(f"  {model.label} ({model.model}) / {task.label} ({source}) / {experiment}", highlight=False)
        return
    from vlmflow.study.reproduce import reproduce as run_study

    with progress_bar("samples") as update:
        outcome = run_study(study, target, progress=update, ray=on_ray)
    console.print(f"{len(outcome.runs)} runs done, {len(outcome.failed)} failed; study directory: [bold]{target}[/]")
    for key, reason in outcome.failed.items():
        console.print(f"[red]failed[/] {key}: {reason}", highlight=False)
    if report and outcome.runs:
        from vlmflow.report.html import write_report

        console.print(f"report: [bold]{write_report(target)}[/]")
    if outcome.failed:
        raise typer.Exit(1)


def report(
    study_dir: Path = typer.Argument(..., help="A study directory written by `vlmflow reproduce`."),
    out: Path | None = typer.Option(None, "--out", "-o", help="HTML file to write. Default: STUDY_DIR/report.html."),
    format: list[str] | None = typer.Option(
        None, "--format", help="png, pdf or svg, for the figures under STUDY_DIR/figures (repeatable or comma-separated). Default: all three."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
) -> None:
    """Write one self-contained HTML report (works offline) of a study, and its figures as PNG/PDF/SVG."""
    setup_logging(verbose)
    from vlmflow.plots.common import check_formats
    from vlmflow.report.figures import FORMATS
    from vlmflow.report.html import write_report

    formats = check_formats([f for item in format for f in item.split(",") if f.strip()]) if format else FORMATS
    path = write_report(study_dir, out=out, formats=formats)
    console.print(f"report: [bold]{path}[/]")


def register(app: typer.Typer) -> None:
    """Add ``reproduce`` and ``report`` to ``app``."""
    app.command(
        "reproduce",
        epilog=examples(
            "vlmflow reproduce organism --out studies/organism",
            "vlmflow reproduce my-study.yaml --dry-run",
        ),
    )(reproduce)
    app.command(
        "report",
        epilog=examples("vlmflow report studies/organism", "vlmflow report studies/organism --format png --out report.html"),
    )(report)
