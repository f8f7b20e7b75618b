"""CLI commands: ``vlmflow gqa build`` (the six tasks from official GQA files) and ``vlmflow gqa stats``."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmflow.cli.common import console, setup_logging
from vlmflow.cli.usage import examples

_BUILD = "vlmflow gqa build -q val_balanced_questions.json --scene-graphs val_sceneGraphs.json -o tasks"
_STATS = "vlmflow gqa stats gqa:all"

gqa_app = typer.Typer(
    name="gqa",
    help="GQA tasks: build them from the official GQA files, summarise task files.",
    no_args_is_help=True,
    epilog=examples(_BUILD, _STATS),
)


def _parse_tasks(names: list[str] | None) -> list:
    from vlmflow.data.sample import TaskType
    from vlmflow.errors import ConfigError

    if not names:
        return list(TaskType)
    try:
        return [TaskType.parse(n) for n in names]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


@gqa_app.command("build", epilog=examples(_BUILD, "vlmflow gqa build -q val_balanced_questions.json --scene-graphs val_sceneGraphs.json --images gqa/images -t ChooseAttr -o tasks"))
def build(
    questions: list[Path] = typer.Option(
        ..., "--questions", "-q", help="GQA questions json ({split}_balanced_questions.json, _all_ or shards; repeatable)."
    ),
    scene_graphs: Path = typer.Option(..., "--scene-graphs", help="GQA {split}_sceneGraphs.json."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write one CSV per task into."),
    images: Path | None = typer.Option(
        None, "--images", help="GQA images folder: skip questions whose image is missing or has another size."
    ),
    task: list[str] | None = typer.Option(None, "--task", "-t", help="Task to build (repeatable). Default: all six."),
    max_per_task: int = typer.Option(1000, "--max-per-task", help="Keep a seeded random sample of at most N rows per task; 0 keeps all."),
    seed: int = typer.Option(0, "--seed", help="Seed of that sample."),
    split: str | None = typer.Option(None, "--split", help="Split name in the file names (default: from the questions file)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every skipped question."),
) -> None:
    """Select the six task types from GQA questions, fill objects, options and boxes, write released-layout CSVs."""
    setup_logging(verbose)
    from rich import box
    from rich.table import Table

    from vlmflow.data.gqa import build_tasks, load_questions, load_scene_graphs, split_name, write_tasks
    from vlmflow.errors import ConfigError

    tasks = _parse_tasks(task)
    for path in [*questions, scene_graphs]:
        if not path.is_file():
            raise ConfigError(f"GQA file {str(path)!r} does not exist")
    if images is not None and not images.is_dir():
        raise ConfigError(f"images folder {str(images)!r} does not exist")
    if max_per_task < 0:
        raise ConfigError(f"--max-per-task must be >= 0, got {max_per_task}")
    from vlmflow.data.gqa import PAPER_SELECTIONS

    try:
        loaded_questions = load_questions(questions, [PAPER_SELECTIONS[t] for t in tasks])
        graphs = load_scene_graphs(scene_graphs)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"cannot read the GQA files: {exc}") from None
    report = build_tasks(
        loaded_questions,
        graphs,
        tasks=tasks,
        max_per_task=max_per_task or None,
        seed=seed,
        check_image=_image_checker(images) if images is not None else None,
    )
    written = write_tasks(report, out, split or split_name(questions[0]))
    table = Table(title="GQA tasks", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for column in ("task", "matched types", "kept", "skipped (reason: count)"):
        table.add_column(column)
    for t in tasks:
        skipped = ", ".join(f"{k}: {n}" for k, n in report.skipped[t].most_common()) or "-"
        table.add_row(t.value, str(report.matched[t]), str(len(report.samples[t])), skipped)
    console.print(table)
    for path in written.values():
        console.print(f"written: {path}", highlight=False, soft_wrap=True)


def _image_checker(images: Path):  # noqa: ANN202 - returns the build_tasks callback
    from PIL import Image

    from vlmflow.data.sample import find_image
    from vlmflow.errors import SampleError

    def check(image_id: str, size: tuple[int, int]) -> str | None:
        try:
            path = find_image(images, image_id)
        except SampleError as exc:
            return exc.reason
        with Image.open(path) as image:
            if image.size != tuple(size):
                return f"image {path.name} is {image.size[0]}x{image.size[1]}, the scene graph says {size[0]}x{size[1]}"
        return None

    return check


@gqa_app.command("stats", epilog=examples(_STATS, "vlmflow gqa stats tasks/GQA_val_ChooseAttr.csv --mode resize"))
def stats(
    data: list[str] = typer.Argument(..., help="Task CSV files or gqa:TASK specs; gqa:all for the six packaged files."),
    mode: str = typer.Option("pad", "--mode", help="Image preprocessing: pad (LLaVA-1.5), resize, crop, or anyres (LLaVA-NeXT)."),
    view_size: int = typer.Option(336, "--view-size", help="Side of the processed square image (one view)."),
    patch_size: int = typer.Option(14, "--patch-size", help="Vision patch side."),
    patch_rule: str = typer.Option(
        "overlap", "--patch-rule", help="Rule of the related mean, min-max and empty columns: overlap or paper."
    ),
) -> None:
    """Rows, related-token counts under both patch rules (overlap, paper) and their difference, padding tokens."""
    setup_logging(False)
    from vlmflow.data.datasets import load_samples, released_specs
    from vlmflow.errors import ConfigError
    from vlmflow.load_spec import PATCH_RULES
    from vlmflow.positions.task_stats import STATS_MODES, task_stats

    if mode not in STATS_MODES:
        raise ConfigError(f"unknown --mode {mode!r}; valid: {', '.join(STATS_MODES)}")
    if patch_rule not in PATCH_RULES:
        raise ConfigError(f"unknown --patch-rule {patch_rule!r}; valid: {', '.join(PATCH_RULES)}")
    specs = [s for spec in data for s in (released_specs() if spec.lower() == "gqa:all" else (spec,))]
    rows = []
    with console.status("mapping boxes to tokens under both rules ..."):
        for spec in specs:
            result, name = load_samples(spec)
            rows.append(task_stats(result, name or spec, mode=mode, view_size=view_size, patch_size=patch_size, rule=patch_rule))  # type: ignore[arg-type]
            for err in result.errors[:5]:
                console.print(f"[yellow]{spec}[/] line {err.line}: {err.reason}", highlight=False)
            if len(result.errors) > 5:
                console.print(f"[yellow]{spec}[/]: {len(result.errors) - 5} more bad rows", highlight=False)
    n_tokens = "/".join(str(n) for n in sorted({s.n_tokens for s in rows}))
    per_sample = f"{n_tokens} image tokens per sample" if mode != "anyres" else f"median {n_tokens} image tokens per sample"
    table = _table(f"{per_sample} ({mode}, view {view_size}, patch {patch_size}), {patch_rule} rule")
    headers = ("task", "rows", "bad\nrows", "related\nmedian", "related\nmean", "related\nmin-max",
               "empty\nrelated", "padding\nmean", "absent\nobjects")
    for column in headers:
        table.add_column(column, justify="left" if column == "task" else "right", no_wrap=True)
    for s in rows:
        table.add_row(
            s.name, str(s.rows), str(s.read_errors), f"{s.related_median:g}", f"{s.related_mean:.1f}",
            f"{s.related_min}-{s.related_max}", str(s.empty_related), f"{s.padding_mean:.1f}", str(s.objects_absent),
        )
    console.print(table)
    rules = _table("Related tokens under the two patch rules: overlap (vlmflow's default) and paper (the official code's)")
    for column in ("task", "median\noverlap", "median\npaper", "rows\ndiffer", "mean\npaper - overlap", "max\n|difference|"):
        rules.add_column(column, justify="left" if column == "task" else "right", no_wrap=True)
    for s in rows:
        rules.add_row(
            s.name, f"{s.overlap_median:g}", f"{s.paper_median:g}", str(s.rows_differ), f"{s.difference_mean:+.2f}",
            str(s.difference_max),
        )
    console.print(rules)


def _table(title: str):  # noqa: ANN202 - a rich Table (rich is imported lazily)
    from rich import box
    from rich.table import Table

    return Table(title=title, box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)


def register(app: typer.Typer) -> None:
    """Add the ``gqa`` command group to ``app``."""
    app.add_typer(gqa_app, name="gqa")
