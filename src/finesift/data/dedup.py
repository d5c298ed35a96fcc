"""Duplicates in the pool, and target examples that are also in the pool.

Two records are compared by their text (whatever their shape: the caller turns each into
one string, :func:`finesift.data.records.record_text` in a run), normalised as the
overlap guard does (Unicode NFKC, case-folded, whitespace collapsed):

* **exact duplicates**: equal normalised texts. Always found.
* **near duplicates**: the Jaccard similarity of the two texts' sets of character 5-grams
  (:data:`SHINGLE` characters of the normalised text) is at least ``threshold``. Candidate
  pairs come from a MinHash LSH index (``datasketch``: :data:`NUM_PERM` permutations, bands
  tuned for recall at the threshold), and every candidate is then checked with the exact
  Jaccard of the two shingle sets, so no pair below the threshold is ever reported. At the
  default threshold, pairs at the threshold itself are found with a probability of about
  0.87, pairs 0.05 above it with 0.97 or more.

:func:`find_duplicates` keeps, in pool order, the first of each group and marks every later
record that duplicates an already kept one (its representative is the most similar kept
record, the earliest on a tie), so the outcome does not depend on anything but the order
of the pool. :func:`find_contamination` indexes the whole pool and queries each target
text. Both cost one MinHash per distinct text plus an LSH query: no pairwise comparison.
"""

from __future__ import annotations

import logging
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SHINGLE = 5
"""Characters per shingle."""

NUM_PERM = 128
"""MinHash permutations."""

LSH_WEIGHTS = (0.1, 0.9)
"""datasketch's (false positive, false negative) weights when it picks the LSH bands:
recall first, since every candidate is checked exactly afterwards."""

DEFAULT_THRESHOLD = 0.8
MIN_THRESHOLD = 0.5
LSH_MAX_THRESHOLD = 0.95
"""The LSH index's threshold is capped here (above it datasketch would choose a single
band); the exact check afterwards applies the real threshold."""

SHOWN_PAIRS = 5
"""How many example pairs the manifest's ``dedup`` entry lists."""

_MINHASH_SEED = 1
_log = logging.getLogger("finesift.dedup")


