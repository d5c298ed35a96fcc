"""The paired bootstrap of the benchmark reports, on synthetic losses with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from finesift.evaluate.stats import bootstrap_improvement, bootstrap_lead


def test_point_estimate_is_the_pooled_relative_improvement():
    rng = np.random.default_rng(0)
    ref = rng.gamma(4.0, 0.3, size=(4, 50))
    met = ref - 0.1
    est = bootstrap_improvement(ref, met, n_resamples=200)
    assert est["mean"] == pytest.approx(100 * 0.1 * ref.size / ref.sum())
    assert est["wins"] == 4 and est["pairs"] == 4 and est["n_test"] == 50
    # a constant shift per example: every resample has a positive improvement
    assert 0 < est["low"] <= est["mean"] <= est["high"]


def test_identical_methods_give_zero_and_no_wins():
    ref = np.random.default_rng(1).gamma(4.0, 0.3, size=(3, 40))
    est = bootstrap_improvement(ref, ref.copy(), n_resamples=200)
    assert est["mean"] == 0 and est["low"] == 0 and est["high"] == 0 and est["wins"] == 0


def _simulate(rng, units=6, n=300, true_pct=5.0):
    """Per-example reference losses and a method whose population improvement is
    exactly ``true_pct``. The method helps some test examples much more than others (a
    per-example gain shared by every run, as the test set is), plus a per-run (seed)
    offset and per-run noise, all of mean zero besides the gain."""
    r = rng.gamma(4.0, 0.3, size=n)
    gain = rng.normal(true_pct / 100, 0.15, size=n)  # independent of r: E[r g] = E[r] E[g]
    ref = r[None, :] + rng.normal(0, 0.02, size=(units, 1)) + rng.normal(0, 0.03, (units, n))
    met = (r * (1 - gain))[None, :] + rng.normal(0, 0.02, size=(units, 1)) \
        + rng.normal(0, 0.03, (units, n))
    return ref, met


def test_interval_covers_the_true_improvement_about_95_percent_of_the_time():
    """Coverage over 200 simulated benchmarks. An unpaired bootstrap (ref and method drawn
    independently) would be far too wide and cover every time; a bootstrap over runs only
    would ignore the test set's sampling error and cover far too rarely."""
    rng = np.random.default_rng(2)
    true_pct = 4.0  # E[met] = (1 - 0.04) E[r]; the noises have mean zero
    covered = 0
    reps = 200
    for i in range(reps):
        ref, met = _simulate(rng, true_pct=true_pct)
        est = bootstrap_improvement(ref, met, n_resamples=400, seed=i)
        covered += est["low"] <= true_pct <= est["high"]
    assert 0.88 <= covered / reps <= 0.99, covered


def test_pairing_makes_the_interval_narrower_than_an_unpaired_one():
    rng = np.random.default_rng(3)
    ref, met = _simulate(rng)
    paired = bootstrap_improvement(ref, met, n_resamples=1000)
    # the same losses with the method's test examples shuffled: pairing broken
    shuffled = met[:, rng.permutation(met.shape[1])]
    unpaired = bootstrap_improvement(ref, shuffled, n_resamples=1000)
    assert paired["mean"] == pytest.approx(unpaired["mean"])
    assert (paired["high"] - paired["low"]) < 0.5 * (unpaired["high"] - unpaired["low"])


def test_lead_is_separated_only_when_the_gap_is_real():
    rng = np.random.default_rng(4)
    ref, a = _simulate(rng, true_pct=8.0)
    b_far = a + 0.08      # clearly worse than a on every example
    b_near = a + rng.normal(0, 0.05, size=a.shape)  # a's equal, up to noise
    far = bootstrap_lead(ref, a, b_far, n_resamples=500)
    near = bootstrap_lead(ref, a, b_near, n_resamples=500)
    assert far["separated"] and far["low"] > 0
    assert not near["separated"] and near["low"] < 0 < near["high"]


def test_non_finite_test_columns_are_dropped_for_every_method():
    ref = np.ones((2, 5))
    met = np.full((2, 5), 0.5)
    ref[0, 3] = np.nan
    est = bootstrap_improvement(ref, met, n_resamples=50)
    assert est["n_test"] == 4 and est["mean"] == pytest.approx(50.0)


def test_shapes_must_match():
    with pytest.raises(ValueError):
        bootstrap_improvement(np.ones((2, 5)), np.ones((3, 5)))
