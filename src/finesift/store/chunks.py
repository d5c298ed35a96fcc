"""The pool's chunk grid, shard assignment and a resumable, atomic store of chunk results.

Scores are computed chunk by chunk. The grid is fixed by the pool alone:

* pool examples are sorted by length, longest first, ties by pool position (a stable
  sort), so each chunk holds examples of similar length and batches stay tight;
* that order is cut into chunks of ``chunk_size`` examples: chunk ``c`` holds sorted
  positions ``c * chunk_size ... (c + 1) * chunk_size - 1``;
* with ``--num-shards N``, chunk ``c`` belongs to shard ``c % N`` (round robin, so every
  shard gets long and short examples alike and the shards take about the same time).

An unsharded run scores every chunk, a shard run only its own. A chunk is always scored
on its own (its batches never mix with another chunk's examples), so a chunk's scores are
bit-identical whichever run, shard or Ray worker computes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finesift.errors import OptionError
from finesift.store.files import atomic_save_npy

DEFAULT_CHUNK = 1024
"""Chunk size of the grid for methods without a ``chunk_size`` option (one forward pass
per example: random, perplexity, uncertainty)."""


@dataclass(frozen=True)
class ShardSpec:
    """Which shard a run scores.

    Attributes:
        num_shards: N, the number of shards the pool is split into (>= 1).
        index: I, this run's shard, 0 <= I < N.
    """

    num_shards: int
    index: int

    def __post_init__(self) -> None:
        n, i = self.num_shards, self.index
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise OptionError(f"--num-shards must be a positive integer, got {n!r}")
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise OptionError(f"--shard-index must be in 0..{n - 1} for {n} shard(s), got {i!r}")

    def to_dict(self) -> dict[str, int]:
        return {"num_shards": self.num_shards, "index": self.index}


def chunk_grid(lengths: np.ndarray | list[int], chunk_size: int) -> list[np.ndarray]:
    """The pool positions of every chunk (see the module docstring).

    Args:
        lengths: one length (token count) per pool example.
        chunk_size: examples per chunk (the last chunk may be shorter).
    """
    if chunk_size < 1:
        raise OptionError(f"chunk size must be >= 1, got {chunk_size}")
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[s : s + chunk_size] for s in range(0, len(order), chunk_size)]


def shard_chunk_ids(n_chunks: int, shard: ShardSpec | None) -> list[int]:
    """The chunks a run scores: all of them, or those with ``c % N == I``."""
    if shard is None:
        return list(range(n_chunks))
    return [c for c in range(n_chunks) if c % shard.num_shards == shard.index]


def pack_ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """One float32 array holding ragged float32 arrays: their n lengths (exact below
    2**24), then their values."""
    counts = np.array([len(a) for a in arrays], dtype=np.float32)
    values = [np.asarray(a, dtype=np.float32) for a in arrays]
    return np.concatenate([counts, *values]) if arrays else np.zeros(0, dtype=np.float32)


def unpack_ragged(packed: np.ndarray, n: int, dtype: type = np.float32) -> list[np.ndarray] | None:
    """The ``n`` arrays of :func:`pack_ragged` (``None`` if ``packed`` does not hold n)."""
    if len(packed) < n:
        return None
    counts = packed[:n]
    if (counts < 0).any() or (counts != np.round(counts)).any():
        return None
    counts = counts.astype(np.int64)
    if int(counts.sum()) != len(packed) - n:
        return None
    return [a.astype(dtype) for a in np.split(packed[n:], np.cumsum(counts)[:-1])] if n else []


def shard_rows(lengths: np.ndarray | list[int], chunk_size: int, shard: ShardSpec | None) -> np.ndarray:
    """Sorted pool positions a run scores (every position when ``shard`` is ``None``)."""
    grid = chunk_grid(lengths, chunk_size)
    return grid_rows(grid, shard_chunk_ids(len(grid), shard))


def grid_rows(grid: list[np.ndarray], ids: list[int]) -> np.ndarray:
    """Sorted pool positions of the chunks ``ids`` of ``grid``."""
    if not ids:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate([grid[c] for c in ids])).astype(np.int64)


class ChunkStore:
    """Finished chunks as ``<prefix>-chunk<c>.npy`` files, written atomically.

    A result is written to a temporary file in the same folder and renamed over the final
    name (:func:`finesift.store.files.atomic_save_npy`), so a process killed at any
    moment (even mid-write) leaves either the complete file or none; a stray temporary
    file is ignored. A final file that
    cannot be read back or has the wrong shape (a foreign or damaged file) counts as
    missing, so the chunk is scored again.

    Args:
        prefix: path stem of the chunk files (``None``: keep nothing, no resume).
    """

    def __init__(self, prefix: Path | None) -> None:
        self.prefix = Path(prefix) if prefix is not None else None

    def path(self, chunk: int) -> Path | None:
        if self.prefix is None:
            return None
        return self.prefix.with_name(f"{self.prefix.name}-chunk{chunk:06d}.npy")

    def load(self, chunk: int, shape: tuple[int, ...] | None) -> np.ndarray | None:
        """The saved result of ``chunk`` if it exists and has ``shape`` (``None``: any
        shape), else ``None``."""
        path = self.path(chunk)
        if path is None or not path.exists():
            return None
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        return arr if shape is None or arr.shape == tuple(shape) else None

    def save(self, chunk: int, values: np.ndarray) -> None:
        """Write ``values`` for ``chunk`` (atomically; no-op without a prefix)."""
        path = self.path(chunk)
        if path is None:
            return
        # a temporary name of its own per process and call (several processes may write
        # chunks of one store), flushed to disk, then renamed
        atomic_save_npy(path, values, fsync=True)
