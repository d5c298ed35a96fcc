"""``--method auto``: trials on folds of the target pick the method that helps held-out
target examples, and the final selection is that method's with every target example.

The planted data set has two target "dialects": the target examples of one trial fold
continue the Greek-letter cycle, those of the other fold a fruit cycle (the folds are
computed with :func:`finesift.evaluate.auto.split_folds`, as auto computes them). The pool
holds both cycles and noise. Three toy methods, registered for these tests only:

* ``toy-good`` selects cycle records of both dialects (it helps every target example);
* ``toy-copycat`` selects the pool records most like the target it was *given*: with the
  other fold as its target it picks the other dialect, useless on the held-out fold. A
  protocol that measured the loss on the examples the method saw (or let it see the
  held-out fold) would rate it best;
* ``toy-bad`` selects the noise (worse than random): picking by the wrong sign of the
  loss would choose it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import itertools
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import finesift
from finesift.cli import main
from finesift.errors import OptionError
from finesift.evaluate import auto
from finesift.methods.base import REGISTRY, Method, MethodContext, MethodResult, register

GREEK = ["alpha", "beta", "gamma", "delta", "zeta", "theta", "kappa", "sigma", "omega", "lambda"]
FRUIT = ["apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "peach", "pear", "plum"]
NOISE = ["cat", "dog", "bird", "fish", "tree", "river", "city", "car", "road", "house", "book",
         "story", "song", "music", "film", "game", "red", "blue", "green", "black", "run", "walk"]
N_TARGET = 12
BUDGET = 12
SEED = 0
# a random 2-layer model learns within a few steps at this lr
AUTO = {"candidates": "toy-copycat,toy-good,toy-bad", "steps": 40, "lr": 1e-2,
        "batch_size": 8}


def _bigrams(text: str) -> set[tuple[str, str]]:
    return set(itertools.pairwise(re.findall(r"[a-z]+", text.lower())))


def _text(rec) -> str:
    if rec.messages:
        return " ".join(m["content"] for m in rec.messages)
    return " ".join(x for x in (rec.prompt, rec.completion, rec.text) if x)


def _jitter(rec_id: str, target_ids: list[str]) -> float:
    """A tie-breaker in [0, 1) that depends on the target the method was given: the final
    selection (every target example) orders its picks unlike any trial's."""
    blob = rec_id + "|" + ",".join(sorted(target_ids))
    return int(hashlib.sha256(blob.encode()).hexdigest()[:8], 16) / 2**32


@dataclasses.dataclass
class _NoOptions:
    pass


SEEN: list[tuple[str, str, tuple[str, ...]]] = []  # ("select", method, target ids) / ("eval", ...)


class _Toy(Method):
    description = "test only"
    needs_model = False
    Options = _NoOptions

    def useful(self, rec_id: str, bigrams: set, target_bigrams: set) -> float:
        raise NotImplementedError

    def score(self, ctx: MethodContext) -> MethodResult:
        tids = [r.id for r in ctx.target_records]
        SEEN.append(("select", self.name, tuple(sorted(tids))))
        target = set().union(*(_bigrams(_text(r)) for r in ctx.target_records))
        scores = [self.useful(r.id, _bigrams(_text(r)), target) + 0.5 * _jitter(r.id, tids)
                  for r in ctx.pool_records]
        return MethodResult(scores=np.asarray(scores))


class _Good(_Toy):
    name = "toy-good"

    def useful(self, rec_id, bigrams, target_bigrams):
        return float("greek" in rec_id or "fruit" in rec_id)


class _Copycat(_Toy):
    name = "toy-copycat"

    def useful(self, rec_id, bigrams, target_bigrams):
        return len(bigrams & target_bigrams) / max(1, len(bigrams))


class _Bad(_Toy):
    name = "toy-bad"

    def useful(self, rec_id, bigrams, target_bigrams):
        return float("backwards" in rec_id)


