"""Overlap guard: a test set must share no example with the pool, the val set or the
training subset, or the measured improvement is memorisation.

Two records are duplicates when their text fields are equal after normalisation
(Unicode NFKC, case-folded, whitespace collapsed), whatever their shape: a GSM8K
``question``/``answer`` record and a chat with the same user and assistant turns are the
same example. For NER records the words count, not the tags (the same sentence with
other labels is still a leak).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from finesift.data.records import Record, record_text
from finesift.errors import FinesiftError


class OverlapError(FinesiftError):
    """The test set shares examples with data a method or the fine-tune may see."""


def content_hash(record: Record) -> str:
    """sha1 of the record's normalised text (:func:`finesift.data.records.record_text`
    with ``normalise=True``): equal for exact duplicates up to normalisation."""
    return hashlib.sha1(record_text(record, normalise=True).encode("utf-8")).hexdigest()


def find_duplicates(
    test: Sequence[Record], other: Sequence[Record]
) -> list[tuple[Record, Record]]:
    """Pairs ``(test record, other record)`` with the same content, in test order."""
    first: dict[str, Record] = {}
    for rec in other:
        first.setdefault(content_hash(rec), rec)
    pairs = []
    for rec in test:
        hit = first.get(content_hash(rec))
        if hit is not None:
            pairs.append((rec, hit))
    return pairs


def _files(records: Sequence[Record]) -> str:
    return ", ".join(dict.fromkeys(r.source for r in records)) or "(no records)"


def check_no_overlap(
    test: Sequence[Record],
    others: dict[str, Sequence[Record]],
    *,
    show: int = 3,
) -> None:
    """Raise :class:`OverlapError` if any test record duplicates a record of ``others``.

    Args:
        test: the test records.
        others: role (e.g. ``"pool source sharegpt"``, ``"val"``) -> its records.
        show: how many duplicate pairs the message lists.

    Raises:
        OverlapError: naming the test file(s), the other file(s), the number of
            duplicates and the first ``show`` pairs (file:line and id of both sides).
    """
    problems = []
    for role, records in others.items():
        pairs = find_duplicates(test, records)
        if not pairs:
            continue
        listed = "; ".join(
            f"test {t.where} (id {t.id}) = {role} {o.where} (id {o.id})" for t, o in pairs[:show]
        )
        more = f"; and {len(pairs) - show} more" if len(pairs) > show else ""
        problems.append(
            f"the test set ({_files(test)}) overlaps the {role} ({_files(records)}): "
            f"{len(pairs)} exact duplicate(s): {listed}{more}"
        )
    if problems:
        raise OverlapError(
            "\n".join(problems)
            + "\nremove these records from one side (the test set must stay unseen)"
        )
