"""finesift: select the fine-tuning data that most reduces loss on your target task."""

# The ``finesift.select`` subpackage (strategies) is imported before the function of the
# same name is defined: importing a subpackage for the first time sets it as an attribute
# of its parent package, which would otherwise replace ``finesift.select()`` with the
# module during the first call (the second call then fails: "module is not callable").
import logging as _logging

from finesift import select as _select_package  # noqa: F401
from finesift.errors import FinesiftError, InputError, OptionError

# the library logs to "finesift" and its children, and shows nothing unless the
# application adds a handler (the finesift command does: finesift.logs.cli_logging)
_logging.getLogger("finesift").addHandler(_logging.NullHandler())

__version__ = "0.2.0"


def select(*args, **kwargs):
    """Score a pool and select a subset; see :func:`finesift.api.select`."""
    from finesift.api import select as _select

    return _select(*args, **kwargs)


def estimate(*args, **kwargs):
    """The projected wall time, peak memory and disk of :func:`select` with the same
    arguments, measured on this machine without doing the run's work; see
    :func:`finesift.estimator.estimate` (``finesift select --estimate``)."""
    from finesift.estimator import estimate as _estimate

    return _estimate(*args, **kwargs)


__all__ = ["FinesiftError", "InputError", "OptionError", "__version__", "estimate", "select"]
