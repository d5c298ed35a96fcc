"""How far two or more selections of the same pool agree: the scores of each run against
a reference run's.

For each selection folder (as ``finesift select`` or ``finesift bench`` writes it, with
``scores.parquet``) after the first, prints against the first: the number of pool examples
both scored, the Spearman correlation of their scores, and the overlap of their top
shares (|top-k(a) & top-k(b)| / k, k = ceil(share * n), over the examples both scored).
Used to compare a method on an IProX proxy with the same method on the model, e.g. the
instruct-gsm8k suite's ``tov-tuned-iprox`` with ``tov-tuned``.

Usage::

    python benchmarks/score_agreement.py REF_SELECTION OTHER_SELECTION [...] \\
        [--shares 0.1 0.25] [--out agreement.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from influence_cost import spearman, top_overlap


def read_scores(folder: Path) -> dict[str, float]:
    """Pool example id -> score, from ``folder/scores.parquet`` (examples without a score,
    e.g. skipped ones, left out)."""
    import pyarrow.parquet as pq

    path = folder / "scores.parquet"
    if not path.exists():
        raise SystemExit(f"{path}: missing (not a finished selection folder)")
    table = pq.read_table(path, columns=["id", "score"]).to_pydict()
    return {i: float(s) for i, s in zip(table["id"], table["score"], strict=True)
            if s is not None and np.isfinite(s)}


def agreement(ref: dict[str, float], other: dict[str, float],
              shares: list[float]) -> dict[str, object]:
    """Spearman and top-share overlaps of ``other``'s scores against ``ref``'s, over the
    ids both scored."""
    ids = sorted(set(ref) & set(other))
    if len(ids) < 2:
        raise SystemExit(f"only {len(ids)} pool example(s) scored by both runs")
    a = np.array([ref[i] for i in ids])
    b = np.array([other[i] for i in ids])
    return {"n": len(ids), "spearman": spearman(a, b),
            "top_overlap": {f"{s:g}": top_overlap(a, b, s) for s in shares}}


def main(argv: list[str] | None = None) -> dict[str, dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reference", type=Path)
    p.add_argument("others", type=Path, nargs="+")
    p.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.25])
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = p.parse_args(argv)
    ref = read_scores(args.reference)
    res = {}
    for folder in args.others:
        got = agreement(ref, read_scores(folder), args.shares)
        res[str(folder)] = got
        tops = ", ".join(f"top-{float(s) * 100:g}% {v:.2f}" for s, v in got["top_overlap"].items())
        print(f"{folder.name} vs {args.reference.name}: {got['n']} examples, "
              f"Spearman {got['spearman']:+.3f}, overlap {tops}")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return res


if __name__ == "__main__":
    main()
