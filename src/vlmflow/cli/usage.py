"""How the command line talks about itself: one-line usage errors, and help pages that read well.

Usage errors are printed as git and pytest print theirs: the message (with "did you mean" when a
command or option is mistyped) and where to find help, at most two lines, exit status 2::

    error: no such option '--windw' (did you mean '--window'?)
    see 'vlmflow flows --help'

Typer raises its own copies of click's exceptions (not subclasses of click's), older typers raise
click's: both are recognised by their class names, so the shape of the message does not depend on
which one is installed.

Help pages: options show a metavar named after the option (``--window WINDOW``, as argparse does),
on/off flags none (no ``<bool>``), and every command ends with examples (:func:`examples`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from typing import Any

#: Exit status of a usage error (as click, argparse and pytest use it).
USAGE_EXIT = 2
#: The help options of every command.
HELP_OPTIONS = ("-h", "--help")


def examples(*lines: str) -> str:
    """The epilog of a help page: ``Examples`` and one command per line.

    >>> print(examples("vlmflow demo --quick"))
    Examples:
    <BLANKLINE>
      vlmflow demo --quick
    """
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in lines)


def _class_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def is_usage_error(exc: BaseException) -> bool:
    """Whether ``exc`` is click's or typer's ``UsageError`` (a bad command line)."""
    return "UsageError" in _class_names(exc) and hasattr(exc, "format_message")


def is_help_request(exc: BaseException) -> bool:
    """Whether ``exc`` asks for the help page: a command group called without a subcommand."""
    return "NoArgsIsHelpError" in _class_names(exc)


def usage_message(exc: Any) -> str:
    """The one-line message of a usage error, lower-cased first word, with "did you mean" if any.

    >>> class NoSuchOption(Exception):
    ...     def __init__(self):
    ...         self.option_name, self.possibilities, self.message = "--windw", ["--window"], "No such option: --windw"
    ...     def format_message(self):
    ...         return self.message
    >>> usage_message(NoSuchOption())
    "no such option '--windw' (did you mean '--window'?)"
    """
    names = _class_names(exc)
    if "NoSuchOption" in names:
        message = f"no such option '{exc.option_name}'"
        possibilities = sorted(getattr(exc, "possibilities", None) or [])
        if possibilities:
            message += f" (did you mean {' or '.join(repr(p) for p in possibilities[:3])}?)"
        return message
    message = str(exc.format_message()).strip()
    command = re.match(r"No such command '([^']+)'\.?(.*)$", message)
    if command:
        wrong, rest = command.group(1), command.group(2).strip()
        suggestion = re.search(r"Did you mean '([^']+)'", rest)
        choices = _subcommands(getattr(exc, "ctx", None))
        close = [suggestion.group(1)] if suggestion else difflib.get_close_matches(wrong, choices, n=1)
        message = f"no such command '{wrong}'"
        if close:
            message += f" (did you mean '{close[0]}'?)"
        elif choices:
            message += f"; commands: {', '.join(choices)}"
        return message
    message = " ".join(_with_value(exc, message).split()).rstrip(".")  # one line, no full stop (as the others)
    return message[:1].lower() + message[1:] if message[:2] != message[:2].upper() else message


#: What a value failed to be, by the error type of the validation error behind typer's BadParameter.
_NOT_A = {"int_parsing": "an integer", "float_parsing": "a number", "bool_parsing": "true or false"}


def _with_value(exc: Any, message: str) -> str:
    """``Invalid value for '--window': 'abc' is not an integer`` where typer only says what was expected."""
    errors = getattr(exc.__cause__, "errors", None)
    head = re.match(r"(Invalid value for .+?): ", message)
    if not callable(errors) or head is None:
        return message
    try:
        first = errors()[0]
    except (IndexError, TypeError):
        return message
    if "input" not in first:
        return message
    what = _NOT_A.get(str(first.get("type")))
    detail = f"is not {what}" if what else f"({str(first.get('msg', '')).lower()})"
    return f"{head.group(1)}: {first['input']!r} {detail}"


def _subcommands(ctx: Any) -> list[str]:
    command = getattr(ctx, "command", None)
    listed = getattr(command, "list_commands", None)
    return sorted(listed(ctx)) if listed is not None else []


def usage_hint(exc: Any, prog: str = "vlmflow") -> str:
    """Where to read more: ``see 'vlmflow flows --help'`` for the command the error is about."""
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None) or prog
    return f"see '{path} --help'"


def walk_commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """``(path, command)`` for ``command`` and every subcommand below it (``()`` is the root)."""
    yield path, command
    for name, sub in sorted((getattr(command, "commands", None) or {}).items()):
        if not getattr(sub, "hidden", False):
            yield from walk_commands(sub, (*path, name))


def tidy_help(root: Any) -> None:
    """Metavars of every option and argument below ``root``: none for flags, else the option's name.

    ``--window WINDOW``, ``--flow FLOW``, ``RUN_DIR`` (argparse's convention), never ``<bool>`` or
    ``<list[str]>``. An option that declares its own metavar keeps it. Every command takes ``-h``
    as well as ``--help``.
    """
    for _, command in walk_commands(root):
        params = list(getattr(command, "params", []))
        settings = getattr(command, "context_settings", None)
        if settings is not None:
            settings.setdefault("help_option_names", list(HELP_OPTIONS))
        context_class = getattr(command, "context_class", None)
        if context_class is not None and hasattr(command, "get_help_option"):
            help_option = command.get_help_option(context_class(command, help_option_names=list(HELP_OPTIONS)))
            if help_option is not None:
                params.append(help_option)
        for param in params:
            if getattr(param, "is_flag", False) or getattr(param, "count", False):
                param.metavar = ""
            elif param.metavar is None:
                param.metavar = _metavar(param)
            if getattr(param, "param_type_name", "") == "argument" and hasattr(param, "display_type_rich"):
                # typer shows an argument's Python type beside its name (<path>, <list[str]>): the name says enough
                param.display_type_rich = lambda ctx: None


def _metavar(param: Any) -> str:
    longs = [o for o in getattr(param, "opts", []) if o.startswith("--")]
    name = longs[0][2:] if longs else str(param.name)
    return name.upper().replace("-", "_")


#: Old spellings still accepted, by command path: ``{(command path): {old: new}}``. Each use prints a
#: note; the option keeps only its new spelling in the help pages. ``-f`` means ``--flow`` wherever
#: it exists, ``-g`` ``--group``, and every figure-format option is ``--format``.
DEPRECATED: dict[tuple[str, ...], dict[str, str]] = {
    ("plot",): {"-f": "--format"},
    ("report",): {"--formats": "--format"},
    ("gqa", "build"): {"-g": "--scene-graphs"},
}


def renew_spellings(args: list[str], root: Any) -> tuple[list[str], list[str]]:
    """``args`` with deprecated option spellings replaced (:data:`DEPRECATED`), and a note for each.

    ``root`` is the command tree (its ``commands`` tell where the command path ends).

    >>> from types import SimpleNamespace
    >>> renew_spellings(["plot", "runs/x", "-f", "svg"], SimpleNamespace(commands={"plot": SimpleNamespace()}))
    (['plot', 'runs/x', '--format', 'svg'], ["note: 'vlmflow plot -f' is deprecated; use --format"])
    """
    path: list[str] = []
    command = root
    for arg in args:
        commands = getattr(command, "commands", None) or {}
        if arg not in commands:
            break
        path.append(arg)
        command = commands[arg]
    renames = DEPRECATED.get(tuple(path), {})
    out, notes = list(args[: len(path)]), []
    for i, arg in enumerate(args[len(path) :]):
        if arg == "--":
            out += args[len(path) + i :]
            break
        new = arg
        for old, replacement in renames.items():
            if arg == old:
                new = replacement
            elif arg.startswith(f"{old}="):
                new = replacement + arg[len(old) :]
            elif len(old) == 2 and arg.startswith(old) and not arg.startswith("--"):
                new = f"{replacement}={arg[2:]}"  # -fsvg
            if new != arg:
                notes.append(f"note: 'vlmflow {' '.join(path)} {old}' is deprecated; use {replacement}")
                break
        out.append(new)
    return out, notes