def _cycle(words: list[str], start: int, n: int = 12) -> str:
    return " ".join(words[(start + j) % len(words)] for j in range(n))


def make_data(folder: Path, write_jsonl) -> dict[str, Any]:
    """Target: fold 1 (as auto splits it) Greek cycles, fold 2 fruit cycles; pool: 16 of
    each cycle and 48 noise records."""
    rng = np.random.default_rng(0)
    fold1, _ = auto.split_folds(N_TARGET, 2, SEED)
    target = [{"id": f"t{i}", "prompt": "please continue the sequence",
               "completion": _cycle(GREEK if i in set(fold1.tolist()) else FRUIT,
                                    int(rng.integers(10)))}
              for i in range(N_TARGET)]
    kinds = {
        "greek": lambda: _cycle(GREEK, int(rng.integers(10))),
        "fruit": lambda: _cycle(FRUIT, int(rng.integers(10))),
        # the same words, every step backwards: teaches the wrong continuation
        "backwards": lambda: _cycle((GREEK if rng.random() < 0.5 else FRUIT)[::-1],
                                    int(rng.integers(10))),
        "noise": lambda: " ".join(str(w) for w in rng.choice(NOISE, 12)),
    }
    order = ["greek", "fruit", "backwards", "backwards", "noise"]
    pool = []
    for i in range(80):
        kind = order[i % 5]
        pool.append({"id": f"p{i}-{kind}", "text": kinds[kind]()})
    return {"pool": write_jsonl(folder / "pool.jsonl", pool),
            "target": write_jsonl(folder / "target.jsonl", target)}


@pytest.fixture(scope="module")
def toys():
    added = [register(cls) for cls in (_Good, _Copycat, _Bad)]
    yield
    for cls in added:
        REGISTRY.pop(cls.name, None)


@pytest.fixture(scope="module")
def tiny_auto_lm(tmp_path_factory) -> Path:
    """A tiny LM whose vocabulary knows the fruit words too."""
    from finesift.testing import tiny_causal_lm, tiny_tokenizer

    path = tmp_path_factory.mktemp("auto_lm")
    tok = tiny_tokenizer(["please", "continue", "sequence"])
    tiny_causal_lm(len(tok)).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory, write_jsonl) -> dict[str, Any]:
    return make_data(tmp_path_factory.mktemp("auto_data"), write_jsonl)


@pytest.fixture(scope="module")
def planted_run(toys, data, tiny_auto_lm, tmp_path_factory):
    """auto over the toys (random added), with every trial's select and eval recorded."""
    out = tmp_path_factory.mktemp("auto_run") / "out"
    evals: list[tuple[str, ...]] = []
    real = auto.finetune_and_evaluate

    def spy(train, test, **kw):
        SEEN.append(("eval", "train" if train else "base", tuple(sorted(r.id for r in test))))
        evals.append(tuple(r.id for r in test))
        return real(train, test, **kw)

    SEEN.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(auto, "finetune_and_evaluate", spy)
        sel = finesift.select(data["pool"], data["target"], budget=BUDGET, method="auto",
                              method_options=AUTO, model=str(tiny_auto_lm), precision="fp32",
                              out=out, seed=SEED)
    return {"sel": sel, "out": out, "events": list(SEEN)}


# --------------------------------------------------------------------------- the choice


def test_auto_picks_the_method_that_helps_the_held_out_fold(planted_run) -> None:
    section = planted_run["sel"].manifest["auto"]
    loss = {row["method"]: row["mean_heldout_loss"] for row in section["trials"]}
    assert [row["method"] for row in section["trials"]] == [
        "toy-copycat", "toy-good", "toy-bad", "random"]
    assert section["winner"] == "toy-good", loss
    assert loss["toy-good"] == min(loss.values())
    # the signs are right: the helpful method lowers the held-out loss below random,
    # the harmful one raises it, and the improvement over random says so
    assert loss["toy-good"] < loss["random"] < loss["toy-bad"], loss
    gain = {row["method"]: row["improvement_over_random_pct"] for row in section["trials"]}
    assert gain["toy-good"] > 0 > gain["toy-bad"] and gain["random"] == 0.0
    # the copycat fits the fold it was given, which is the other dialect: measured on
    # the held-out fold it loses to toy-good on every fold
    per_fold = {row["method"]: row["heldout_loss_per_fold"] for row in section["trials"]}
    assert all(g < c for g, c in zip(per_fold["toy-good"], per_fold["toy-copycat"], strict=True))


