"""``python -m vlmflow``: the command line, for environments without the ``vlmflow`` script on PATH."""

from vlmflow.cli.main import entry_point

entry_point()
