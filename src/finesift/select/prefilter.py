"""The prefilter cascade (``--prefilter METHOD:SHARE``): a cheap method ranks the whole
usable pool, the top SHARE is kept, and the run's method scores only the kept examples.

This module holds what the cascade is made of, none of it tied to a model: the spec
(:func:`parse_prefilter`), the kept set (:func:`kept_positions`), the score rule
(:func:`cascade_scores`) and the expansion of the method's result on the kept subset back
to the whole pool (:meth:`Cascade.expand`). The stage that runs the prefilter method is
:func:`finesift.pipeline.prefilter_pool`; :func:`finesift.shards.merge` applies the same
score rule to merged shards.

**The kept set.** The prefilter method scores every usable pool example (after
``--dedup``); the ``n_keep`` highest scores are kept (ties: the earlier pool position), with
``n_keep`` = SHARE as a count (``500``; a count at least the pool keeps all of it, with a
warning) or a share of the usable pool (``20%``: ``max(1, round(n * 0.2))``). The run's
method then sees only the kept examples, in pool order, as its whole pool: its scores on
them are exactly those of the plain method run on a pool made of exactly those records.

**The score rule** (``scores.parquet``'s ``score``). A kept example's score is the method's.
A non-kept example's score is ``m - 1 - r``, with ``m`` the lowest score of a kept example
and ``r`` the dense rank of its prefilter score among the non-kept examples (0 for the
highest; equal prefilter scores share a rank). So every non-kept example ranks below every
kept one, their order among themselves is the prefilter's (ties stay ties), and every score
is finite. ``prefilter_score`` holds the prefilter's own score of every example and
``prefilter_kept`` whether it was kept; the prefilter method's columns come as
``prefilter_<name>``, and the method's columns hold, on non-kept rows, NaN (floats), -1
(integers), false (flags) or null.

**Shards.** Every shard run computes the prefilter over the whole pool (it is cheap and
deterministic, so all shards keep the same examples), the method scores the shard's chunks
of the kept subset's chunk grid, and the shard also writes the non-kept examples
``j, j + N, j + 2N, ...`` (in pool order) for shard ``j`` of ``N``, so the shards cover the
pool once. A shard's ``score`` for non-kept rows uses the shard's own lowest kept score;
``finesift merge`` applies the rule again to the merged rows, which gives the unsharded
run's scores.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from finesift.errors import OptionError

EXAMPLES = "e.g. embed:20%, dsir:10% or dsir:500,sampling=top"


@dataclass
class PrefilterSpec:
    """A checked ``--prefilter``.

    Attributes:
        method: the prefilter method's name.
        share: what to keep, as given: a count (``"500"``) or a share of the usable pool
            (``"20%"``).
        options: the prefilter method's options as given.
        text: the spec as the user wrote it (for messages).
        meth: the prefilter method, built (its options checked).
    """

    method: str
    share: str
    options: dict[str, Any]
    text: str
    meth: Any = field(repr=False, default=None)

    def count(self, n_pool: int) -> int:
        """How many of ``n_pool`` usable examples are kept (a count is capped at the pool)."""
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", self.share)
        if m:
            return max(1, round(n_pool * float(m.group(1)) / 100.0))
        return min(int(self.share), n_pool)

    def config(self) -> dict[str, Any]:
        """The spec as ``config.yaml`` records it (every option of the method, defaults
        included), which :func:`parse_prefilter` reads again."""
        from finesift.config import to_plain

        options = (dataclasses.asdict(self.meth.options)
                   if dataclasses.is_dataclass(self.meth.options) else dict(self.meth.options))
        return {"method": self.method, "share": self.share, "options": to_plain(options)}


def _share(value: Any, text: str) -> str:
    """The share as a canonical string (``"20%"``, ``"500"``), checked."""
    bad = (f"--prefilter {text}: the share {value!r} must be a count of examples (500) or a "
           f"percentage of the pool in (0, 100] (20%)")
    if isinstance(value, bool):
        raise OptionError(bad)
    if isinstance(value, (int, np.integer)):
        value = str(int(value))
    if not isinstance(value, str):
        raise OptionError(bad)
    share = "".join(value.split())
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", share)
    if m:
        if not 0 < float(m.group(1)) <= 100:
            raise OptionError(bad)
        return share
    if re.fullmatch(r"\d+", share) and int(share) >= 1:
        return str(int(share))
    raise OptionError(bad)


def parse_prefilter(value: Any) -> PrefilterSpec | None:
    """``--prefilter`` as given (``"METHOD:SHARE[,KEY=VALUE...]"``, a dict ``{"method",
    "share", "options"}`` or ``None``) as a checked :class:`PrefilterSpec` (``None``: no
    prefilter).

    Raises:
        OptionError: a malformed spec, an unknown method (or ``auto``), a bad share or an
            option the method rejects, naming the spec.
    """
    if value is None or isinstance(value, PrefilterSpec):
        return value
    if isinstance(value, dict):
        known = {"method", "share", "options"}
        if set(value) - known or not {"method", "share"} <= set(value):
            raise OptionError(f"--prefilter {value!r}: expected a mapping with method, share "
                              f"and optionally options ({EXAMPLES})")
        method, share, options = value["method"], value["share"], value.get("options") or {}
        if not isinstance(options, dict):
            raise OptionError(f"--prefilter {value!r}: options must be a mapping of the "
                              "method's options")
        text = f"{method}:{share}"
    elif isinstance(value, str):
        text = value.strip()
        method, colon, rest = text.partition(":")
        if not colon or not method.strip() or not rest.strip():
            raise OptionError(f"--prefilter {value!r}: expected METHOD:SHARE ({EXAMPLES})")
        share, *pairs = rest.split(",")
        options = {}
        for pair in pairs:
            key, eq, val = pair.partition("=")
            if not eq or not key.strip():
                raise OptionError(f"--prefilter {value!r}: {pair!r} is not KEY=VALUE (an "
                                  f"option of the prefilter method; {EXAMPLES})")
            options[key.strip()] = val.strip()
    else:
        raise OptionError(f"--prefilter {value!r}: expected METHOD:SHARE ({EXAMPLES})")
    if not isinstance(method, str):
        raise OptionError(f"--prefilter {text}: the method must be a method name")
    method = method.strip()
    share = _share(share, text)
    if method == "auto":
        raise OptionError(f"--prefilter {text}: auto chooses a method; the prefilter must be "
                          "one method (dsir, embed, ...)")
    from finesift.methods.base import get_method

    try:
        meth = get_method(method, options)
    except OptionError as exc:
        raise OptionError(f"--prefilter {text}: {exc}") from None
    return PrefilterSpec(method=method, share=share, options=dict(options), text=text, meth=meth)


def kept_positions(scores: np.ndarray, n_keep: int) -> np.ndarray:
    """The pool positions of the ``n_keep`` highest ``scores`` (ties: the earlier
    position), ascending."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return np.sort(order[:n_keep]).astype(np.int64)


