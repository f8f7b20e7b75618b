"""The ``vlmflow`` command line: a thin shell over the library.

Each subcommand lives in its own module under :mod:`vlmflow.cli` and registers itself on the Typer
app; heavy imports (torch, transformers, matplotlib) happen inside the commands, so ``vlmflow
--help`` is fast.

Exit status: 0 done; 1 the command ran but something failed (a failed study run, an error of the
operating system such as a full disk); 2 a usage error or a configuration vlmflow refuses (bad
option, unknown model, a run directory holding another run or in use); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import typer

from vlmflow.cli.usage import USAGE_EXIT, examples

app = typer.Typer(
    name="vlmflow",
    help="Cross-modal information flow in multimodal LLMs: attention knockout and logit lens.",
    epilog=examples(
        "vlmflow demo                     # the whole study on a small model shipped with vlmflow",
        "vlmflow flows --help             # one command's options and examples",
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# One module per command group; each defines ``register(app)``.
_COMMAND_MODULES = ("flows", "lens", "groups", "plot", "tiny", "gqa", "organism", "demo", "validate", "study", "models")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("vlmflow")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree without metadata
            number = "unknown"
        typer.echo(f"vlmflow {number}")
        raise typer.Exit(0)


@app.callback()
def _root(
    show_version: bool = typer.Option(
        False, "--version", "-V", callback=_version, is_eager=True, help="Print vlmflow's version and exit."
    ),
) -> None:
    """Cross-modal information flow in multimodal LLMs: attention knockout and logit lens."""


def _register_all() -> None:
    for name in _COMMAND_MODULES:
        importlib.import_module(f"vlmflow.cli.{name}").register(app)


_register_all()


def command() -> object:
    """The click command tree of the app, with tidied help pages (see :func:`~vlmflow.cli.usage.tidy_help`)."""
    from vlmflow.cli.usage import tidy_help

    root = typer.main.get_command(app)
    tidy_help(root)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (defaults to ``sys.argv[1:]``) and return the exit status.

    >>> main(["--version"])  # doctest: +SKIP
    vlmflow 0.1.0
    0
    """
    import sys

    from vlmflow.cli.common import err_console, print_error
    from vlmflow.cli.usage import is_help_request, is_usage_error, renew_spellings, usage_hint, usage_message
    from vlmflow.errors import VlmflowError

    root = command()
    args, notes = renew_spellings(list(argv) if argv is not None else sys.argv[1:], root)
    for note in notes:
        err_console.print(note, highlight=False, markup=False)
    try:
        result = root.main(args=args, prog_name="vlmflow", standalone_mode=False)  # type: ignore[attr-defined]
    except VlmflowError as exc:
        print_error(str(exc))
        return USAGE_EXIT
    except KeyboardInterrupt:  # typer turns Ctrl-C into exit 130 itself; older versions may not
        err_console.print("interrupted", highlight=False)
        return 130
    except Exception as exc:
        if is_help_request(exc):  # a group without its subcommand: its help page, exit status 2 (as click)
            text = str(exc.format_message())  # type: ignore[attr-defined]
            if text.strip():  # typer's rich help is printed as the error is made; click's is its message
                typer.echo(text)
            return USAGE_EXIT
        if is_usage_error(exc):
            print_error(usage_message(exc), hint=usage_hint(exc))
            return USAGE_EXIT
        if type(exc).__name__ == "Abort":
            return 130
        if isinstance(exc, OSError):  # the operating system refused (disk full, permission denied, ...)
            print_error(f"{exc.strerror or exc}{f': {exc.filename!r}' if exc.filename else ''}")
            return 1
        raise
    return int(result) if isinstance(result, int) else 0


def entry_point() -> None:
    """Console-script entry: exit with :func:`main`'s return code."""
    raise SystemExit(main())
