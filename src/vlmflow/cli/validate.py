"""``vlmflow validate``: the planted-route benchmark (does vlmflow find routes that are really there?)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from vlmflow.cli.common import console, progress_bar, setup_logging
from vlmflow.cli.usage import examples


def validate(
    model: str = typer.Option("organism-planted", "--model", "-m", help="Checkpoint whose folder declares planted routes (planted_routes.json)."),
    window: list[int] = typer.Option([1, 3], "--window", "-k", help="Knockout window size(s); repeat for several (default: 1 and 3)."),
    out: Path = typer.Option(Path("runs/validate"), "--out", "-o", help="Folder for the scenes, runs, validation.json and the figure."),
    per_task: int = typer.Option(12, "--per-task", "-n", help="Held-out scene questions per task type."),
    seed: int | None = typer.Option(None, "--seed", help="Scene seed (default: the benchmark's)."),
    correct_only: bool = typer.Option(False, "--correct-only", help="Score only correctly answered samples (the paper's filter)."),
    readouts: bool = typer.Option(True, "--readouts/--no-readouts", help="Also score attention weights and the logit lens."),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option("float32", "--dtype", help="auto, float32, bfloat16, float16."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
) -> None:
    """Score knockouts, attention weights and the logit lens against a model's planted routes."""
    setup_logging(verbose)
    from vlmflow.validation.benchmark import REPORT_FILE, VALIDATION_SEED, ValidationSettings, run_validation

    settings = ValidationSettings(
        windows=tuple(window),
        per_task=per_task,
        seed=VALIDATION_SEED if seed is None else seed,
        keep_all=not correct_only,
        readouts=readouts,
    )
    with progress_bar("samples") as update:
        result = run_validation(model, out, settings, progress=update, device=device, dtype=dtype)
    _print_report(result.report)
    console.print(f"report: {out / REPORT_FILE}", highlight=False, soft_wrap=True)
    if result.figure is not None:
        console.print(f"figure: {result.figure}", highlight=False, soft_wrap=True)


def _cell(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    samples = report["samples"]
    console.print(
        f"{report['model']}: {samples['n']} held-out questions ({samples['correct']} answered correctly, "
        f"{samples['kept']} scored)",
        highlight=False,
        soft_wrap=True,
    )
    for window, entry in report["windows"].items():
        table = Table(title=f"Knockouts vs planted bands, window {window}", title_justify="left")
        for name in ("flow", "band", "precision", "AUROC", "peak layer (error)", "max |change| %"):
            table.add_column(name, justify="left" if name in ("flow", "band") else "right")
        for flow, score in entry["flows"].items():
            error = "" if score["peak_error"] is None else f" ({score['peak_error']})"
            band = ",".join(map(str, score["band"])) or "none"
            table.add_row(flow, band, _cell(score["precision"]), _cell(score["auroc"]), f"{score['peak_layer']}{error}", f"{score['max_abs']:.1f}")
        o = entry["overall"]
        peaks = f"{o['peaks_in_band']}/{o['planted_flows']} in band"
        table.add_row("overall", "", _cell(o["precision"]), _cell(o["auroc"]), peaks, f"pooled AUROC {_cell(o['pooled_auroc'])}", style="bold")
        console.print(table)
    if "attention" in report:
        att = report["attention"]
        lines = [
            f"{flow}: precision {_cell(s['precision'])}, AUROC {_cell(s['auroc'])}, peak {s['peak_layer']}, max mass {s['max_abs']:.3f}"
            for flow, s in att["flows"].items()
        ]
        o = att["overall"]
        console.print(
            f"Attention weights vs planted bands: precision {_cell(o['precision'])}, AUROC {_cell(o['auroc'])} "
            f"(pooled {_cell(o['pooled_auroc'])})\n  " + "\n  ".join(lines),
            highlight=False,
            soft_wrap=True,
        )
    for readout, score in report.get("lens", {}).items():
        console.print(
            f"Logit lens ({readout}): the answer first becomes top-1 after the question->last band (boundary >= "
            f"{score['expected_from']}) in {100 * score['after_band']:.0f}% of samples, before it in "
            f"{100 * score['before_band']:.0f}% (the last position's guess before it reads the question), never in "
            f"{100 * score['never']:.0f}%; mean answer probability {score['p_before']:.2f} before the band, {score['p_after']:.2f} after",
            highlight=False,
            soft_wrap=True,
        )


def register(app: typer.Typer) -> None:
    """Add ``validate`` to ``app``."""
    app.command(
        "validate",
        epilog=examples("vlmflow validate", "vlmflow validate --model organism-planted --window 1 --window 3 --out runs/validate"),
    )(validate)
