"""Messages for the person running vlmflow, as opposed to logs for whoever debugs it.

A run that resumes, a lock left by a process that is gone, a demo folder that is replaced: things a
user should read when they happen, but that are neither errors nor warnings. The library logs them
at INFO on the ``vlmflow.notice`` logger (it never prints); the command line prints them as plain
lines; a script sees them when it configures logging at INFO.

>>> import logging
>>> logging.getLogger(NOTICE_LOGGER).name
'vlmflow.notice'
"""

from __future__ import annotations

import logging

__all__ = ["NOTICE_LOGGER", "notice"]

#: The logger of user-facing notices.
NOTICE_LOGGER = "vlmflow.notice"
_log = logging.getLogger(NOTICE_LOGGER)


def notice(message: str, *args: object) -> None:
    """Log a user-facing notice (``%``-style ``args`` as in :mod:`logging`).

    >>> notice("resuming %s: %d of %d samples already done", "runs/x", 5, 12)
    """
    _log.info(message, *args)