def normalise(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed (the overlap guard's normalisation)."""
    return " ".join(unicodedata.normalize("NFKC", str(text)).casefold().split())


def shingles(norm: str, n: int = SHINGLE) -> np.ndarray:
    """The sorted distinct 32-bit hashes of ``norm``'s character ``n``-grams (the whole
    text as one shingle when it is shorter than ``n``; nothing for an empty text)."""
    if not norm:
        return np.zeros(0, dtype=np.uint32)
    codes = np.frombuffer(norm.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    width = min(n, len(codes))
    count = len(codes) - width + 1
    h = np.zeros(count, dtype=np.uint64)
    for j in range(width):  # a polynomial hash of each window, modulo 2**64
        h = h * np.uint64(0x100000001B3) + codes[j:j + count] + np.uint64(1)
    h ^= h >> np.uint64(31)
    h *= np.uint64(0x9E3779B97F4A7C15)
    folded = np.sort((((h >> np.uint64(32)) ^ h) & np.uint64(0xFFFFFFFF)).astype(np.uint32))
    return folded[np.concatenate(([True], folded[1:] != folded[:-1]))]


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted sets of shingle hashes."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def _identity(value: Any) -> Any:
    return value


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float; an :class:`OptionError` unless it is in [0.5, 1] (below
    half the shingles shared, texts are not near duplicates, and the LSH index would
    return most of the pool as candidates)."""
    from finesift.errors import OptionError

    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)) \
            or not MIN_THRESHOLD <= float(threshold) <= 1.0:
        raise OptionError(f"--dedup-threshold {threshold!r}: expected a Jaccard similarity "
                          f"from {MIN_THRESHOLD} to 1, e.g. {DEFAULT_THRESHOLD}")
    return float(threshold)


class _Texts:
    """Normalised texts with their MinHashes (each computed once; kept as one array of
    hash values, not as objects). Shingles are recomputed where a candidate pair is
    checked: they would take far more memory than the few checks cost."""

    def __init__(self, texts: Sequence[str]) -> None:
        from datasketch import MinHash

        self.norm = [normalise(t) for t in texts]
        self._proto = MinHash(num_perm=NUM_PERM, seed=_MINHASH_SEED, hashfunc=_identity)
        self._values: np.ndarray | None = None
        self._done = np.zeros(len(self.norm), dtype=bool)

    def shingles(self, i: int) -> np.ndarray:
        return shingles(self.norm[i])

    def minhash(self, i: int) -> Any:
        from datasketch import LeanMinHash

        if self._values is None:
            self._values = np.zeros((len(self.norm), NUM_PERM),
                                    dtype=self._proto.hashvalues.dtype)
        if not self._done[i]:
            m = self._proto.copy()
            m.update_batch(self.shingles(i).tolist())  # ints: cheaper to iterate
            self._values[i] = m.hashvalues
            self._done[i] = True
        return LeanMinHash(seed=_MINHASH_SEED, hashvalues=self._values[i],
                           scheme=self._proto.scheme)


def _lsh(threshold: float) -> Any:
    from datasketch import MinHashLSH

    return MinHashLSH(threshold=min(threshold, LSH_MAX_THRESHOLD), num_perm=NUM_PERM,
                      weights=LSH_WEIGHTS)


def _best(cands: Sequence[int], sh: np.ndarray, texts: _Texts,
          threshold: float) -> tuple[int, float] | None:
    """The most similar of ``cands`` (the earliest on a tie) at ``threshold`` or above."""
    best: tuple[int, float] | None = None
    for c in sorted(cands):
        sim = jaccard(sh, texts.shingles(c))
        if sim >= threshold and (best is None or sim > best[1]):
            best = (c, sim)
    return best


@dataclass
class Duplicates:
    """What :func:`find_duplicates` found.

    Attributes:
        n: how many texts were compared.
        representative: for each text that duplicates an earlier one, its index ->
            the index of the kept text it duplicates.
        similarity: the Jaccard similarity of each such pair (1.0 for exact duplicates).
        exact: indices whose normalised text equals their representative's.
    """

    n: int
    representative: dict[int, int] = field(default_factory=dict)
    similarity: dict[int, float] = field(default_factory=dict)
    exact: set[int] = field(default_factory=set)

    @property
    def kept(self) -> list[int]:
        """The indices left after dropping every duplicate, in order."""
        return [i for i in range(self.n) if i not in self.representative]

    @property
    def groups(self) -> dict[int, list[int]]:
        """Kept index -> its duplicates (groups of two or more only), in order."""
        out: dict[int, list[int]] = {}
        for i in sorted(self.representative):
            out.setdefault(self.representative[i], []).append(i)
        return dict(sorted(out.items()))


def find_duplicates(texts: Sequence[str], threshold: float = DEFAULT_THRESHOLD, *,
                    _texts: _Texts | None = None) -> Duplicates:
    """Exact and near duplicates among ``texts``: each later text that duplicates an
    earlier kept one is marked with that representative (see the module's notes).

    Args:
        texts: one string per record, in pool order.
        threshold: the smallest Jaccard similarity of character 5-gram sets counted as a
            near duplicate, from 0.5 to 1 (1: identical shingle sets only).
    """
    threshold = check_threshold(threshold)
    t0 = time.perf_counter()
    data = _texts or _Texts(texts)
    found = Duplicates(len(data.norm))
    first: dict[str, tuple[int, float]] = {}  # a text -> its kept representative, similarity
    lsh = _lsh(threshold)
    for i, norm in enumerate(data.norm):
        seen = first.get(norm)
        if seen is not None:  # the same text again: the representative of its first copy
            found.representative[i], found.similarity[i] = seen
            if data.norm[seen[0]] == norm:
                found.exact.add(i)
            continue
        if norm:
            best = _best(lsh.query(m := data.minhash(i)), data.shingles(i), data, threshold)
            if best is not None:
                found.representative[i], found.similarity[i] = best
                first[norm] = best
                continue
            lsh.insert(i, m)
        first[norm] = (i, 1.0)
    _log.debug("dedup: %d texts, %d exact and %d near duplicate(s) at Jaccard >= %g "
               "(%.2f s)", len(data.norm), len(found.exact),
               len(found.representative) - len(found.exact), threshold,
               time.perf_counter() - t0)
    return found


def find_contamination(pool: Sequence[str], target: Sequence[str],
                       threshold: float = DEFAULT_THRESHOLD, *,
                       _pool_texts: _Texts | None = None) -> dict[int, list[int]]:
    """Target texts that are also in the pool, exactly or nearly (Jaccard >= threshold).

    Returns:
        target index -> the pool indices it matches (ascending), for matched targets only.
    """
    threshold = check_threshold(threshold)
    t0 = time.perf_counter()
    pool_texts = _pool_texts or _Texts(pool)
    target_texts = _Texts(target)
    by_text: dict[str, list[int]] = {}
    for i, norm in enumerate(pool_texts.norm):
        by_text.setdefault(norm, []).append(i)
    lsh = _lsh(threshold)
    with lsh.insertion_session() as session:
        for norm, members in by_text.items():
            if norm:
                session.insert(members[0], pool_texts.minhash(members[0]))
    out: dict[int, list[int]] = {}
    for t, norm in enumerate(target_texts.norm):
        hits = set(by_text.get(norm, []))
        if norm:
            sh = target_texts.shingles(t)
            for c in lsh.query(target_texts.minhash(t)):
                if jaccard(sh, pool_texts.shingles(c)) >= threshold:
                    hits.update(by_text[pool_texts.norm[c]])
        if hits:
            out[t] = sorted(hits)
    _log.debug("contamination: %d target text(s) against %d pool text(s) (%d distinct): "
               "%d found in the pool (%.2f s)", len(target_texts.norm), len(pool_texts.norm),
               len(by_text), len(out), time.perf_counter() - t0)
    return out


@dataclass
class Screening:
    """Duplicates in a pool and the target records that are also in it, with the
    manifest entries and the messages a run reports.

    Attributes:
        duplicates: the pool's duplicates (:func:`find_duplicates`).
        contamination: target index -> pool indices (:func:`find_contamination`).
        threshold: the Jaccard threshold both used.
        dedup: whether the run drops the duplicates (``--dedup``).
    """

    duplicates: Duplicates
    contamination: dict[int, list[int]]
    threshold: float
    dedup: bool
    pool_ids: list[str]
    target_ids: list[str]
    seconds: float = 0.0

    @property
    def kept(self) -> list[int]:
        """The pool indices a run scores: every one, or with ``dedup`` the first of each
        group."""
        return self.duplicates.kept if self.dedup else list(range(self.duplicates.n))

    def dedup_entry(self) -> dict[str, Any]:
        """The manifest's ``dedup`` entry."""
        d = self.duplicates
        n_dup = len(d.representative)
        pairs = [{"kept": self.pool_ids[d.representative[i]], "duplicate": self.pool_ids[i],
                  "jaccard": round(d.similarity[i], 4)}
                 for i in sorted(d.representative)[:SHOWN_PAIRS]]
        return {
            "enabled": self.dedup, "threshold": self.threshold,
            "shingle_chars": SHINGLE, "num_perm": NUM_PERM,
            "pool_examples": d.n, "groups": len(d.groups), "duplicates": n_dup,
            "exact_duplicates": len(d.exact), "near_duplicates": n_dup - len(d.exact),
            "dropped": n_dup if self.dedup else 0,
            "kept": d.n - n_dup if self.dedup else d.n,
            "example_pairs": pairs,
        }

    def contamination_entry(self) -> dict[str, Any]:
        """The manifest's ``contamination`` entry: ``pairs`` maps a target id to the ids
        of the pool examples that repeat it."""
        pairs = {self.target_ids[t]: [self.pool_ids[p] for p in hits]
                 for t, hits in sorted(self.contamination.items())}
        return {"threshold": self.threshold, "target_examples": len(self.target_ids),
                "contaminated": len(pairs),
                "pool_examples": len({p for hits in self.contamination.values() for p in hits}),
                "pairs": pairs}

    def messages(self, shown: int = 3) -> list[str]:
        """What a run tells the user (a ``warning:`` for contamination)."""
        out = []
        if self.contamination:
            items = sorted(self.contamination.items())
            listed = "; ".join(
                f"{self.target_ids[t]} ~ {', '.join(self.pool_ids[p] for p in hits[:3])}"
                + (f" (+{len(hits) - 3} more)" if len(hits) > 3 else "")
                for t, hits in items[:shown])
            more = f"; and {len(items) - shown} more" if len(items) > shown else ""
            out.append(
                f"warning: {len(items)} of {len(self.target_ids)} target example(s) also "
                f"appear in the pool (exactly or with Jaccard >= {self.threshold:g}): "
                f"{listed}{more} (all in the manifest's contamination section); a "
                "selection holding them trains on the target itself")
        d = self.duplicates
        if d.representative:
            what = (f"{len(d.representative)} duplicate(s) in {len(d.groups)} group(s) "
                    f"({len(d.exact)} exact, {len(d.representative) - len(d.exact)} near, "
                    f"Jaccard >= {self.threshold:g})")
            out.append(f"dedup: dropped {what}; {d.n - len(d.representative)} of {d.n} pool "
                       "examples left" if self.dedup else
                       f"the pool holds {what}; --dedup keeps one of each group")
        return out


def screen(pool_records: Sequence[Any], target_records: Sequence[Any], *,
           text_of: Callable[[Any], str], threshold: float = DEFAULT_THRESHOLD,
           dedup: bool = False) -> Screening:
    """Find the pool's duplicates and the target records that are also in the pool.

    Args:
        pool_records, target_records: records (anything with an ``id``).
        text_of: a record's text (a run: :func:`finesift.data.records.record_text`).
        threshold: the Jaccard threshold for near duplicates, from 0.5 to 1.
        dedup: whether the run will drop the duplicates (recorded, and :attr:`Screening.kept`).
    """
    threshold = check_threshold(threshold)
    t0 = time.perf_counter()
    pool_texts = _Texts([text_of(r) for r in pool_records])
    found = find_duplicates(pool_texts.norm, threshold, _texts=pool_texts)
    hits = find_contamination(pool_texts.norm, [text_of(r) for r in target_records],
                              threshold, _pool_texts=pool_texts)
    return Screening(found, hits, threshold, bool(dedup), [str(r.id) for r in pool_records],
                     [str(r.id) for r in target_records],
                     round(time.perf_counter() - t0, 3))


__all__ = ["DEFAULT_THRESHOLD", "Duplicates", "Screening", "find_contamination",
           "find_duplicates", "jaccard", "normalise", "screen", "shingles"]
