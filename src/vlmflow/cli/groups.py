"""``vlmflow groups``: one sample's position groups, their tokens, and the image patches of image groups."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmflow.cli.common import console, setup_logging
from vlmflow.cli.options import settings_options
from vlmflow.cli.usage import examples
from vlmflow.load_spec import LoadSpec


@settings_options(load=LoadSpec)
def groups(
    *,
    load: LoadSpec,
    data: str = typer.Option(..., "--data", "-d", help="Data file (CSV or JSONL, docs/data.md) or gqa:TASK."),
    images: Path | None = typer.Option(None, "--images", help="Folder with the images. Default: beside the data file."),
    sample: str | None = typer.Option(None, "--sample", "-s", help="Sample id (question_id). Default: the first sample."),
    group: list[str] | None = typer.Option(
        None, "--group", "-g", help="Group expression to show, e.g. 'text:\"red\"' or 'question[0:2]' (repeatable). Default: every named group."
    ),
    out: Path = typer.Option(Path("groups"), "--out", "-o", help="Folder for the PNGs of image groups."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log details."),
) -> None:
    """Print each group's positions (as Python slices) and tokens; outline image groups' patches in PNGs."""
    setup_logging(verbose)
    from vlmflow.api import show_groups
    from vlmflow.positions.expressions import parse_expression

    expressions = [parse_expression(text) for text in group] if group else None  # parsed once, at the edge
    report = show_groups(load, data, sample=sample, groups=expressions, images=images, out=out)
    console.print(report.table(), highlight=False, markup=False, soft_wrap=True)
    for view in report.groups:
        for path in view.pictures:
            console.print(f"figure: {path}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``groups`` to ``app``."""
    app.command(
        "groups",
        epilog=examples(
            "vlmflow organism scenes scenes && vlmflow groups -m organism -d scenes/scenes_ChooseAttr.csv",
            "vlmflow groups -m organism -d scenes/scenes_ChooseAttr.csv --sample 1000000 -g 'text:\"red\"' -g 'question[0:2]'",
        ),
    )(groups)
