"""Selection strategies, usable with every method.

* ``top``: the k highest scores.
* ``length-binned``: pool examples split into ``n_bins`` (default 10) equal-count bins by
  label-token count; each bin contributes its top scores in proportion to its size.
  The ToV paper's guard against short examples, whose averaged scores are noisiest.
* ``score+random``: half the budget by length-binned score, half uniformly at random
  from the base set U (or the whole pool when the method has none), without repeats.
  The ToV paper's main variant.
* ``balanced``: every pool source (the file a record came from) gets an equal share of
  the budget and fills it with its own top scores; a source with fewer examples than its
  share gives the rest to the others. For pools that mix sources of very different
  sizes, where ``top`` may take everything from one. With ``weights`` (``--source-weights
  sharegpt=1,gsm8k=3``) the shares are proportional to the weights instead, with the same
  hand-over when a source runs out (:func:`weighted_shares`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finesift.errors import OptionError

STRATEGIES = ("top", "length-binned", "score+random", "balanced")


def parse_budget(budget: str | float, pool_size: int) -> int:
    """A count (``"500"``, 500) or a percentage of the pool (``"10%"``) -> a count.

    Raises :class:`OptionError` for a malformed budget, zero, or more than the pool.
    """
    if isinstance(budget, bool):
        raise OptionError(f"budget must be a count or a percentage, got {budget!r}")
    text = str(budget).strip()
    if re.fullmatch(r"-\s*\d+(?:\.\d+)?\s*%?", text):
        raise OptionError(
            f"budget {text}: must be positive (a count like 500 or a percentage like 10%)"
        )
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", text)
    if m:
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise OptionError(f"budget {text}: a percentage must be in (0, 100]")
        k = max(1, round(pool_size * pct / 100.0))
    else:
        try:
            k = int(text)
        except ValueError:
            raise OptionError(
                f"budget {text!r}: expected a count like 500 or a percentage like 10%"
            ) from None
        if k < 1:
            raise OptionError(f"budget {k}: must be at least 1")
    if k > pool_size:
        raise OptionError(f"budget {k} is larger than the pool ({pool_size} usable examples)")
    return k


def _top(scores: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """The k highest-scoring of ``idx``; ties broken by position (stable)."""
    if k <= 0:
        return idx[:0]
    order = np.argsort(-scores[idx], kind="stable")
    return idx[order[:k]]


def _length_binned(
    scores: np.ndarray, lengths: np.ndarray, candidates: np.ndarray, k: int, n_bins: int
) -> np.ndarray:
    if k <= 0 or len(candidates) == 0:
        return candidates[:0]
    n_bins = max(1, min(n_bins, len(candidates)))
    by_len = candidates[np.argsort(lengths[candidates], kind="stable")]
    bins = np.array_split(by_len, n_bins)
    # allocate k across bins in proportion to their size (largest remainder)
    sizes = np.array([len(b) for b in bins], dtype=np.float64)
    quota = sizes / sizes.sum() * k
    take = np.floor(quota).astype(int)
    rest = k - take.sum()
    if rest > 0:
        order = np.argsort(-(quota - take), kind="stable")
        take[order[:rest]] += 1
    chosen = [_top(scores, b, min(t, len(b))) for b, t in zip(bins, take, strict=True)]
    out = np.concatenate(chosen) if chosen else candidates[:0]
    if len(out) < k:  # a bin smaller than its quota: fill from the best remaining
        left = np.setdiff1d(candidates, out)
        out = np.concatenate([out, _top(scores, left, k - len(out))])
    return out


def equal_shares(sizes: np.ndarray, k: int) -> np.ndarray:
    """Split ``k`` as evenly as possible over groups of ``sizes``, no group more than its
    size (water-filling; leftover units go to the first groups that still have room)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    take = np.zeros(len(sizes), dtype=np.int64)
    left = min(int(k), int(sizes.sum()))
    while left > 0:
        room = np.flatnonzero(take < sizes)
        each = left // len(room)
        if each == 0:  # fewer units than groups with room: one each, in group order
            take[room[:left]] += 1
            break
        add = np.minimum(each, sizes[room] - take[room])
        take[room] += add
        left -= int(add.sum())
    return take


