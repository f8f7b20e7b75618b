"""Exception types raised by vlmflow.

Two kinds of problem are kept apart on purpose:

* :class:`ConfigError` — the run as asked for cannot be done (unknown model family, an attention
  backend that would ignore the knockout mask, a bad flow name). Raised before any work starts.
* :class:`SampleError` — one sample cannot be processed (image missing, question not found in the
  prompt, empty related-patch set). A long run records it as an error row and goes on.

Every message names the bad value and, where there is a finite set, what would be valid.
"""

from __future__ import annotations


class VlmflowError(Exception):
    """Base class of every error vlmflow raises on purpose."""


class ConfigError(VlmflowError, ValueError):
    """The requested run is invalid as a whole; nothing should be computed.

    >>> raise ConfigError("unknown flow group 'pixels'; valid: image, question, last")
    Traceback (most recent call last):
    ...
    vlmflow.errors.ConfigError: unknown flow group 'pixels'; valid: image, question, last
    """


class UnsupportedModelError(ConfigError):
    """No adapter supports this model, or the adapter refuses it (and says why)."""


class SampleError(VlmflowError, ValueError):
    """One sample cannot be processed; ``stage`` says where it failed.

    >>> err = SampleError("image file not found: 'x.jpg'", stage="image")
    >>> err.stage
    'image'
    """

    def __init__(self, reason: str, *, stage: str = "prepare") -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGINT) stopped a run; what was committed is kept and rerunning resumes it.

    A :class:`KeyboardInterrupt`, so whatever stops on Ctrl-C still stops (a notebook, a study that
    would otherwise go on to its next run); the message says how far the run got.

    >>> str(RunInterrupted("runs/x", done=5, total=12))
    "interrupted after 5 of 12 samples of 'runs/x'; rerun the same command to resume"
    """

    def __init__(self, path: object, *, done: int, total: int) -> None:
        self.path, self.done, self.total = path, done, total
        super().__init__(
            f"interrupted after {done} of {total} samples of {str(path)!r}; rerun the same command to resume"
        )