def test_each_trial_is_measured_on_the_fold_its_method_did_not_see(planted_run, data) -> None:
    """Every toy select of a trial saw one fold as its target; the fine-tune that followed
    was measured on the other fold (disjoint, and together the whole target)."""
    everything = {f"t{i}" for i in range(N_TARGET)}
    events = planted_run["events"]
    folds = [tuple(sorted(f"t{i}" for i in f)) for f in auto.split_folds(N_TARGET, 2, SEED)]
    trials = 0
    for j, (kind, name, ids) in enumerate(events):
        if kind != "select" or set(ids) == everything:
            continue
        nxt = events[j + 1]
        assert nxt[0] == "eval" and nxt[1] == "train", events[j:j + 2]
        assert not set(ids) & set(nxt[2]), (name, ids, nxt)
        assert set(ids) | set(nxt[2]) == everything
        assert nxt[2] in folds
        trials += 1
    assert trials == 3 * 2  # three toys x two folds
    # untouched-model measurements: once per fold, on the held-out fold
    assert sorted(e[2] for e in events if e[1] == "base") == sorted(folds)
    # the final selection: the winner alone, with every target example, and no eval
    finals = [e for e in events if e[0] == "select" and set(e[2]) == everything]
    assert finals == [("select", "toy-good", tuple(sorted(everything)))]
    assert events[-1] == finals[0]


