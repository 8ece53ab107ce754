"""A progress bar over rounds (round, iteration, ETA, latest scores), off when not a terminal."""

from __future__ import annotations

import contextlib
import logging
import sys

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


def progress_bar(total: int, initial: int = 0, enabled: bool | str = "auto", desc: str = ""):
    """A tqdm bar over rounds; ``auto`` shows it only when stderr is a terminal."""
    disable = not sys.stderr.isatty() if enabled == "auto" else not enabled
    return tqdm(
        total=total, initial=initial, disable=disable, desc=desc, unit="round", dynamic_ncols=True
    )


@contextlib.contextmanager
def log_through(bar):
    """Log lines printed above the bar instead of onto its line (while it is shown)."""
    if bar.disable:
        yield
        return
    with logging_redirect_tqdm(loggers=[logging.root], tqdm_class=type(bar)):
        yield
