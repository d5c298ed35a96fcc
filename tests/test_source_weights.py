"""Per-source quotas: ``--strategy balanced --source-weights sharegpt=1,gsm8k=3``. Shares
are proportional to the weights, a source that runs out hands its rest to the others (as
equal shares do), names match a source's path, file name or stem, and an unknown name is
a clear error listing the pool's sources."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import finesift
from finesift.cli import main
from finesift.errors import OptionError
from finesift.select.strategies import (
    equal_shares,
    parse_source_weights,
    resolve_source_weights,
    select_indices,
    weighted_shares,
)


def test_shares_are_proportional_to_the_weights() -> None:
    assert weighted_shares(np.array([100, 100]), 40, np.array([1, 3])).tolist() == [10, 30]
    assert weighted_shares(np.array([100, 100, 100]), 10, np.array([1, 1, 2])).tolist() == [
        3, 2, 5]  # 2.5, 2.5, 5: the remainder to the first
    # a source that runs out takes all it has; the rest is split again by weight
    assert weighted_shares(np.array([5, 100, 100]), 40, np.array([2, 1, 1])).tolist() == [
        5, 18, 17]
    assert weighted_shares(np.array([3, 4, 100]), 50, np.array([5, 5, 1])).tolist() == [
        3, 4, 43]
    # a budget of the whole pool takes everything, whatever the weights
    assert weighted_shares(np.array([3, 4, 5]), 12, np.array([1, 9, 1])).tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="positive"):
        weighted_shares(np.array([3, 4]), 5, np.array([1, 0]))


def test_equal_weights_are_equal_shares() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        sizes = rng.integers(0, 15, int(rng.integers(1, 6)))
        if sizes.sum() == 0:
            continue
        k = int(rng.integers(1, sizes.sum() + 1))
        w = np.full(len(sizes), float(rng.uniform(0.1, 5)))
        assert weighted_shares(sizes, k, w).tolist() == equal_shares(sizes, k).tolist()


def test_balanced_with_weights_takes_each_sources_best() -> None:
    groups = np.array(["a"] * 6 + ["b"] * 6)
    scores = np.array([6, 5, 4, 3, 2, 1, 60, 50, 40, 30, 20, 10], dtype=float)
    got = select_indices(scores, 4, strategy="balanced", groups=groups,
                         weights={"a": 3.0, "b": 1.0})
    assert got.tolist() == [6, 0, 1, 2]  # b's best, then a's three best (best first)
    assert select_indices(scores, 8, strategy="balanced", groups=groups,
                          weights={"a": 1.0, "b": 1.0}).tolist() == select_indices(
        scores, 8, strategy="balanced", groups=groups).tolist()
    with pytest.raises(OptionError, match="need strategy 'balanced'"):
        select_indices(scores, 4, strategy="top", weights={"a": 1.0})


def test_weights_are_parsed_and_names_resolved() -> None:
    assert parse_source_weights("sharegpt=1, gsm8k=3") == {"sharegpt": 1.0, "gsm8k": 3.0}
    assert parse_source_weights({"x": "2.5"}) == {"x": 2.5}
    assert parse_source_weights("") is None and parse_source_weights({}) is None
    for bad, msg in [("sharegpt", "expected NAME=WEIGHT"), ("a=0", "positive number"),
                     ("a=-1", "positive number"), ("a=x", "positive number"),
                     ("a=inf", "positive number"), ("a=1,a=2", "given twice"),
                     ({"a": True}, "positive number"), (3, "expected NAME=WEIGHT")]:
        with pytest.raises(OptionError, match=msg):
            parse_source_weights(bad)
    sources = ["data/pool_sharegpt.jsonl", "data/gsm8k.parquet", "other/gsm8k.jsonl"]
    assert resolve_source_weights({"pool_sharegpt": 2, "data/gsm8k.parquet": 3}, sources) == {
        "data/pool_sharegpt.jsonl": 2.0, "data/gsm8k.parquet": 3.0, "other/gsm8k.jsonl": 1.0}
    assert resolve_source_weights({"gsm8k.jsonl": 4}, sources)["other/gsm8k.jsonl"] == 4.0
    with pytest.raises(OptionError) as err:
        resolve_source_weights({"alpaca": 1}, sources)
    assert str(err.value) == (
        "--source-weights: no pool source is named 'alpaca'; the pool's sources: "
        "pool_sharegpt = data/pool_sharegpt.jsonl, gsm8k = data/gsm8k.parquet, "
        "gsm8k = other/gsm8k.jsonl")
    with pytest.raises(OptionError, match="'gsm8k' names 2 pool sources"):
        resolve_source_weights({"gsm8k": 1}, sources)


def test_a_run_takes_exact_counts_per_source(lm_data, tiny_lm_dir: Path, tmp_path: Path) -> None:
    text, chat = map(str, lm_data.pool)  # 40 usable records each
    sel = finesift.select(lm_data.pool, lm_data.target, budget=10, method="random",
                          model=str(tiny_lm_dir), strategy="balanced", out=tmp_path / "api",
                          source_weights={"pool_text": 1, "pool_chat.jsonl": 4})
    assert sel.manifest["selected"]["by_source"] == {text: 2, chat: 8}
    assert sel.manifest["source_weights"] == {text: 1.0, chat: 4.0}
    # chat runs out (40 records for a share of 54): the rest of its share goes to text
    sel = finesift.select(lm_data.pool, lm_data.target, budget=60, method="random",
                          model=str(tiny_lm_dir), strategy="balanced",
                          source_weights="pool_chat=9")
    assert sel.manifest["selected"]["by_source"] == {text: 20, chat: 40}


def test_cli_source_weights(lm_data, tiny_lm_dir: Path, tmp_path: Path, capsys) -> None:
    base = ["select", "--method", "random", "--pool", *map(str, lm_data.pool), "--target",
            str(lm_data.target), "--model", str(tiny_lm_dir), "--budget", "8", "--no-progress"]
    out = tmp_path / "cli"
    rc = main([*base, "--out", str(out), "--strategy", "balanced",
               "--source-weights", "pool_text=3,pool_chat=1"])
    assert rc == 0, capsys.readouterr().err
    man = json.loads((out / "manifest.json").read_text())
    text, chat = map(str, lm_data.pool)
    assert man["selected"]["by_source"] == {text: 6, chat: 2}
    # the run's config.yaml runs again to the same selection
    rc = main(["select", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "again"),
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert again["selected"] == man["selected"]
    capsys.readouterr()

    rc = main([*base, "--out", str(tmp_path / "x"), "--strategy", "balanced",
               "--source-weights", "sharegpt=1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert ("\nfinesift: error: --source-weights: no pool source is named 'sharegpt'; the "
            "pool's sources: pool_text = ") in err
    assert f"pool_chat = {chat}" in err
    rc = main([*base, "--out", str(tmp_path / "y"), "--source-weights", "pool_text=2"])
    assert rc == 2
    assert "--source-weights needs --strategy balanced (not top)" in capsys.readouterr().err


def test_auto_passes_weights_and_dedup_to_its_trials(lm_data, tiny_lm_dir: Path,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "auto"
    sel = finesift.select(lm_data.pool, lm_data.target, budget=8, method="auto",
                          method_options={"candidates": "dsir", "folds": 2, "steps": 2,
                                          "batch_size": 4},
                          model=str(tiny_lm_dir), strategy="balanced", out=out,
                          source_weights="pool_text=3", dedup=True)
    text, chat = map(str, lm_data.pool)
    assert sel.manifest["selected"]["by_source"] == {text: 6, chat: 2}
    assert sel.manifest["dedup"]["dropped"] > 0
    # each trial selects from the trial files that stand for the pool's sources, with
    # their sources' weights, from the deduplicated trial pool
    trials = sorted((out / ".work" / "auto" / "trials").glob("*/manifest.json"))
    assert len(trials) == 4  # 2 candidates x 2 folds
    for path in trials:
        man = json.loads(path.read_text())
        weights = man["source_weights"]
        assert sorted(weights.values()) == [1.0, 3.0]
        heavy = next(f for f, w in weights.items() if w == 3.0)
        assert Path(heavy).name.endswith("pool_text.jsonl")
        assert man["selected"]["by_source"][heavy] == 6
        assert man["dedup"]["enabled"] and man["dedup"]["dropped"] > 0