def test_final_selection_is_the_winners_with_every_target_example(planted_run, data,
                                                                  tiny_auto_lm, toys) -> None:
    sel = planted_run["sel"]
    direct = finesift.select(data["pool"], data["target"], budget=BUDGET, method="toy-good",
                             model=str(tiny_auto_lm), precision="fp32", seed=SEED)
    assert sel.selected_ids == direct.selected_ids  # the same ids in the same order
    np.testing.assert_array_equal(sel.scores, direct.scores)
    assert all(("greek" in i or "fruit" in i) for i in sel.selected_ids)
    man = json.loads((planted_run["out"] / "manifest.json").read_text())
    assert man["method"] == "toy-good" and man["auto"]["winner"] == "toy-good"
    lines = (planted_run["out"] / "selected.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == sel.selected_ids


def test_manifest_holds_the_trial_table_and_settings(planted_run) -> None:
    man = json.loads((planted_run["out"] / "manifest.json").read_text())
    section = man["auto"]
    for row in section["trials"]:
        assert len(row["heldout_loss_per_fold"]) == 2
        assert row["mean_heldout_loss"] == pytest.approx(np.mean(row["heldout_loss_per_fold"]))
        assert row["select_seconds"] > 0 and row["finetune_seconds"] > 0
        assert row["n_selected_per_fold"] == [BUDGET, BUDGET]
        assert [r["fold"] for r in row["runs"]] == [1, 2]
    st = section["settings"]
    assert st["candidates"] == ["toy-copycat", "toy-good", "toy-bad", "random"]
    assert st["folds"] == 2 and st["fold_sizes"] == [6, 6] and st["seeds"] == [SEED]
    assert st["trial_pool_used"] == st["pool_records"] == 80 and st["trial_budget"] == BUDGET
    assert st["finetune"]["steps"] == 40 and st["finetune"]["lr"] == 1e-2
    assert len(section["base_heldout_loss_per_fold"]) == 2
    assert man["wall_seconds"] >= section["trial_seconds"]
    # this process ran every trial: nothing resumed, and each part's CPU is recorded
    assert section["resumed_trial_seconds"] == 0 == section["resumed_trial_cpu_seconds"]
    runs = [r for row in section["trials"] for r in row["runs"]]
    assert not any(r["select_resumed"] or r["finetune_resumed"] for r in runs)
    assert all(r["select_cpu_seconds"] > 0 and r["finetune_cpu_seconds"] > 0 for r in runs)


def test_a_rerun_resumes_from_the_finished_trials(planted_run, data, tiny_auto_lm,
                                                  monkeypatch) -> None:
    def boom(*args, **kw):
        raise AssertionError("every trial fine-tune was finished before")

    monkeypatch.setattr(auto, "finetune_and_evaluate", boom)
    SEEN.clear()
    again = finesift.select(data["pool"], data["target"], budget=BUDGET, method="auto",
                            method_options=AUTO, model=str(tiny_auto_lm), precision="fp32",
                            out=planted_run["out"], seed=SEED)
    # no trial selected again: only the final selection ran
    assert [e[1] for e in SEEN] == ["toy-good"]
    assert again.selected_ids == planted_run["sel"].selected_ids
    assert [r["mean_heldout_loss"] for r in again.manifest["auto"]["trials"]] == [
        r["mean_heldout_loss"] for r in planted_run["sel"].manifest["auto"]["trials"]]
    # the resumed trials' cost is the first run's recorded cost of them: wall and CPU
    first = [r for row in planted_run["sel"].manifest["auto"]["trials"] for r in row["runs"]]
    section = again.manifest["auto"]
    assert all(r["select_resumed"] and r["finetune_resumed"]
               for row in section["trials"] for r in row["runs"])
    assert section["resumed_trial_seconds"] == pytest.approx(
        sum(r["select_seconds"] + r["finetune_seconds"] for r in first), abs=0.01)
    assert section["resumed_trial_cpu_seconds"] == pytest.approx(
        sum(r["select_cpu_seconds"] + r["finetune_cpu_seconds"] for r in first), abs=0.01)
    # the harness adds them to the selection's cost
    from finesift.evaluate.bench import add_resumed_trials

    cost = add_resumed_trials({"seconds": 2.0, "cpu_seconds": 3.0}, again.manifest)
    assert cost["seconds"] == pytest.approx(2.0 + section["resumed_trial_seconds"], abs=0.01)
    assert cost["cpu_seconds"] == pytest.approx(3.0 + section["resumed_trial_cpu_seconds"],
                                                abs=0.01)
    assert "cpu_partial" not in cost
    # trials recorded before auto kept CPU figures: wall added, CPU marked partial
    old = {"auto": {**section, "resumed_trial_cpu_seconds": None}}
    assert add_resumed_trials({"seconds": 2.0, "cpu_seconds": 3.0}, old)["cpu_partial"]
    assert add_resumed_trials({"seconds": 2.0}, {"stages": {}}) == {"seconds": 2.0}


def test_ties_go_to_the_cheaper_then_the_earlier_candidate() -> None:
    def rows(*pairs):
        return [{"method": m, "mean_heldout_loss": x} for m, x in pairs]

    pick = auto.pick_winner
    assert pick(rows(("tov", 1.0), ("dsir", 1.0), ("random", 1.2)))["method"] == "dsir"
    assert pick(rows(("tov", 1.0), ("random", 1.0)))["method"] == "random"
    assert pick(rows(("toy-a", 1.0), ("toy-b", 1.0)))["method"] == "toy-a"
    assert pick(rows(("tov", 0.9), ("random", 1.0)))["method"] == "tov"


def test_pool_subsample_is_seeded_and_stratified_by_source() -> None:
    sources = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    pick = auto.stratified_sample(sources, 20, seed=0)
    assert len(set(pick.tolist())) == 20 and list(pick) == sorted(pick)
    assert [sum(sources[i] == s for i in pick) for s in "abc"] == [12, 6, 2]
    np.testing.assert_array_equal(pick, auto.stratified_sample(sources, 20, seed=0))
    assert set(pick.tolist()) != set(auto.stratified_sample(sources, 20, seed=1).tolist())
    assert auto.stratified_sample(sources, 500, seed=0).tolist() == list(range(100))
    folds = auto.split_folds(7, 3, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(7))
    assert sorted(len(f) for f in folds) == [2, 2, 3]


# --------------------------------------------------------------------------- the CLI


def test_cli_prints_the_trial_table_and_the_winner(lm_data, tiny_lm_dir: Path, tmp_path: Path,
                                                   capsys) -> None:
    out = tmp_path / "out"
    rc = main(["select", "--pool", *map(str, lm_data.pool), "--target", str(lm_data.target),
               "--out", str(out), "--model", str(tiny_lm_dir), "--no-progress",
               "--budget", "16", "--method", "auto", "--precision", "fp32",
               "-o", "candidates=dsir", "-o", "steps=4", "-o", "lr=3e-3",
               "-o", "dsir.sampling=top", "-o", "trial_pool=50"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    man = json.loads((out / "manifest.json").read_text())
    section = man["auto"]
    assert man["method"] == section["winner"]
    assert section["trials"][0]["options"] == {"sampling": "top"}
    assert man["method_options"].get("sampling") == ("top" if man["method"] == "dsir" else None)
    st = section["settings"]
    assert st["trial_pool_used"] == 50 and st["trial_budget"] == 10  # 16 x 50 / 80
    # stratified by pool file: 25 of each 40-record file
    data_dir = next((out / ".work" / "auto").glob("data-*"))
    assert sorted(len(p.read_text().splitlines()) for p in data_dir.glob("pool-*")) == [25, 25]
    text = captured.out
    table, summary = text.split("selected 16 of 80 pool examples")
    assert table.startswith("auto: 2-fold trials on 50 of 80 pool examples (trial budget 10)")
    header = table.splitlines()[1].split()
    assert header[:3] == ["method", "fold", "1"] and "vs random" in table
    for row in section["trials"]:
        line = next(x for x in table.splitlines() if x.split()[:1] == [row["method"]])
        assert f"{row['mean_heldout_loss']:.4f}" in line
        assert f"{row['improvement_over_random_pct']:+.2f}%" in line
    assert f"winner: {section['winner']} (mean held-out loss" in table
    assert "wrote" in summary and "Traceback" not in captured.err


def test_methods_lists_auto_and_its_options(capsys) -> None:
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines if not line.startswith(" ")]
    assert "auto" in names and names == sorted(names)
    start = next(i for i, x in enumerate(lines) if x.startswith("auto "))
    block = lines[start + 1:start + 12]
    for option in ("candidates = 'embed,dsir,tov,random'", "folds = 2", "trial_pool = 2000",
                   "steps = 20", "seeds = 1"):
        assert f"    {option}" in block


# --------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(("options", "message"), [
    ({"candidates": "tov,nope"}, (r"unknown candidate method\(s\) 'nope'; registered "
                                  r"methods: .*dsir.*random.*tov")),
    ({"candidates": "auto,tov"}, "cannot be one of its own candidates"),
    ({"candidates": ""}, "candidates is empty"),
    ({"folds": 1}, "folds must be at least 2"),
    ({"folds": "two"}, "folds='two' is not an integer"),
    ({"steps": 0}, "steps must be at least 1"),
    ({"trial_pool": -5}, "trial_pool must be at least 1"),
    ({"seeds": True}, "seeds=True is not an integer"),
    ({"lr": "fast"}, "lr='fast' is not a number"),
    ({"lr": -1}, "lr must be a positive number"),
    ({"step": 3}, r"no option\(s\) step; its options are: candidates, folds"),
    ({"mode": "basic"}, r"METHOD\.mode"),
    ({"candidates": "dsir", "tov.mode": "basic"}, "'tov' is not a candidate"),
    ({"candidates": "tov", "tov.mode": "fast"}, "mode must be one of"),
    ({"candidates": "tov", "tov.nope": 1}, r"method 'tov' has no option\(s\) nope"),
    ({"candidates": "tov", "tov.": 1}, "expected METHOD.KEY=VALUE"),
])
def test_bad_options_are_option_errors(options, message) -> None:
    with pytest.raises(OptionError, match=message):
        auto.parse_options(options)


