"""The plain texts of records (:func:`finesift.data.records.record_text`), for methods
that look at words rather than tokens (``dsir``, ``embed`` with the MiniLM embedder)."""

from __future__ import annotations

from collections.abc import Sequence

from finesift.data.records import Record, record_text
from finesift.errors import OptionError


def texts_of(records: Sequence[Record], n_expected: int, role: str, method: str) -> list[str]:
    """The texts of ``records``, checking they are aligned with the encoded examples.

    Raises:
        OptionError: the context carries no records (or not one per example).
    """
    if len(records) != n_expected:
        raise OptionError(
            f"{method} reads the {role} records' text, but the method context has "
            f"{len(records)} {role} records for {n_expected} examples"
        )
    return [record_text(r) for r in records]
