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
    n: int, *, batch_size: int, rng: np.random.Generator,
    lengths: Sequence[int] | None = None, max_tokens: int | None = None,
) -> Iterator[list[int]]:
    """Random batches for training (one epoch over ``n`` items). With ``lengths`` and
    ``max_tokens``, a batch also ends before its rows x longest length would pass
    ``max_tokens`` (at least one item a batch); where no batch reaches that, the batches
    are the same as without it."""
    perm = rng.permutation(n)
    if lengths is None or max_tokens is None:
        for s in range(0, n, batch_size):
            yield perm[s : s + batch_size].tolist()
        return
    batch: list[int] = []
    longest = 0
    for i in perm.tolist():
        grow = max(longest, int(lengths[i]))
        if batch and (len(batch) >= batch_size or grow * (len(batch) + 1) > max_tokens):
            yield batch
            batch, grow = [], int(lengths[i])
        batch.append(i)
        longest = grow
    if batch:
        yield batch


def oom_errors() -> tuple[type[BaseException], ...]:
    """The exceptions torch raises when a device runs out of memory
    (``torch.OutOfMemoryError``; ``torch.cuda.OutOfMemoryError`` on older torch)."""
    import torch

    found = [getattr(torch, "OutOfMemoryError", None),
             getattr(torch.cuda, "OutOfMemoryError", None)]
    return tuple(dict.fromkeys(e for e in found if isinstance(e, type)))


class OomBackoff:
    """Batches that shrink after running out of memory instead of crashing the run.

    :meth:`run` runs one batch; when it raises an out-of-memory error, the batch is cut in
    halves and each half run in turn (halving again as needed, down to one row). What
    fitted is remembered as a cap on rows x longest length, so later batches (shorter,
    in length-sorted order) are cut to that size up front rather than failing again.
    The first back-off is logged once (``logger``). One row that does not fit raises
    an :class:`~finesift.errors.OptionError` that names its length.

    Args:
        desc: names the pass in the message (``scoring``).
        device: the device, named in the message.
        logger: receives the one warning (default: this module's logger).
    """

    def __init__(self, desc: str = "scoring", device: str = "cpu", logger: Any = None) -> None:
        import logging

        self.desc = desc
        self.device = device
        self.logger = logger or logging.getLogger(__name__)
        self.max_tokens: int | None = None  # rows x longest that fitted after a back-off
        self.backoffs = 0
        self._errors = oom_errors()

    def _cut(self, idx: list[int], lengths: Sequence[int]) -> list[list[int]]:
        """``idx`` in parts of at most :attr:`max_tokens` rows x longest length."""
        longest = max(int(lengths[i]) for i in idx)
        if self.max_tokens is None or len(idx) * longest <= self.max_tokens:
            return [idx]
        rows = max(1, self.max_tokens // max(1, longest))
        return [idx[s: s + rows] for s in range(0, len(idx), rows)]

    def run(self, idx: list[int], lengths: Sequence[int], fn: Callable[[list[int]], Any]) -> None:
        """Run ``fn`` on the rows ``idx`` of one batch (``lengths[i]``: row i's length), in
        smaller parts if it runs out of memory; ``fn`` must store its results only once it
        succeeded."""
        pending = self._cut(list(idx), lengths)
        while pending:
            part = pending.pop(0)
            failed = None
            try:
                fn(part)
            except self._errors as exc:
                failed = str(exc) or type(exc).__name__  # not exc: its frames hold tensors
            if failed is None:
                continue
            # outside the except block: the traceback (and the batch's tensors) is freed
            _free_device_memory(self.device)
            longest = max(int(lengths[i]) for i in part)
            if len(part) == 1:
                from finesift.errors import OptionError

                raise OptionError(
                    f"{self.desc}: out of memory on {self.device} with a single example of "
                    f"{longest} tokens; lower --max-length, load the model in bf16 "
                    f"(--dtype bf16) or use a device with more memory ({failed})") from None
            half = (len(part) + 1) // 2
            self.max_tokens = half * longest
            self.backoffs += 1
            if self.backoffs == 1:
                self.logger.warning(
                    "%s: out of memory on %s with a batch of %d rows of up to %d tokens; "
                    "retrying in halves (and capping later batches at %d tokens)",
                    self.desc, self.device, len(part), longest, self.max_tokens)
            # the halves, then what was still waiting, cut to the new cap
            pending = [p for q in [part[:half], part[half:], *pending]
                       for p in self._cut(q, lengths)]


def _free_device_memory(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
