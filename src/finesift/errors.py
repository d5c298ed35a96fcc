"""finesift's exceptions. Every user-facing failure is a :class:`FinesiftError`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any


class FinesiftError(Exception):
    """Base class of every error finesift raises on purpose (bad input, bad options)."""


class InputError(FinesiftError):
    """A problem with an input file or record.

    Args:
        path: the file (or folder) the record came from.
        message: what is wrong and what was expected.
        line: 1-based line number in the file, where the format has lines.
        record: the record's id or 0-based row index, where lines do not apply.
    """

    def __init__(
        self,
        path: str,
        message: str,
        *,
        line: int | None = None,
        record: str | int | None = None,
    ) -> None:
        self.path = str(path)
        self.line = line
        self.record = record
        where = self.path
        if line is not None:
            where += f":{line}"
        if record is not None:
            where += f" (record {record})"
        self.message = message
        super().__init__(f"{where}: {message}")


class OptionError(FinesiftError):
    """An invalid option or combination of options (budget, method name, ...)."""


@contextlib.contextmanager
def loading(path: Any, what: str) -> Iterator[None]:
    """Turn transformers' errors for a broken model folder into an :class:`OptionError`
    naming the folder and what could not be loaded (``"model"``, ``"tokenizer"``)."""
    try:
        yield
    except (OSError, ValueError) as exc:
        detail = " ".join(str(exc).split())
        raise OptionError(f"--model {path}: cannot load the {what}: {detail}") from exc


def check_choice(value: Any, choices: Sequence[Any], what: str, *,
                 error: Callable[[str], Exception] = OptionError) -> Any:
    """``value`` if it is one of ``choices``, else raise
    ``error("{what} must be one of a, b, got 'c'")`` (``what`` names the option, with
    its owner's prefix: ``"tov: mode"``, ``"--dtype"``)."""
    if value not in choices:
        raise error(f"{what} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value
