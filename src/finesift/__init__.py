"""finesift: select the fine-tuning data that most reduces loss on your target task."""

from finesift.errors import FinesiftError, InputError, OptionError

__version__ = "0.1.0"


def select(*args, **kwargs):
    """Score a pool and select a subset; see :func:`finesift.api.select`."""
    from finesift.api import select as _select

    return _select(*args, **kwargs)


__all__ = ["FinesiftError", "InputError", "OptionError", "__version__", "select"]
