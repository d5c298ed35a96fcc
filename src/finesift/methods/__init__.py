"""Selection methods. Importing this package registers the built-in ones."""

from finesift.methods import dsir as _dsir  # noqa: F401
from finesift.methods import embed as _embed  # noqa: F401
from finesift.methods import harp as _harp  # noqa: F401
from finesift.methods import less as _less  # noqa: F401
from finesift.methods import perplexity as _perplexity  # noqa: F401
from finesift.methods import random as _random  # noqa: F401
from finesift.methods import tov as _tov  # noqa: F401
from finesift.methods import uncertainty as _uncertainty  # noqa: F401
from finesift.methods.base import (
    REGISTRY,
    Method,
    MethodContext,
    MethodResult,
    available,
    get_method,
    register,
)

__all__ = [
    "REGISTRY",
    "Method",
    "MethodContext",
    "MethodResult",
    "available",
    "get_method",
    "register",
]
