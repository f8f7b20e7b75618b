"""Other libraries' progress bars and notices, kept quiet inside vlmflow's own calls.

Loading a checkpoint through ``transformers`` draws a "Loading weights" bar and logs notices that
mean nothing to someone running an experiment; the hub draws download bars. Inside
:func:`quiet_libraries` they are off, unless the ``vlmflow`` logger is enabled for INFO (``vlmflow
... --verbose``, or ``logging.basicConfig(level=logging.INFO)`` in a script): then everything is
shown as the libraries would show it. What was set before is restored afterwards, so a script's own
settings are left as they were. Python warnings are not touched (the test suite fails on a
``FutureWarning``, and a deprecation must stay visible).

>>> with quiet_libraries():
...     from transformers.utils import logging as hf_logging
...     hf_logging.is_progress_bar_enabled()
False
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["quiet_libraries"]


@contextmanager
def quiet_libraries(verbose: bool | None = None) -> Iterator[None]:
    """Inside the block, transformers' and the hub's progress bars and notices are off.

    ``verbose``: leave them on (default: whether the ``vlmflow`` logger is enabled for INFO).
    """
    if verbose is None:
        verbose = logging.getLogger("vlmflow").isEnabledFor(logging.INFO)
    if verbose:
        yield
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hub_bars_off = hub_utils.are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if not hub_bars_off:
            hub_utils.enable_progress_bars()
