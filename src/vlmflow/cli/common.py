"""What every CLI command shares: the console, logging set-up and the progress bar."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

if TYPE_CHECKING:
    from vlmflow.distributed import RayOptions

console = Console(stderr=False)
err_console = Console(stderr=True)


def setup_logging(verbose: bool) -> None:
    """Route library logs through rich; quiet transformers' own progress bars and notices."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(
        level=level, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False)], force=True
    )
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


@contextmanager
def progress_bar(unit: str) -> Iterator[Callable[[int, int, str], None]]:
    """A rich progress bar; yields ``update(done, total, message)``."""
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=False) as progress:
        task = progress.add_task("running", total=None)

        def update(done: int, total: int, message: str) -> None:
            progress.update(task, completed=done, total=total, description=message or "running")

        yield update


def print_errors(summary: Mapping[str, Any], shown: int = 3) -> None:
    """Print a run's error rows by stage and the first few reasons (all are in ``errors.parquet``)."""
    by_stage = summary.get("errors_by_stage") or {}
    if not by_stage:
        return
    stages = ", ".join(f"{stage} {count}" for stage, count in sorted(by_stage.items()))
    err_console.print(f"[yellow]errors by stage:[/] {stages}", highlight=False)
    for row in list(summary.get("error_rows") or [])[:shown]:
        where = f"{row['sample_id']}, {row['flow']}" if row.get("flow") else row["sample_id"]
        err_console.print(f"  {where} ({row['stage']}): {row['reason']}", highlight=False, markup=False)


# Options of every command that runs samples into a run directory (flows, lens, ...).
RAY_OPTION = typer.Option(
    None,
    "--ray",
    help="Run on Ray (pip install 'vlmflow\\[ray]'): auto (the running cluster), local (one on this machine), "
    "or the head's HOST:PORT / ray://HOST:10001. The run directory must be on a filesystem all nodes share.",
)
WORKERS_OPTION = typer.Option(
    None, "--workers", help="With --ray: model replicas. Default: one per GPU of the cluster, else one per CPU."
)
SHARD_SIZE_OPTION = typer.Option(
    None, "--shard-size", help="With --ray: samples per task. Default: about 4 tasks per replica, at most 32."
)


def ray_options(ray: str | None, workers: int | None, shard_size: int | None) -> RayOptions | None:
    """``--ray/--workers/--shard-size`` as :class:`~vlmflow.distributed.RayOptions` (None: no Ray)."""
    from vlmflow.errors import ConfigError

    if ray is None:
        if workers is not None or shard_size is not None:
            raise ConfigError("--workers and --shard-size need --ray (auto, local or an address)")
        return None
    from vlmflow.distributed import RayOptions

    return RayOptions(ray, workers=workers, shard_size=shard_size)
