"""Length-sorted batching: group examples of similar length to cut padding."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

AUTO_FALLBACK_ROWS = 8


def sorted_batches(
    examples: Sequence[Any],
    lengths: Sequence[int],
    *,
    batch_size: int | str,
    max_tokens: int | None = None,
    max_rows: Callable[[int], int] | None = None,
) -> Iterator[list[int]]:
    """Yield lists of indices into ``examples``, longest first, deterministic.

    Args:
        examples: the items (only their count is used).
        lengths: length of each item.
        batch_size: maximum rows per batch. ``"auto"``/``"auto:SIZE"`` (the scoring
            option, see :mod:`finesift.engine.budget`) reaching a caller that has no
            memory model (gradients, embeddings) means :data:`AUTO_FALLBACK_ROWS` rows.
        max_tokens: if set, also cap rows * longest length per batch.
        max_rows: if set, also cap rows at ``max_rows(longest)`` (e.g.
            :meth:`finesift.engine.budget.TokenBudget.rows_for`). Lengths only shrink
            within a batch, so the first item's length is the batch's longest.
    """
    if not isinstance(batch_size, int):
        from finesift.engine.budget import parse_batch_size

        rows, _ = parse_batch_size(batch_size)
        batch_size = AUTO_FALLBACK_ROWS if rows is None else rows
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    batch: list[int] = []
    longest = 0
    cap = batch_size
    for i in order.tolist():
        n = int(lengths[i])
        grow = max(longest, n)
        if batch and (
            len(batch) >= cap or (max_tokens is not None and grow * (len(batch) + 1) > max_tokens)
        ):
            yield batch
            batch, grow = [], n
        if not batch:
            cap = batch_size if max_rows is None else max(1, min(batch_size, int(max_rows(grow))))
        batch.append(i)
        longest = grow
    if batch:
        yield batch


def shuffled_batches(
    n: int, *, batch_size: int, rng: np.random.Generator
) -> Iterator[list[int]]:
    """Random batches for training (one epoch over ``n`` items)."""
    perm = rng.permutation(n)
    for s in range(0, n, batch_size):
        yield perm[s : s + batch_size].tolist()
