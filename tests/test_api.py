"""``finesift.select`` end to end on tiny models: outputs, strategies, budgets, errors,
determinism, NER, truncation skips and model-free methods."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

import finesift
from finesift.errors import InputError, OptionError
from finesift.models import loader
from finesift.select.strategies import equal_shares, select_indices
from finesift.store.manifest import reset_peak_rss

# lr high enough for a random 2-layer model to learn the target within a few steps
TOV = {"lr": 3e-3, "eps": 0.5, "val_epochs": 3}
BASIC = {**TOV, "mode": "basic"}
INTERLEAVED = {**TOV, "mode": "interleaved", "rounds": 2, "base_size": 16, "val_epochs": 1}
BUDGET = 16  # = the number of planted records



def run(lm_data, model: Path, **kw: Any) -> finesift.api.Selection:
    args: dict[str, Any] = {
        "budget": BUDGET, "method": "tov", "method_options": BASIC, "model": str(model),
        "precision": "fp32", "batch_size": 32,
    }
    args.update(kw)
    return finesift.select(lm_data.pool, lm_data.target, **args)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("options", [BASIC, INTERLEAVED], ids=["basic", "interleaved"])
def test_tov_end_to_end_outputs(lm_data, tiny_lm_dir: Path, tmp_path: Path, options) -> None:
    out = tmp_path / "run"
    sel = run(lm_data, tiny_lm_dir, method_options=options, out=out, seed=3)
    rounds = 1 if options["mode"] == "basic" else options["rounds"]

    # outputs written atomically: no temporary files left next to them
    # (config.yaml: the run's settings, which `finesift select --config` runs again; report.html)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".work")) == [
        "config.yaml", "manifest.json", "report.html", "scores.parquet", "selected.jsonl"
    ]

    # scores.parquet: one finite row per usable pool example, in pool order
    table = pq.read_table(out / "scores.parquet").to_pydict()
    round_cols = [f"score_round_{k + 1}" for k in range(rounds)]
    for col in ["id", "source", "row", "score", "n_label_tokens", *round_cols]:
        assert col in table, col
    assert f"score_round_{rounds + 1}" not in table
    assert table["id"] == lm_data.usable
    assert set(table["source"]) == {str(p) for p in lm_data.pool}
    assert table["row"][:3] == [0, 1, 2]
    scores = np.array(table["score"])
    assert scores.shape == (len(lm_data.usable),) and np.all(np.isfinite(scores))
    per_round = np.array([table[c] for c in round_cols])
    assert np.all(np.isfinite(per_round))
    np.testing.assert_allclose(per_round.mean(axis=0), scores, rtol=1e-6, atol=1e-12)
    assert np.all(np.array(table["n_label_tokens"]) >= 12)
    np.testing.assert_array_equal(sel.scores, scores)
    assert sum(table["selected"]) == BUDGET

    # selected.jsonl: the records exactly as read, best first
    lines = (out / "selected.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == BUDGET
    assert [r["id"] for r in rows] == sel.selected_ids
    for r in rows:
        assert r == lm_data.raw[r["id"]]
    score_of = dict(zip(table["id"], scores, strict=True))
    chosen = [score_of[i] for i in sel.selected_ids]
    assert chosen == sorted(chosen, reverse=True)
    assert min(chosen) >= max(s for i, s in score_of.items() if i not in sel.selected_ids)

    # the planted target-like records dominate (random would pick ~20% of them)
    hits = len(set(sel.selected_ids) & lm_data.planted)
    assert hits >= 14, (hits, sel.selected_ids)
    assert {i.split("-")[0] for i in set(sel.selected_ids) & lm_data.planted} == {"text", "chat"}

    # manifest.json
    man = json.loads((out / "manifest.json").read_text())
    assert man == json.loads(json.dumps(sel.manifest, default=str))
    assert man["method"] == "tov"
    for k, v in options.items():
        assert man["method_options"][k] == v
    assert man["method_options"]["transform"] == "identity"  # defaults recorded too
    assert man["model"]["name"] == str(tiny_lm_dir)
    assert man["model"]["architecture"] == "LlamaForCausalLM"
    assert man["model"]["n_parameters"] > 0
    assert man["seed"] == 3 and man["task"] == "lm" and man["strategy"] == "top"
    assert man["budget"] == {"requested": str(BUDGET), "count": BUDGET}
    data = man["data"]
    assert [f["sha256"] for f in data["pool"]] == [sha256(p) for p in lm_data.pool]
    assert data["target"][0]["sha256"] == sha256(lm_data.target)
    assert data["target"][0]["bytes"] == lm_data.target.stat().st_size
    assert data["pool_records"] == len(lm_data.usable)
    assert data["target_records"] == 12
    assert data["pool_reading"]["skipped"] == {"chat without a non-empty assistant reply": 1}
    assert data["pool_reading"]["skipped_ids"] == lm_data.skipped
    assert data["pool_encoding"]["skipped"] == {}
    assert data["pool_encoding"]["n_encoded"] == len(lm_data.usable)
    for name in ("torch", "transformers", "numpy", "finesift", "python"):
        assert man["versions"][name] and man["versions"][name] != "not installed"
    assert man["finesift_version"] == finesift.__version__
    assert set(man["stages"]) == {"read", "load_model", "encode", "dedup", "score", "select"}
    for stage in man["stages"].values():
        assert stage["seconds"] >= 0 and stage["peak_rss_mb"] > 0 and stage["cpu_seconds"] >= 0
    assert man["peak_rss_mb"] > 0 and man["wall_seconds"] > 0
    assert man["selected"]["count"] == BUDGET
    assert sum(man["selected"]["by_source"].values()) == BUDGET
    info = man["method_info"]
    if options["mode"] == "basic":
        assert info["mode"] == "basic" and info["rounds"][0]["target_steps"] > 0
    else:
        assert [r["round"] for r in info["rounds"]] == [1, 2]
        assert info["base_set_size"] == 16
        assert sum(table["in_base_set"]) == 16


# --------------------------------------------------------------------------- strategies


@pytest.fixture(scope="module")
def interleaved_runs(lm_data, tiny_lm_dir: Path) -> dict[str, Any]:
    return {
        s: run(lm_data, tiny_lm_dir, method_options=INTERLEAVED, strategy=s, budget=10)
        for s in ("top", "length-binned", "score+random", "balanced")
    }


@pytest.mark.parametrize("strategy", ["top", "length-binned", "score+random", "balanced"])
def test_strategies_give_the_budget_without_repeats(interleaved_runs, strategy: str) -> None:
    sel = interleaved_runs[strategy]
    ids = sel.selected_ids
    assert len(ids) == 10 and len(set(ids)) == 10
    assert sel.manifest["strategy"] == strategy
    rank = sel.columns["selection_rank"]
    assert sorted(rank[rank >= 0].tolist()) == list(range(10))
    assert [sel.pool[i].id for i in np.argsort(np.where(rank < 0, 99, rank))[:10]] == ids


def test_score_plus_random_draws_its_random_half_from_the_base_set(interleaved_runs) -> None:
    sel = interleaved_runs["score+random"]
    in_base = sel.columns["in_base_set"]
    assert in_base.sum() == 16
    index = {r.id: i for i, r in enumerate(sel.pool)}
    chosen = [index[i] for i in sel.selected_ids]
    # first half: the length-binned best; second half: uniform from U minus the first half
    best = select_indices(sel.scores, 5, strategy="length-binned",
                          lengths=sel.columns["n_label_tokens"])
    assert chosen[:5] == best.tolist()
    assert all(in_base[i] for i in chosen[5:]), chosen
    # the same scores as with top (the strategy never changes the method's scores)
    np.testing.assert_array_equal(sel.scores, interleaved_runs["top"].scores)


def test_balanced_takes_an_equal_share_of_each_pool_file(interleaved_runs) -> None:
    sel = interleaved_runs["balanced"]
    assert Counter(r.source for r in sel.selected) == Counter(
        {str(p): 5 for p in {r.source for r in sel.pool}})
    for src in {r.source for r in sel.pool}:  # each file's share is its own best
        mine = np.array([r.source == src for r in sel.pool])
        best = np.sort(sel.scores[mine])[::-1][:5]
        got = np.sort([sel.scores[i] for i, r in enumerate(sel.pool)
                       if r.source == src and r.id in set(sel.selected_ids)])[::-1]
        np.testing.assert_array_equal(got, best)


def test_balanced_hands_a_small_sources_unused_share_to_the_others() -> None:
    scores = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 0.5, 0.4, 0.3])
    groups = np.array(["a"] * 7 + ["b"] * 2 + ["c"])
    got = select_indices(scores, 6, strategy="balanced", groups=groups)
    # shares 2 / 2 / 1 (c has one example), the unit c cannot use goes to a; best first
    assert got.tolist() == [0, 1, 2, 7, 8, 9]
    assert select_indices(scores, 3, strategy="balanced", groups=groups).tolist() == [0, 7, 9]
    assert equal_shares(np.array([7, 2, 1]), 10).tolist() == [7, 2, 1]
    assert equal_shares(np.array([5, 5, 5]), 7).tolist() == [3, 2, 2]
    with pytest.raises(OptionError, match="balanced"):
        select_indices(scores, 3, strategy="balanced")


# --------------------------------------------------------------------------- budgets, options


def test_budget_as_percentage(lm_data, tiny_lm_dir: Path) -> None:
    sel = run(lm_data, tiny_lm_dir, method="random", method_options=None, budget="10%")
    assert len(sel.selected) == 8  # 10% of 80 usable pool records
    assert sel.manifest["budget"] == {"requested": "10%", "count": 8}


def test_budget_larger_than_pool(lm_data, tiny_lm_dir: Path) -> None:
    with pytest.raises(OptionError, match=r"budget 81 is larger than the pool \(80 "):
        run(lm_data, tiny_lm_dir, method="random", method_options=None, budget=81)


def test_budget_larger_than_the_usable_pool(tiny_lm_dir: Path, tmp_path: Path,
                                            write_jsonl) -> None:
    # 5 records read, 2 of them skipped at encoding (no label tokens left): 3 usable
    rows = [{"id": f"p{i}", "prompt": "a b", "completion": "cat dog"} for i in range(3)]
    rows += [{"id": f"long{i}", "prompt": " ".join(["the"] * 40), "completion": "cat"}
             for i in range(2)]
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    target = write_jsonl(tmp_path / "target.jsonl", rows[:1])
    with pytest.raises(OptionError) as info:
        finesift.select(pool, target, budget=4, method="random", model=str(tiny_lm_dir),
                        max_length=16)
    assert "budget 4" in str(info.value) and "(3 usable" in str(info.value)


def test_unknown_method_lists_the_available_ones(lm_data, tiny_lm_dir: Path) -> None:
    with pytest.raises(OptionError) as info:
        run(lm_data, tiny_lm_dir, method="tvo")
    msg = str(info.value)
    assert "'tvo'" in msg and "random" in msg and "tov" in msg


def test_unknown_method_option(lm_data, tiny_lm_dir: Path) -> None:
    with pytest.raises(OptionError, match=r"no option\(s\) learning_rate.*\blr\b"):
        run(lm_data, tiny_lm_dir, method_options={"learning_rate": 1e-3})
    with pytest.raises(OptionError, match="mode must be one of"):
        run(lm_data, tiny_lm_dir, method_options={"mode": "fast"})


def test_unknown_strategy_and_task(lm_data, tiny_lm_dir: Path) -> None:
    with pytest.raises(OptionError, match="length-binned"):
        run(lm_data, tiny_lm_dir, strategy="best")
    with pytest.raises(OptionError, match="'lm' or 'ner'"):
        run(lm_data, tiny_lm_dir, task="classify")
    with pytest.raises(OptionError, match="precision must be"):
        run(lm_data, tiny_lm_dir, precision="fp16")
    with pytest.raises(OptionError, match="batch size must be a positive integer"):
        run(lm_data, tiny_lm_dir, batch_size=0)


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_selection(lm_data, tiny_lm_dir: Path) -> None:
    a = run(lm_data, tiny_lm_dir, method_options=INTERLEAVED, strategy="score+random", seed=5)
    b = run(lm_data, tiny_lm_dir, method_options=INTERLEAVED, strategy="score+random", seed=5)
    assert a.selected_ids == b.selected_ids
    np.testing.assert_array_equal(a.scores, b.scores)


def test_random_method_seeds(lm_data, tiny_lm_dir: Path) -> None:
    def ids(seed: int) -> list[str]:
        return run(lm_data, tiny_lm_dir, method="random", method_options=None,
                   seed=seed).selected_ids

    first = ids(0)
    assert ids(0) == first
    assert set(ids(1)) != set(first)


def test_random_does_not_load_the_model(lm_data, tiny_lm_dir: Path, monkeypatch) -> None:
    def boom(*args: Any, **kw: Any):
        raise AssertionError("method random must not load the model")

    monkeypatch.setattr(loader, "load_model", boom)
    sel = run(lm_data, tiny_lm_dir, method="random", method_options=None)
    assert sel.manifest["model"] == {"name": str(tiny_lm_dir), "loaded": False}
    assert sel.manifest["method_options"] == {}
    assert len(sel.selected) == BUDGET


# --------------------------------------------------------------------------- NER


def _conll(sentences: list[tuple[list[str], list[str]]]) -> str:
    blocks = ["\n".join(f"{w}\t{t}" for w, t in zip(*s, strict=True)) for s in sentences]
    return "-DOCSTART-\tO\n\n" + "\n\n".join(blocks) + "\n"


def test_ner_end_to_end(tiny_ner_dir: Path, tmp_path: Path, write_jsonl) -> None:
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "tree", "river", "car", "road", "house", "book", "song", "game"]

    def target_like() -> tuple[list[str], list[str]]:
        # PER ... LOC sentences, as in the target
        return (
            [str(rng.choice(["john", "mary"])), "went", "to",
             str(rng.choice(["paris", "london"])), str(rng.choice(words))],
            ["B-PER", "O", "O", "B-LOC", "O"],
        )

    def other() -> tuple[list[str], list[str]]:
        # another domain: organisations, a tag the target never uses
        return ([str(w) for w in rng.choice(words, 6)],
                [str(t) for t in rng.choice(["B-ORG", "I-ORG", "O"], 6)])

    sents = [target_like() if i % 6 == 0 else other() for i in range(30)]
    planted = [i for i in range(30) if i % 6 == 0]
    pool = tmp_path / "pool.conll"
    pool.write_text(_conll(sents), encoding="utf-8")
    target = write_jsonl(tmp_path / "target.jsonl", [
        {"id": f"t{i}", "tokens": t, "tags": g} for i, (t, g) in enumerate(
            target_like() for _ in range(10))
    ])
    sel = finesift.select(
        pool, target, budget=5, task="ner", method="tov", model=str(tiny_ner_dir),
        method_options=BASIC, precision="fp32", out=tmp_path / "out",
    )
    assert len(sel.scores) == len(sel.pool) == 30
    assert np.all(np.isfinite(sel.scores))
    assert sel.pool[0].line == 3 and sel.pool[0].tokens == sents[0][0]
    man = sel.manifest
    assert man["data"]["labels"] == ["O", "B-LOC", "B-ORG", "B-PER", "I-ORG"]
    assert man["model"]["architecture"] == "BertForTokenClassification"
    assert man["model"]["head"].startswith("new (5 labels")
    # the target's tags rise, the other domain's ORG tags fall: planted sentences first
    assert sorted(np.argsort(-sel.scores)[:5].tolist()) == planted
    rows = [json.loads(x) for x in (tmp_path / "out" / "selected.jsonl").read_text().splitlines()]
    assert rows == [{"tokens": sents[i][0], "tags": sents[i][1]}
                    for i in np.argsort(-sel.scores)[:5]]


# --------------------------------------------------------------------------- truncation


def test_truncated_records_are_skipped_and_counted(tiny_lm_dir: Path, tmp_path: Path,
                                                    write_jsonl) -> None:
    long_prompt = " ".join(["the"] * 30)
    rows = [{"id": f"ok{i}", "prompt": "two plus two", "completion": "four"} for i in range(6)]
    rows += [{"id": f"cut{i}", "prompt": long_prompt, "completion": "four"} for i in range(3)]
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    target = write_jsonl(tmp_path / "target.jsonl", rows[:2] + rows[6:7])
    sel = finesift.select(pool, target, budget=3, method="tov", method_options=BASIC,
                          model=str(tiny_lm_dir), max_length=16, precision="fp32")
    assert [r.id for r in sel.pool] == [f"ok{i}" for i in range(6)]
    assert len(sel.scores) == 6 and np.all(np.isfinite(sel.scores))
    enc = sel.manifest["data"]["pool_encoding"]
    assert enc["skipped"] == {"no label tokens after truncation": 3}
    assert enc["skipped_ids"] == ["cut0", "cut1", "cut2"]
    assert sel.manifest["data"]["target_encoding"]["skipped"] == {
        "no label tokens after truncation": 1
    }
    assert sel.manifest["data"]["pool_records"] == 9  # as read


def test_target_with_every_record_truncated_away(tiny_lm_dir: Path, tmp_path: Path,
                                                 write_jsonl) -> None:
    long_prompt = " ".join(["the"] * 30)
    pool = write_jsonl(tmp_path / "pool.jsonl",
                       [{"id": f"p{i}", "text": "cat dog bird"} for i in range(4)])
    target = write_jsonl(tmp_path / "target.jsonl",
                         [{"id": f"t{i}", "prompt": long_prompt, "completion": "four"}
                          for i in range(3)])
    with pytest.raises(InputError) as info:
        finesift.select(pool, target, budget=2, method="tov", method_options=BASIC,
                        model=str(tiny_lm_dir), max_length=16)
    msg = str(info.value)
    assert str(target) in msg
    assert "no usable target records" in msg and "all 3 were skipped" in msg
    assert "truncation" in msg


def test_finesift_select_stays_callable_after_the_first_call() -> None:
    # importing the finesift.select subpackage once replaced the function with the module
    import finesift.api
    import finesift.select.strategies

    assert callable(finesift.select)
    assert finesift.select.__module__ == "finesift"


@pytest.mark.skipif(not reset_peak_rss(),
                    reason="the OS does not let the peak-RSS mark be reset")
def test_stopwatch_peaks_are_per_stage_and_nest() -> None:
    """Each stage reports its own peak memory; an enclosing stage keeps the peak of the
    stages inside it (they reset the process's mark) and CPU seconds are recorded; the
    process's peak still counts the 400 MiB block after later stages reset the mark."""
    from finesift.store import Stopwatch, peak_rss_mb

    outer, inner = Stopwatch(), Stopwatch()
    with outer.stage("select"):
        with inner.stage("big"):
            block = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
            del block
        with inner.stage("small"):
            sum(range(10_000))
    big, small = inner.stages["big"]["peak_rss_mb"], inner.stages["small"]["peak_rss_mb"]
    assert big > small + 300, (big, small)
    assert outer.stages["select"]["peak_rss_mb"] >= big
    with outer.stage("after"):
        pass
    assert peak_rss_mb() >= big - 0.1  # stage figures are rounded to 0.1 MiB
    assert big > outer.stages["after"]["peak_rss_mb"] + 300
    for rec in (*inner.stages.values(), *outer.stages.values()):
        assert rec["seconds"] >= 0 and rec["cpu_seconds"] >= 0


def test_stopwatch_nesting_as_the_bench_does_it() -> None:
    """A bench's stage around api.select's five stages, then the fine-tuning stages, twice:
    records with equal peaks must not be mistaken for one another."""
    from finesift.store import Stopwatch, manifest

    held = []
    for _ in range(2):
        bench = Stopwatch()
        with bench.stage("select"):
            api = Stopwatch()
            for name in ("read", "load_model", "encode", "score", "select"):
                with api.stage(name):
                    if name in ("load_model", "score"):  # the peak moves, and stays
                        held.append(np.ones(50 * 2**20 // 8))
        ft = Stopwatch()
        for name in ("load_model", "encode", "finetune", "eval"):
            with ft.stage(name):
                pass
        assert set(api.stages) == {"read", "load_model", "encode", "score", "select"}
        assert bench.stages["select"]["peak_rss_mb"] >= max(
            r["peak_rss_mb"] for r in api.stages.values())
    assert manifest._OPEN == []
    # the process's peak survives the per-stage resets
    assert manifest.peak_rss_mb() >= bench.stages["select"]["peak_rss_mb"] - 0.1  # rounded
