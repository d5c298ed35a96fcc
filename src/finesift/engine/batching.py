"""Length-sorted batching: group examples of similar length to cut padding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


def sorted_batches(
    examples: Sequence[Any],
    lengths: Sequence[int],
    *,
    batch_size: int,
    max_tokens: int | None = None,
) -> Iterator[list[int]]:
    """Yield lists of indices into ``examples``, longest first, deterministic.

    Args:
        examples: the items (only their count is used).
        lengths: length of each item.
        batch_size: maximum rows per batch.
        max_tokens: if set, also cap rows * longest length per batch.
    """
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    batch: list[int] = []
    longest = 0
    for i in order.tolist():
        n = int(lengths[i])
        grow = max(longest, n)
        if batch and (
            len(batch) >= batch_size or (max_tokens is not None and grow * (len(batch) + 1) > max_tokens)
        ):
            yield batch
            batch, grow = [], n
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
