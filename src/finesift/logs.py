"""finesift's messages go through :mod:`logging`, to the ``finesift`` logger and its
children (``finesift.dedup``, ``finesift.stages``, ...).

The library never prints: without a handler of the application's (the package adds a
``NullHandler``) nothing is shown. A run's progress and warning messages are also handed to
the ``log`` callable of :func:`finesift.select` and the other entry points when one is
given (the callable then receives them *instead* of the logger, as before logging
existed, so nothing is shown twice); without one they go to the logger, a message that
reads ``warning: ...`` (also after a prefix such as ``harp: warning: ...``) at WARNING,
the rest at INFO. Details for ``finesift -v`` are logged at DEBUG.

The ``finesift`` command installs :func:`cli_logging`: a handler writing each message as it
is to stderr, at INFO (``-q``: WARNING, ``-v``: DEBUG).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Callable, Iterator

LOGGER = "finesift"

_WARNING = re.compile(r"(?:^|: )warning: ")


def is_warning(message: str) -> bool:
    """Whether a run's message is a warning (``warning: ...``, possibly prefixed)."""
    return bool(_WARNING.search(message))


def emit(message: str) -> None:
    """Log a run's message to the ``finesift`` logger: a warning at WARNING, else INFO."""
    logging.getLogger(LOGGER).log(logging.WARNING if is_warning(message) else logging.INFO,
                                  message)


def as_log(log: Callable[[str], None] | None) -> Callable[[str], None]:
    """The callable a run hands its messages to: the caller's, else :func:`emit`."""
    return emit if log is None else log


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a message comes (so a test capturing
    stderr, or a redirect made after start-up, sees it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


@contextlib.contextmanager
def cli_logging(verbosity: int = 0) -> Iterator[logging.Handler]:
    """The command line's logging while the block runs: messages of the ``finesift``
    logger to stderr as they are (no prefix), at INFO; ``verbosity`` < 0 (``-q``): warnings
    only; > 0 (``-v``): DEBUG too. The logger's level and handlers are restored after."""
    logger = logging.getLogger(LOGGER)
    handler = _StderrHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    before = logger.level
    logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)


__all__ = ["LOGGER", "as_log", "cli_logging", "emit", "is_warning"]
