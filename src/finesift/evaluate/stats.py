"""Paired bootstrap intervals for benchmark comparisons.

Every run of a benchmark is measured on the same test examples, so two methods' runs at
the same budget and seed (a *unit*) give per-example losses that pair up. The improvement
of a method over a reference (random selection) is

    100 * (sum of reference losses - sum of method losses) / sum of reference losses

over all units and test examples. Its interval comes from a two-level paired bootstrap:
each resample draws units (budget x seed) with replacement and, independently, test
examples with replacement, and applies the same draw to every method, so both the seed
to seed spread of fine-tuning and the finite test set are in the interval, and the
pairing between methods is kept. A resample is a pair of multinomial count vectors
``c`` (units) and ``w`` (test examples); its total for a method is ``c^T L w``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

DEFAULT_RESAMPLES = 2000
METHOD_NOTE = ("95% percentile interval of a paired bootstrap ({n} resamples) that draws "
               "runs (budget x seed) and test examples with replacement, the same draw for "
               "every method")


def _check(arrays: Mapping[str, np.ndarray]) -> tuple[int, int]:
    shapes = {k: np.shape(v) for k, v in arrays.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected equal (units, test examples) arrays, got {shapes}")
    if first[0] < 1 or first[1] < 1:
        raise ValueError("need at least one unit and one test example")
    return first


def _resample_totals(arrays: Mapping[str, np.ndarray], n_resamples: int, seed: int
                     ) -> dict[str, np.ndarray]:
    """Each array's total under the same ``n_resamples`` two-level resamples."""
    units, n = _check(arrays)
    rng = np.random.default_rng([seed, 0xB007])
    c = rng.multinomial(units, np.full(units, 1.0 / units), size=n_resamples).astype(float)
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples).astype(float)
    return {k: np.einsum("bu,un,bn->b", c, np.asarray(v, dtype=float), w)
            for k, v in arrays.items()}


def _clean(*arrays: np.ndarray) -> list[np.ndarray]:
    """Drop test columns that are not finite in any array (e.g. no label tokens)."""
    arrays = [np.asarray(a, dtype=float) for a in arrays]
    keep = np.all([np.isfinite(a).all(axis=0) for a in arrays], axis=0)
    return [a[:, keep] for a in arrays]


def bootstrap_improvement(reference: np.ndarray, method: np.ndarray, *,
                          n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                          level: float = 0.95) -> dict[str, float | int]:
    """The % improvement of ``method`` over ``reference`` with a paired bootstrap interval.

    Args:
        reference, method: per-example test losses, shape (units, test examples); row u of
            both comes from the same budget and seed.

    Returns:
        ``mean`` (on the data as measured), ``low``/``high`` (the interval), ``wins``
        (units where the method's mean loss is lower), ``pairs`` (units), ``n_test``.
    """
    ref, met = _clean(reference, method)
    totals = _resample_totals({"ref": ref, "met": met}, n_resamples, seed)
    boot = 100.0 * (totals["ref"] - totals["met"]) / totals["ref"]
    alpha = (1.0 - level) / 2
    return {
        "mean": float(100.0 * (ref.sum() - met.sum()) / ref.sum()),
        "low": float(np.quantile(boot, alpha)), "high": float(np.quantile(boot, 1 - alpha)),
        "wins": int((met.mean(axis=1) < ref.mean(axis=1)).sum()), "pairs": int(ref.shape[0]),
        "n_test": int(ref.shape[1]),
    }


def bootstrap_lead(reference: np.ndarray, a: np.ndarray, b: np.ndarray, *,
                   n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                   level: float = 0.95) -> dict[str, float | int]:
    """The lead of method ``a`` over method ``b`` in % improvement over ``reference``,
    i.e. ``100 (sum b - sum a) / sum reference``, with a paired bootstrap interval. The
    lead is *outside the noise* when the interval excludes 0."""
    ref, la, lb = _clean(reference, a, b)
    totals = _resample_totals({"ref": ref, "a": la, "b": lb}, n_resamples, seed)
    boot = 100.0 * (totals["b"] - totals["a"]) / totals["ref"]
    alpha = (1.0 - level) / 2
    low, high = float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha))
    return {"mean": float(100.0 * (lb.sum() - la.sum()) / ref.sum()), "low": low, "high": high,
            "separated": bool(low > 0 or high < 0), "pairs": int(ref.shape[0])}