def weighted_shares(sizes: np.ndarray, k: int, weights: np.ndarray) -> np.ndarray:
    """Split ``k`` over groups of ``sizes`` in proportion to ``weights``, no group more
    than its size: a group whose share exceeds its size takes all of it and the rest is
    split again over the others, by their weights (the water-filling of
    :func:`equal_shares`); the last units go by largest remainder, ties to the first group.
    With equal weights this is :func:`equal_shares`."""
    sizes = np.asarray(sizes, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != sizes.shape or not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        raise ValueError("weights must be positive and finite, one per group")
    take = np.zeros(len(sizes), dtype=np.int64)
    left = min(int(k), int(sizes.sum()))
    while left > 0:
        room = np.flatnonzero(take < sizes)
        quota = left * weights[room] / weights[room].sum()
        full = quota >= sizes[room] - take[room]
        if full.any():  # these groups take all they have; split the rest again
            got = sizes[room[full]] - take[room[full]]
            take[room[full]] = sizes[room[full]]
            left -= int(got.sum())
            continue
        base = np.floor(quota).astype(np.int64)
        extra = left - int(base.sum())
        order = np.argsort(-(quota - base), kind="stable")[:extra]
        base[order] += 1
        take[room] += base
        left = 0
    return take


def parse_source_weights(value: Any) -> dict[str, float] | None:
    """``--source-weights`` as a mapping: ``"sharegpt=1,gsm8k=3"``, a mapping of name to
    weight, or nothing (``None``, ``""``, ``{}``: equal shares).

    Raises:
        OptionError: a malformed entry, a name given twice, or a weight that is not a
            positive finite number.
    """
    if value is None or (isinstance(value, (str, Mapping)) and not value):
        return None
    pairs: list[tuple[str, Any]]
    if isinstance(value, str):
        pairs = []
        for item in value.split(","):
            name, sep, weight = item.partition("=")
            if not sep or not name.strip():
                raise OptionError(f"--source-weights {value!r}: expected NAME=WEIGHT pairs "
                                  "separated by commas, e.g. sharegpt=1,gsm8k=3")
            pairs.append((name.strip(), weight.strip()))
    elif isinstance(value, Mapping):
        pairs = [(str(k).strip(), v) for k, v in value.items()]
    else:
        raise OptionError(f"--source-weights {value!r}: expected NAME=WEIGHT pairs "
                          "(sharegpt=1,gsm8k=3) or a mapping of source name to weight")
    out: dict[str, float] = {}
    for name, weight in pairs:
        if name in out:
            raise OptionError(f"--source-weights: source {name!r} is given twice")
        try:
            w = float(weight) if not isinstance(weight, bool) else math.nan
        except (TypeError, ValueError):
            w = math.nan
        if not math.isfinite(w) or w <= 0:
            raise OptionError(f"--source-weights: the weight of {name!r} is {weight!r}; "
                              "expected a positive number")
        out[name] = w
    return out


def source_names(source: str) -> tuple[str, ...]:
    """The names a pool source answers to in ``--source-weights``: as given (the path),
    its file name, and its file name without extension(s)."""
    name = Path(source).name
    return tuple(dict.fromkeys([source, name, name.split(".", 1)[0] or name]))


def resolve_source_weights(weights: Mapping[str, float] | None,
                           sources: Sequence[str]) -> dict[str, float] | None:
    """Each pool source's weight: a name of ``weights`` matches a source given as that
    path, that file name or that file name without extension; sources no name matches
    weigh 1.

    Raises:
        OptionError: a name that matches no source or several (listing the pool's sources).
    """
    if not weights:
        return None
    distinct = list(dict.fromkeys(sources))
    shown = ", ".join(" = ".join(dict.fromkeys([source_names(s)[-1], s])) for s in distinct)
    out = dict.fromkeys(distinct, 1.0)
    for name, w in weights.items():
        hits = [s for s in distinct if name in source_names(s)]
        if not hits:
            raise OptionError(f"--source-weights: no pool source is named {name!r}; the "
                              f"pool's sources: {shown}")
        if len(hits) > 1:
            raise OptionError(f"--source-weights: {name!r} names {len(hits)} pool sources "
                              f"({', '.join(hits)}); give their paths instead")
        out[hits[0]] = float(w)
    return out


def _balanced(scores: np.ndarray, groups: np.ndarray, k: int,
              weights: Mapping[str, float] | None = None) -> np.ndarray:
    names, inv = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inv == g) for g in range(len(names))]
    sizes = np.array([len(m) for m in members])
    if weights:
        unknown = sorted(set(names.tolist()) - set(weights))
        if unknown:
            raise OptionError(f"strategy 'balanced': no weight for source(s) {unknown}")
        take = weighted_shares(sizes, k, np.array([weights[n] for n in names.tolist()]))
    else:
        take = equal_shares(sizes, k)
    out = np.concatenate([_top(scores, m, int(t)) for m, t in zip(members, take, strict=True)])
    return out[np.argsort(-scores[out], kind="stable")]  # best first