def test_options_parse_and_random_is_always_a_candidate() -> None:
    plan = auto.parse_options({"candidates": "tov,less,harp-c,tov", "folds": "3",
                               "trial_pool": 500, "steps": 10, "lr": "1e-3", "seeds": 1,
                               "tov.mode": "basic"})
    assert plan.candidates == ["tov", "less", "harp-c", "random"]
    assert plan.options.folds == 3 and plan.options.lr == 1e-3 and plan.options.steps == 10
    assert plan.candidate_options == {"tov": {"mode": "basic"}, "less": {}, "harp-c": {},
                                      "random": {}}
    assert auto.parse_options(None).candidates == ["embed", "dsir", "tov", "random"]


def test_run_level_errors(lm_data, tiny_lm_dir: Path) -> None:
    kw = {"budget": 4, "method": "auto", "model": str(tiny_lm_dir)}
    with pytest.raises(OptionError, match="13 folds need at least 13 target examples, the "
                                          "target has 12"):
        finesift.select(lm_data.pool, lm_data.target, method_options={"folds": 13}, **kw)
    with pytest.raises(OptionError, match="cannot run as a shard"):
        finesift.select(lm_data.pool, lm_data.target, num_shards=2, shard_index=0,
                        out="unused", **kw)
    with pytest.raises(OptionError, match="budget"):
        finesift.select(lm_data.pool, lm_data.target, **{**kw, "budget": None})


