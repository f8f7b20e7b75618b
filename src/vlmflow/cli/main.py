"""The ``vlmflow`` command line: a thin shell over the library.

Each subcommand lives in its own module under :mod:`vlmflow.cli` and registers itself on the Typer
app; heavy imports (torch, transformers) happen inside the commands, so ``vlmflow --help`` is fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import typer

app = typer.Typer(
    name="vlmflow",
    help="Cross-modal information flow in multimodal LLMs: attention knockout and logit lens.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# One module per command group; each defines ``register(app)``.
_COMMAND_MODULES = ("flows", "lens", "groups", "plot", "tiny", "gqa", "organism", "demo", "validate", "study", "models")


def _register_all() -> None:
    for name in _COMMAND_MODULES:
        importlib.import_module(f"vlmflow.cli.{name}").register(app)


_register_all()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (defaults to ``sys.argv[1:]``) and return the exit code.

    >>> main(["--help"])  # doctest: +SKIP
    0
    """
    import click

    from vlmflow.errors import VlmflowError

    try:
        result = app(args=list(argv) if argv is not None else None, standalone_mode=False)
    except VlmflowError as exc:
        from vlmflow.cli.common import err_console

        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return int(exc.exit_code)
    except click.exceptions.Abort:
        return 130
    return int(result) if isinstance(result, int) else 0


def entry_point() -> None:
    """Console-script entry: exit with :func:`main`'s return code."""
    raise SystemExit(main())
