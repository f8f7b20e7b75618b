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
from vlmflow.positions.groups import Group


def lens(
    model: str = typer.Option(..., "--model", "-m", help="HF model id or local checkpoint directory."),
    data: str = typer.Option(..., "--data", "-d", help="Task CSV (released GQA layout) or gqa:TASK (packaged GQA files)."),
    images: Path | None = typer.Option(None, "--images", help="Folder with the images ({img_id}.jpg/.png). Default: beside the CSV."),
    readout: list[str] | None = typer.Option(
        None, "--readout", "-r", help="raw (the paper's: no final norm below the top layer) or normed (repeatable). Default: both."
    ),
    top_k: int = typer.Option(10, "--top-k", help="Top tokens kept per position and layer."),
    group: list[str] | None = typer.Option(
        None, "--group", "-g", help="Also read every position of this group, e.g. question (repeatable)."
    ),
    attention: bool = typer.Option(False, "--attention/--no-attention", help="Also record group-to-group attention mass per layer."),
    attention_target: list[str] | None = typer.Option(
        None, "--attention-target", help="Query group of the attention summaries (repeatable). Default: image, question, last."
    ),
    attention_source: list[str] | None = typer.Option(
        None, "--attention-source", help="Key group of the attention summaries (repeatable). Default: system, image, related, other, question, suffix, last."
    ),
    literal_first_piece: bool = typer.Option(
        False, "--literal-first-piece", help="Track encode(word)[0] even when it is a bare word-boundary piece such as '▁'."
    ),
    flows_run: Path | None = typer.Option(
        None, "--flows-run", help="A flows run directory over the same data: also draw the flows-over-lens figure."
    ),
    out: Path = typer.Option(Path("runs"), "--out", "-o", help="Parent folder of run directories."),
    name: str | None = typer.Option(None, "--name", help="Run directory name (default: derived from the spec)."),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N samples."),
    keep_all: bool = typer.Option(False, "--keep-all", help="Keep wrongly answered samples too (the paper drops them)."),
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
    from vlmflow.errors import ConfigError
    from vlmflow.experiments.attention import DEFAULT_SOURCES, DEFAULT_TARGETS, AttentionSettings

    if flows_run is not None and not flows_run.is_dir():
        raise ConfigError(f"--flows-run {str(flows_run)!r} is not a directory")
    attention_settings = None
    if attention or attention_target or attention_source:
        attention_settings = AttentionSettings(
            targets=tuple(Group.parse(g) for g in attention_target) if attention_target else DEFAULT_TARGETS,
            sources=tuple(Group.parse(g) for g in attention_source) if attention_source else DEFAULT_SOURCES,
        )
    with progress_bar("samples") as update:
        run = run_lens(
            model,
            data,
            images=images,
            readouts=readout or ("raw", "normed"),
            top_k=top_k,
            groups=[Group.parse(g) for g in group] if group else (),
            attention=attention_settings or False,
            literal_first_piece=literal_first_piece,
            out=out,
            name=name,
            limit=limit,
            keep_all=keep_all,
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
    _print_first_top1(run.path)
    if plot:
        from vlmflow.plots.lens import write_lens_figures

        for path in write_lens_figures(run.path, flows_run=flows_run):
            console.print(f"figure: {path}")


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
    app.command("lens")(lens)
