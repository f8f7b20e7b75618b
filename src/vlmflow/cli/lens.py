"""``vlmflow lens``: the logit-lens readout of answer emergence over a dataset into a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from vlmflow.cli.common import (
    RAY_OPTION,
    SHARD_SIZE_OPTION,
    WORKERS_OPTION,
    console,
    print_errors,
    progress_bar,
    ray_options,
    setup_logging,
)
from vlmflow.cli.options import settings_options
from vlmflow.cli.usage import examples
from vlmflow.experiments.settings import LensSettings
from vlmflow.load_spec import LoadSpec


@settings_options(load=LoadSpec, settings=LensSettings)
def lens(
    *,
    load: LoadSpec,
    data: str = typer.Option(..., "--data", "-d", help="Task CSV (released GQA layout) or gqa:TASK (packaged GQA files)."),
    images: Path | None = typer.Option(None, "--images", help="Folder with the images ({img_id}.jpg/.png). Default: beside the CSV."),
    settings: LensSettings,
    flows_run: Path | None = typer.Option(
        None, "--flows-run", help="A flows run directory over the same data: also draw the flows-over-lens figure."
    ),
    out: Path = typer.Option(Path("runs"), "--out", "-o", help="Parent folder of run directories."),
    name: str | None = typer.Option(None, "--name", help="Run directory name (default: derived from the spec)."),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N samples."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write the figures when done."),
    ray: str | None = RAY_OPTION,
    workers: int | None = WORKERS_OPTION,
    shard_size: int | None = SHARD_SIZE_OPTION,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
) -> None:
    """Read the answer's probability out of the residual stream at every layer (the paper's logit lens)."""
    setup_logging(verbose)
    on_ray = ray_options(ray, workers, shard_size)
    from vlmflow.api import run_lens

    if flows_run is not None:
        _check_flows_run(flows_run, data)
    with progress_bar("samples") as update:
        run = run_lens(
            load, data, settings=settings, images=images, out=out, name=name, limit=limit, progress=update, ray=on_ray
        )
    summary = run.summary
    console.print(
        f"[bold]{summary['samples']}[/] samples, {summary['correct']} correct, {summary['kept']} kept, "
        f"{summary['errors']} errors"
    )
    print_errors(summary)
    console.print(f"run directory: [bold]{run.path}[/]")
    _print_first_top1(run.path)
    if plot:
        from vlmflow.plots.lens import write_lens_figures

        for path in write_lens_figures(run.path, flows_run=flows_run):
            console.print(f"figure: {path}")


def _check_flows_run(flows_run: Path, data: str) -> None:
    """Refuse ``--flows-run`` before any work when it is not a flows run over the same data."""
    from vlmflow.errors import ConfigError
    from vlmflow.experiments.runner import data_digest
    from vlmflow.plots.lens import check_same_data
    from vlmflow.results.store import RunStore

    if not flows_run.is_dir():
        raise ConfigError(f"--flows-run {str(flows_run)!r} is not a directory")
    spec = RunStore.load(flows_run).spec
    check_same_data(spec, {"data": {"data": data, "sha256": data_digest(data)}}, str(flows_run), "this lens run")


def _print_first_top1(run_dir: Path) -> None:
    from vlmflow.experiments.lens import summarise_lens
    from vlmflow.results.store import RunStore

    store = RunStore.load(run_dir)
    if "lens" not in store.tables():
        return
    summary = summarise_lens(store.read("lens"))
    for readout, forms in summary.items():
        if not isinstance(forms, dict):
            continue
        parts = []
        for form in ("answer_any", "answer", "answer_capitalized", "generated"):
            entry: dict[str, Any] | None = forms.get(form)
            if entry and entry["median_first_top1"] is not None:
                parts.append(f"{form} {entry['median_first_top1']:g} ({entry['reach_top1']}/{entry['samples']})")
        if parts:
            console.print(f"first top-1 layer, median over samples, {readout}: " + ", ".join(parts))


def register(app: typer.Typer) -> None:
    """Add ``lens`` to ``app``."""
    app.command(
        "lens",
        epilog=examples(
            "vlmflow organism scenes scenes && vlmflow lens -m organism -d scenes/scenes_ChooseAttr.csv --group question",
            "vlmflow lens -m llava-hf/llava-1.5-7b-hf -d gqa:ChooseAttr --images gqa/images --flows-run runs/flows-llava-1.5-7b-hf-gqa-ChooseAttr-1a2b3c4d",
        ),
    )(lens)