def cascade_scores(scores: np.ndarray, prefilter_scores: np.ndarray,
                   kept: np.ndarray) -> np.ndarray:
    """The cascade's score of every pool example (the module's rule): ``scores`` on kept
    rows, ``m - 1 - r`` on the others (``m``: the lowest finite score of a kept row, 0 if
    there is none; ``r``: the dense rank of the row's prefilter score among the non-kept
    rows, 0 for the highest). ``scores`` on non-kept rows is ignored.

    Args:
        scores: one score per pool example (only the kept rows' are used).
        prefilter_scores: the prefilter's score of every pool example.
        kept: a boolean mask of the kept examples.
    """
    out = np.array(scores, dtype=np.float64)
    kept = np.asarray(kept, dtype=bool)
    on_kept = out[kept]
    on_kept = on_kept[np.isfinite(on_kept)]
    floor = float(on_kept.min()) if len(on_kept) else 0.0
    other = np.asarray(prefilter_scores, dtype=np.float64)[~kept]
    levels = np.unique(-other)  # ascending: the highest prefilter score first
    out[~kept] = floor - 1.0 - np.searchsorted(levels, -other).astype(np.float64)
    return out


def check_budget(spec: Any, n_keep: int, k: int, n_pool: int) -> None:
    """Stop a run whose prefilter keeps fewer examples than the budget (the selection
    would be filled with examples the method never scored).

    Args:
        spec: the prefilter as the user wrote it (``"embed:5%"``).
    """
    if n_keep < k:
        raise OptionError(
            f"--prefilter {spec} keeps {n_keep} of the {n_pool} usable pool examples, fewer "
            f"than the budget of {k}: keep at least {k} (a larger share) or lower the budget")