def test_select_auto_takes_selects_keywords_with_selects_defaults(lm_data) -> None:
    """``select_auto`` reads its defaults from the ``select`` it is given: a keyword that
    ``select`` does not take is refused by name, and a default comes from ``select``."""
    from finesift.api import select
    from finesift.evaluate.auto import select_auto

    with pytest.raises(OptionError, match="unknown option.s. bogus; select takes budget"):
        select_auto(lm_data.pool, lm_data.target, select_with=select, budget=4,
                    bogus=1)

    def sharded_select(*args, **kwargs):
        raise AssertionError("not reached: the shard check comes first")

    # select's signature with num_shards=3 for a default: select_auto must take it from
    # the select it is given (with select's own default of 1 it would not stop)
    sig = inspect.signature(select)
    sharded_select.__signature__ = sig.replace(parameters=[
        p.replace(default=3) if p.name == "num_shards" else p for p in sig.parameters.values()])
    with pytest.raises(OptionError, match="cannot run as a shard"):
        select_auto(lm_data.pool, lm_data.target, select_with=sharded_select, budget=4)


@pytest.mark.parametrize(("argv", "message"), [
    (["-o", "candidates=tov,nope"], "unknown candidate method(s) 'nope'; registered methods: "),
    (["-o", "candidates=auto"], "cannot be one of its own candidates"),
    (["-o", "folds=1"], "folds must be at least 2"),
    (["-o", "tov.mode=fast"], "mode must be one of"),
    (["--proxy", "iprox:0.5"], "--proxy is not an option of --method auto"),
    (["--envelope", "c"], "--envelope is an option of --method harp"),
])
def test_cli_bad_options_exit_2_with_one_line(lm_data, tiny_lm_dir: Path, tmp_path: Path,
                                              capsys, argv, message) -> None:
    rc = main(["select", "--pool", *map(str, lm_data.pool), "--target", str(lm_data.target),
               "--out", str(tmp_path / "out"), "--model", str(tiny_lm_dir), "--budget", "8",
               "--method", "auto", "--no-progress", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("finesift: error: ") and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
