"""What every CLI command shares: the consoles, logging and notices, errors, and the progress bar."""

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

# soft_wrap: long paths and messages are never cut into lines by the console (the terminal wraps them).
console = Console(stderr=False, soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


class _NoticeHandler(logging.Handler):
    """Prints the library's user-facing notices (:mod:`vlmflow.notices`) as plain lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        err_console.print(record.getMessage(), highlight=False, markup=False)


def setup_logging(verbose: bool) -> None:
    """Route library logs through rich (INFO with ``verbose``, else WARNING) and print notices.

    Other libraries' bars and notices stay quiet inside vlmflow's calls unless ``verbose``
    (:func:`vlmflow.quiet.quiet_libraries` follows the ``vlmflow`` logger's level).
    """
    from vlmflow.notices import NOTICE_LOGGER

    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(
        level=level, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False)], force=True
    )
    notices = logging.getLogger(NOTICE_LOGGER)
    notices.handlers = [_NoticeHandler()]
    notices.setLevel(logging.INFO)
    notices.propagate = False


def print_error(message: str, *, hint: str | None = None) -> None:
    """``error: MESSAGE`` on stderr (one line however long; the terminal wraps it), then ``hint`` if any."""
    err_console.print("error: ", style="bold red", end="", highlight=False)
    err_console.print(message, highlight=False, markup=False)
    if hint:
        err_console.print(hint, highlight=False, markup=False)


@contextmanager
def progress_bar(unit: str) -> Iterator[Callable[[int, int, str], None]]:
    """A rich progress bar started at the first update; yields ``update(done, total, message)``.

    Nothing is drawn before the work starts, so an error found while checking the configuration or
    loading the model is printed alone. Ctrl-C inside the block stops the bar, prints what the
    interruption left (``interrupted after N of M samples ...`` when a run says so) and exits with
    status 130.
    """
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    progress = Progress(*columns, console=err_console, transient=False)
    task: list[Any] = []

    def update(done: int, total: int, message: str) -> None:
        if not task:
            progress.start()
            task.append(progress.add_task("running", total=total))
        progress.update(task[0], completed=done, total=total, description=message or "running")

    def stop() -> None:
        if task:  # a bar never started prints nothing, not even a blank line
            progress.stop()

    try:
        yield update
    except KeyboardInterrupt as exc:
        stop()
        from vlmflow.errors import RunInterrupted

        if isinstance(exc, RunInterrupted):
            err_console.print(str(exc), highlight=False, markup=False)
        else:
            err_console.print("interrupted before the first sample was computed", highlight=False)
        raise typer.Exit(130) from None
    finally:
        stop()


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