def select_indices(
    scores: np.ndarray,
    k: int,
    *,
    strategy: str = "top",
    lengths: np.ndarray | None = None,
    base_set: np.ndarray | None = None,
    seed: int = 0,
    n_bins: int = 10,
    groups: np.ndarray | None = None,
    weights: Mapping[str, float] | None = None,
) -> np.ndarray:
    """Pick ``k`` pool indices from ``scores``.

    Args:
        scores: one score per pool example (higher = better); must be finite.
        k: the budget as a count (see :func:`parse_budget`).
        strategy: one of :data:`STRATEGIES`.
        lengths: label-token count per example (``length-binned``, ``score+random``).
        base_set: indices the random half of ``score+random`` samples from.
        seed: seeds the random half.
        n_bins: number of length bins.
        groups: the pool source of each example (``balanced``).
        weights: ``balanced`` only: a weight per group value (every group present; see
            :func:`resolve_source_weights`); shares proportional to them. None: equal.
    Returns:
        the chosen indices, best first for the score-chosen part.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if not 1 <= k <= n:
        raise OptionError(f"budget {k} is out of range for a pool of {n}")
    if not np.all(np.isfinite(scores)):
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise OptionError(f"score of pool example {bad} is not finite")
    allidx = np.arange(n)
    if weights and strategy != "balanced":
        raise OptionError(f"source weights need strategy 'balanced', not {strategy!r}")
    if strategy == "top":
        return _top(scores, allidx, k)
    if strategy == "balanced":
        if groups is None or len(groups) != n:
            raise OptionError("strategy 'balanced' needs the source of every pool example")
        return _balanced(scores, np.asarray(groups, dtype=str), k, weights)
    if lengths is None:
        raise OptionError(f"strategy {strategy!r} needs the examples' lengths")
    lengths = np.asarray(lengths)
    if strategy == "length-binned":
        return _length_binned(scores, lengths, allidx, k, n_bins)
    if strategy == "score+random":
        k_score = (k + 1) // 2
        scored = _length_binned(scores, lengths, allidx, k_score, n_bins)
        rng = np.random.default_rng([seed, 0x5C0E])
        source = allidx if base_set is None else np.asarray(base_set)
        remaining = np.setdiff1d(source, scored)
        if len(remaining) < k - k_score:
            remaining = np.setdiff1d(allidx, scored)
        rand = rng.choice(remaining, size=k - k_score, replace=False)
        return np.concatenate([scored, np.sort(rand)])
    raise OptionError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")


def score_table(ids, sources, rows, scores, n_label_tokens, n_tokens, truncated,
                chosen) -> dict:
    """The leading columns of ``scores.parquet``: one row per pool example, with whether
    and in which order it was selected (``selection_rank`` -1 where not)."""
    scores = np.asarray(scores, dtype=np.float64)
    rank = np.full(len(scores), -1, dtype=np.int64)
    rank[np.asarray(chosen, dtype=np.int64)] = np.arange(len(chosen))
    return {
        "id": list(ids),
        "source": list(sources),
        "row": np.asarray(rows, dtype=np.int64),
        "score": scores,
        "n_label_tokens": np.asarray(n_label_tokens, dtype=np.int64),
        "n_tokens": np.asarray(n_tokens, dtype=np.int64),
        "truncated": np.asarray(truncated, dtype=bool),
        "selected": rank >= 0,
        "selection_rank": rank,
    }
