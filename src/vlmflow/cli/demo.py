"""``vlmflow demo``: the whole study on the shipped organism, on CPU, in about a minute."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmflow.cli.common import console, progress_bar, setup_logging
from vlmflow.cli.usage import examples


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Folder for the scenes, run directories, figures and summary."),
    per_task: int = typer.Option(12, "--per-task", "-n", help="Scene questions per task type."),
    quick: bool = typer.Option(False, "--quick", help="A smaller run (3 questions per task) for a smoke test."),
    seed: int | None = typer.Option(None, "--seed", help="Scene seed (default: the demo's)."),
    window: int | None = typer.Option(None, "--window", "-k", help="Layers per knockout window (default: the demo's)."),
    model: str = typer.Option("organism-planted", "--model", "-m", help="Checkpoint (default: the planted-route organism shipped with vlmflow; 'organism': the plain one)."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write the figures."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
) -> None:
    """Generate shape scenes, run the paper's six flows and the logit lens on the organism, write figures, a summary and report.html.

    The output folder is the demo's own: rerun with other options, the demo replaces what it wrote
    there; with the same options it resumes. It refuses a folder it did not write.
    """
    setup_logging(verbose)
    import torch

    from vlmflow.organism.demo import DEMO_SEED, DEMO_WINDOW, run_demo

    if torch.get_num_threads() > 4:
        torch.set_num_threads(4)  # a 1 M-parameter model gains nothing from more threads
    with progress_bar("samples") as update:
        result = run_demo(
            out,
            per_task=3 if quick else per_task,
            seed=DEMO_SEED if seed is None else seed,
            window=DEMO_WINDOW if window is None else window,
            model=model,
            progress=update,
            plot=plot,
        )
    from vlmflow.report.demo import write_demo_report

    write_demo_report(result)
    json_path, md_path = result.summary_files
    console.print(md_path.read_text(), highlight=False, markup=False)
    console.print(f"demo directory: {result.path}", highlight=False, markup=False)
    console.print(f"summary: {md_path} and {json_path}", highlight=False, markup=False)
    if result.figures:
        example = result.figures[0].parent
        console.print(f"figures: {len(result.figures)} PNGs in the runs' figures/ folders (e.g. {example})", highlight=False, markup=False)
    console.print(f"report: {result.report}  (open it in a browser)", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    """Add ``demo`` to ``app``."""
    app.command(
        "demo",
        epilog=examples(
            "vlmflow demo                       # about a minute on CPU; open runs/demo/report.html",
            "vlmflow demo --quick               # 3 questions per task type",
            "vlmflow demo --model organism --out runs/demo-organism",
        ),
    )(demo)
