"""``vlmflow flows``: run attention-knockout flows over a dataset into a run directory."""

from __future__ import annotations

from pathlib import Path

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
from vlmflow.positions.groups import Flow


def flows(
    model: str = typer.Option(..., "--model", "-m", help="HF model id or local checkpoint directory."),
    data: str = typer.Option(..., "--data", "-d", help="Task CSV (released GQA layout) or gqa:TASK (packaged GQA files)."),
    images: Path | None = typer.Option(None, "--images", help="Folder with the images ({img_id}.jpg/.png). Default: beside the CSV."),
    flow: list[str] | None = typer.Option(
        None, "--flow", "-f", help="Flow 'source->target' (repeatable). Default: the paper's six flows."
    ),
    window: int | None = typer.Option(None, "--window", "-k", help="Layers per window. Default: 7 for 32 layers, 9 for 40."),
    out: Path = typer.Option(Path("runs"), "--out", "-o", help="Parent folder of run directories."),
    name: str | None = typer.Option(None, "--name", help="Run directory name (default: derived from the spec)."),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N samples."),
    keep_all: bool = typer.Option(False, "--keep-all", help="Keep wrongly answered samples too (the paper drops them)."),
    engine: str = typer.Option("fast", "--engine", help="fast (exact, batched) or reference (one forward per window)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    attn: str = typer.Option("sdpa", "--attn", help="Attention implementation: sdpa or eager."),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision of the model."),
    allow_hub: bool = typer.Option(False, "--allow-hub", help="Allow downloading the model from the Hugging Face hub."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow Python code shipped with the checkpoint (config/processor) to run."
    ),
    template: str | None = typer.Option(None, "--template", help="Prompt template (default: the family's)."),
    image_mode: str | None = typer.Option(None, "--image-mode", help="Image preprocessing: LLaVA-1.5 pad (paper), resize or crop; LLaVA-NeXT anyres (paper) or nohd_nopad."),
    max_new_tokens: int = typer.Option(12, "--max-new-tokens", help="Greedy tokens for the baseline answer."),
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
            model,
            data,
            images=images,
            flows=[Flow.parse(f) for f in flow] if flow else None,
            window=window,
            out=out,
            name=name,
            limit=limit,
            keep_all=keep_all,
            engine=engine,
            max_new_tokens=max_new_tokens,
            dtype=dtype,
            device=device,
            attn_implementation=attn,
            template=template,
            image_mode=image_mode,
            revision=revision,
            allow_hub=allow_hub,
            trust_remote_code=trust_remote_code,
            progress=update,
            ray=on_ray,
        )
    summary = run.summary
    console.print(
        f"[bold]{summary['samples']}[/] samples, {summary['correct']} correct, {summary['kept']} kept, "
        f"{summary['errors']} errors"
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


def register(app: typer.Typer) -> None:
    """Add ``flows`` to ``app``."""
    app.command("flows")(flows)