def _filled(col: Any, n: int, rows: np.ndarray) -> np.ndarray:
    """A column of ``n`` rows holding ``col`` at ``rows`` and a fill value elsewhere:
    NaN (floats), -1 (integers), false (flags), None (anything else)."""
    col = np.asarray(col)
    shape = (n, *col.shape[1:])
    if col.dtype.kind == "f":
        out = np.full(shape, np.nan, dtype=col.dtype)
    elif col.dtype.kind in "iu":
        out = np.full(shape, -1, dtype=np.int64)
    elif col.dtype.kind == "b":
        out = np.zeros(shape, dtype=bool)
    else:
        out = np.full(shape, None, dtype=object)
    out[rows] = col
    return out


@dataclass
class Cascade:
    """The prefilter's outcome: which examples the method scores.

    Attributes:
        spec: the prefilter.
        scores: the prefilter's score of every usable pool example.
        kept: the kept pool positions, ascending.
        columns: the prefilter method's own columns (whole pool).
        info: the prefilter method's figures (its ``MethodResult.info``).
        seconds: the prefilter's wall time.
    """

    spec: PrefilterSpec
    scores: np.ndarray
    kept: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n_pool(self) -> int:
        return len(self.scores)

    @property
    def mask(self) -> np.ndarray:
        mask = np.zeros(self.n_pool, dtype=bool)
        mask[self.kept] = True
        return mask

    def entry(self) -> dict[str, Any]:
        """The manifest's ``prefilter``: the method, its every option, the share, the
        kept count, the pool it ranked, its seconds and figures."""
        conf = self.spec.config()
        return {**conf, "kept": len(self.kept), "pool": self.n_pool,
                "seconds": round(self.seconds, 3), "method_info": self.info}

    def expand(self, result: Any, shard: Any = None) -> Any:
        """The method's result on the kept subset as a result on the whole pool (a
        shard run: on the shard's rows, the non-kept ``j, j + N, ...`` included): scores
        by the module's rule, ``chosen``, ``base_set`` and ``rows`` as pool positions, the
        method's columns filled on non-kept rows, and the prefilter's columns."""
        from finesift.methods.base import MethodResult

        n, kept, mask = self.n_pool, self.kept, self.mask
        sub = (np.arange(len(kept)) if result.rows is None
               else np.asarray(result.rows, dtype=np.int64))
        scored = kept[sub]
        other = np.flatnonzero(~mask)
        if shard is not None:
            other = other[shard.index::shard.num_shards]
        rows = np.sort(np.concatenate([scored, other])).astype(np.int64)
        full = np.full(n, np.nan)
        full[scored] = np.asarray(result.scores, dtype=np.float64)
        scores = cascade_scores(full, self.scores, mask)[rows]
        columns: dict[str, Any] = {}
        where = np.searchsorted(rows, scored)  # the scored rows among ``rows``
        for name, col in result.columns.items():
            columns[name] = _filled(col, len(rows), where)
        columns["prefilter_kept"] = mask[rows]
        columns["prefilter_score"] = np.asarray(self.scores, dtype=np.float64)[rows]
        for name, col in self.columns.items():
            columns[f"prefilter_{name}"] = np.asarray(col)[rows]
        return MethodResult(
            scores=scores, columns=columns,
            base_set=None if result.base_set is None else kept[np.asarray(result.base_set,
                                                                          dtype=np.int64)],
            chosen=None if result.chosen is None else kept[np.asarray(result.chosen,
                                                                      dtype=np.int64)],
            info=result.info, rows=None if shard is None else rows)
