"""Head-to-head tables, the verdict line, the leaderboard, and a suite resumed from its
committed result files alone."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from test_bench import make_suite

from finesift.data.readers import load_records
from finesift.evaluate.bench import build_quick_model, pending_suites, run_bench
from finesift.evaluate.leaderboard import (
    BEGIN,
    END,
    read_suite,
    suite_summaries,
    summarize,
    verdict,
    write_leaderboard,
)


def _rows(losses: dict[str, np.ndarray], budgets=("10", "20"), seeds=(0, 1, 2)):
    """Result rows: ``losses[method]`` has shape (len(budgets) * len(seeds), n_test)."""
    rows = []
    for m, arr in losses.items():
        for u, (b, s) in enumerate((b, s) for b in budgets for s in seeds):
            rows.append({"method": m, "budget": b, "seed": s, "status": "ok",
                         "test_loss": float(arr[u].mean()), "test_losses": arr[u].tolist(),
                         "select_seconds": 2.0 if m != "random" else 0.01,
                         "select_cpu_seconds": 3.0, "select_peak_rss_mb": 100.0,
                         "finetune_seconds": 8.0, "eval_seconds": 2.0,
                         "finetune_cpu_seconds": 15.0, "eval_cpu_seconds": 4.0,
                         "finetune_peak_rss_mb": 400.0, "eval_peak_rss_mb": 300.0,
                         "selection_dir": f"sel-{m}-{s}"})
    return rows


METHODS = [{"label": "random", "name": "random"}, {"label": "tov", "name": "tov"},
           {"label": "less", "name": "less"}, {"label": "embed", "name": "embed"}]


def _planted(rng, gaps: dict[str, float], units=6, n=200):
    base = rng.gamma(4.0, 0.3, size=n)
    out = {}
    for m, gap in gaps.items():
        out[m] = base[None, :] * (1 - gap) + rng.normal(0, 0.1, size=(units, n))
    return out


def test_verdict_names_the_best_and_tells_noise_from_a_real_lead():
    rng = np.random.default_rng(0)
    # tov and less are equally good (8%, up to noise); embed is clearly behind (2%)
    rows = _rows(_planted(rng, {"random": 0.0, "tov": 0.08, "less": 0.08, "embed": 0.02}))
    sums = summarize(rows, METHODS, budgets=["10", "20"])
    by = {s.label: s for s in sums}
    assert by["tov"].improvement["mean"] == pytest.approx(8.0, abs=1.0)
    assert by["tov"].improvement["wins"] == 6 and by["tov"].improvement["pairs"] == 6
    assert by["random"].improvement is None
    assert set(by["tov"].by_budget) == {"10", "20"}
    # cost: 2 s of selection against 8 + 2 s for one random run
    assert by["tov"].multiples["wall"] == pytest.approx(0.2)
    assert by["tov"].multiples["peak"] == pytest.approx(100 / 400)
    line = verdict(rows, sums, n_resamples=500)
    best = max(("tov", "less"), key=lambda m: by[m].improvement["mean"])
    runner = "less" if best == "tov" else "tov"
    assert re.match(rf"Best: \*\*{best}\*\*, \+[78]\.\d% test log-loss against random", line)
    assert f"lead over the runner-up {runner}" in line
    assert "inside the noise" in line.split("text-only")[0]
    assert "lead over the best text-only baseline embed" in line
    assert line.split("text-only baseline embed")[1].count("outside the interval") == 1


def test_verdict_says_whether_auto_picked_the_leaderboards_best_candidate():
    rng = np.random.default_rng(3)
    # embed clearly best, dsir second; less is better than both but not a candidate
    # embed-cascade (embed after a dsir prefilter) is better still, but it is not the
    # candidate auto tried, so it must not count as the best candidate
    rows = _rows(_planted(rng, {"random": 0.0, "embed": 0.10, "dsir": 0.05, "less": 0.15,
                                "auto": 0.05, "embed-cascade": 0.20}))
    methods = [{"label": m, "name": m} for m in ("random", "embed", "dsir", "less", "auto")]
    methods.append({"label": "embed-cascade", "name": "embed", "prefilter": "dsir:20%"})
    # auto is never named the best method (its rows are its pick's), but its gain is shown
    best_auto = _rows(_planted(np.random.default_rng(6), {"random": 0.0, "embed": 0.10,
                                                          "auto": 0.30}))
    for r in best_auto:
        if r["method"] == "auto":
            r["auto_winner"] = "embed"
    line = verdict(best_auto, summarize(best_auto, methods[:2] + methods[4:5],
                                        budgets=["10", "20"]), n_resamples=200)
    assert line.startswith("Best: **embed**") and "runner-up" not in line, line
    assert re.search(r"\*\*auto\*\* \(\+(29|30)\.\d% \[\+\d+\.\d, \+\d+\.\d\] against random\) "
                     r"picked embed", line), line
    for pick, agrees in (("embed", True), ("dsir", False)):
        for r in rows:
            if r["method"] == "auto":
                r["auto_winner"] = pick
                r["method_options"] = '{"candidates": "embed,dsir"}'
        line = verdict(rows, summarize(rows, methods, budgets=["10", "20"]), n_resamples=200)
        tail = line.split("**auto**")[1].split(" picked ", 1)[1]
        assert tail.startswith(f"{pick} (3 of 3); of its candidates (embed, dsir, random)")
        assert ("ranking agrees" in tail) == agrees
        if not agrees:
            assert "the best candidate here is embed (embed)" in tail


def test_auto_agreement_matches_a_candidate_by_the_options_auto_gave_it():
    rng = np.random.default_rng(4)
    # the default (interleaved) tov is best, embed second, basic-mode tov behind embed;
    # a tov on a proxy is better than all but is never a candidate auto tried
    rows = _rows(_planted(rng, {"random": 0.0, "tov-paper": 0.20, "embed": 0.10,
                                "tov-tuned": 0.03, "tov-proxy": 0.30, "auto": 0.05}))
    methods = [{"label": "random", "name": "random"}, {"label": "embed", "name": "embed"},
               {"label": "tov-paper", "name": "tov", "options": {"mode": "interleaved"}},
               {"label": "tov-tuned", "name": "tov",
                "options": {"mode": "basic", "val_epochs": 2}},
               {"label": "tov-proxy", "name": "tov", "options": {"proxy": "iprox:0.5"}},
               {"label": "auto", "name": "auto"}]
    for given, agrees, shown in (
            ({"candidates": "embed,tov"}, True, "embed, tov, random"),
            ({"candidates": "embed,tov", "tov.mode": "basic", "tov.val_epochs": "2"}, False,
             "embed, tov as tov-tuned, random"),
            ({"candidates": "embed,tov", "tov.rounds": 5}, True,
             "embed, tov as tov-paper, tov-tuned, random")):
        for r in rows:
            if r["method"] == "auto":
                r["auto_winner"] = "tov"
                r["method_options"] = json.dumps(given)
        line = verdict(rows, summarize(rows, methods, budgets=["10", "20"]), n_resamples=200)
        tail = line.split("**auto**")[1].split(" picked ", 1)[1]
        assert f"of its candidates ({shown})" in tail, tail
        assert ("ranking agrees" in tail) == agrees, tail
        if not agrees:
            assert "the best candidate here is embed (embed)" in tail
        # no row runs tov with rounds=5: the plain tov rows stand in, and the line says so
        assert ("no row runs tov with auto's options" in tail) == ("tov.rounds" in given)
    # every candidate worse than random: random, the floor, is the best candidate
    rows = _rows(_planted(rng, {"random": 0.0, "embed": -0.05, "tov-tuned": -0.10,
                                "tov-paper": 0.10, "auto": 0.0}))
    for r in rows:
        if r["method"] == "auto":
            r["auto_winner"] = "embed"
            r["method_options"] = json.dumps({"candidates": "embed,tov", "tov.mode": "basic",
                                              "tov.val_epochs": 2})
    line = verdict(rows, summarize(rows, [m for m in methods if m["label"] != "tov-proxy"],
                                   budgets=["10", "20"]), n_resamples=200)
    assert "disagrees: the best candidate here is random (random)" in line, line


def test_cpu_multiple_is_a_lower_bound_where_resumed_trials_had_no_cpu_figure():
    from finesift.evaluate.leaderboard import fmt_multiples

    rng = np.random.default_rng(5)
    rows = _rows(_planted(rng, {"random": 0.0, "tov": 0.05}))
    methods = METHODS[:2]
    assert fmt_multiples(summarize(rows, methods, budgets=["10", "20"])[1]) == "0.2x / 0.16x / 0.25x"
    for r in rows:
        if r["method"] == "tov":
            r["select_cpu_partial"] = True
    tov = summarize(rows, methods, budgets=["10", "20"])[1]
    assert tov.cpu_partial and fmt_multiples(tov) == "0.2x / >=0.16x / 0.25x"


def test_compute_hours_counts_each_selection_once_and_no_reused_run():
    from finesift.evaluate.leaderboard import compute_hours

    rows = _rows({"random": np.ones((6, 3)), "tov": np.ones((6, 3))})
    # per method: 3 selections (one per seed) + 6 runs of 8 + 2 s
    want = 3 * 0.01 + 3 * 2.0 + 12 * 10.0
    assert compute_hours(rows) * 3600 == pytest.approx(want)
    rows[0]["reused_from"] = "elsewhere"
    rows.append({"method": "x", "status": "failed", "finetune_seconds": 99.0})
    assert compute_hours(rows) * 3600 == pytest.approx(want - 10.0)


def test_verdict_when_nothing_beats_random():
    rng = np.random.default_rng(1)
    rows = _rows(_planted(rng, {"random": 0.0, "tov": -0.05}))
    sums = summarize(rows, METHODS[:2], budgets=["10", "20"])
    assert verdict(rows, sums).startswith("No method beats random")
    assert verdict([], summarize([], METHODS, budgets=["10"])).startswith("No verdict yet")


def test_method_without_runs_is_marked_not_dropped():
    rng = np.random.default_rng(2)
    rows = _rows(_planted(rng, {"random": 0.0, "tov": 0.05}))
    sums = summarize(rows, METHODS, budgets=["10", "20"], skipped={"less": "too costly"})
    by = {s.label: s for s in sums}
    assert by["less"].note == "too costly" and by["less"].n_runs == 0
    assert by["embed"].note == "not run yet"


TINY = """name: tiny
task: lm
model: MODEL
max_length: 48
pool:
  - {name: noise, path: data/pool_noise.jsonl, limit: 30}
  - {name: seq, path: data/pool_seq.jsonl}
target:
  val: data/val.jsonl
  test: data/test.jsonl
methods: [random, dsir, {perplexity: {}, seeds: [0], label: ppl-one-seed},
          {auto: {candidates: "dsir,perplexity", steps: 2, trial_pool: 40}, seeds: [1]}]
budgets: [6, 12]
seeds: [0, 1]
finetune: {epochs: 1, lr: 3.0e-3, lora_rank: 4, batch_size: 4, eval_batch_size: 8}
results: results/tiny
leaderboard: RESULTS.md
flags: [corrupted]
skipped: {less: too costly for this test}
"""


@pytest.fixture(scope="module")
def committed(tmp_path_factory, write_jsonl):
    folder = tmp_path_factory.mktemp("suite")
    cfg = make_suite(folder, write_jsonl, "placeholder")
    # flag every third pool example, as the noisy suite flags its corrupted problems
    for name in ("pool_seq", "pool_noise"):
        path = folder / "data" / f"{name}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for i, r in enumerate(rows):
            r["corrupted"] = i % 3 == 0
        write_jsonl(path, rows)
    recs = load_records([str(p) for p in sorted((folder / "data").glob("*.jsonl"))], role="x")
    model = build_quick_model("lm", recs, folder / "tiny-model")
    cfg.write_text(TINY.replace("MODEL", str(model)))
    (folder / "RESULTS.md").write_text("# Results\n\nHand-written notes stay.\n")
    first = run_bench(cfg, out=folder / "out")
    return folder, cfg, first


def test_suite_writes_its_results_to_the_committed_folder(committed):
    folder, _, first = committed
    res = folder / "results" / "tiny"
    assert first.n_failed == 0 and first.n_done == 2 * 2 + 2 * 2 + 2 + 2
    for name in ("results.jsonl", "setup.json", "base.json", "suite.json", "report.md"):
        assert (res / name).is_file(), name
    assert not (folder / "out" / "results.jsonl").exists()
    rows = [json.loads(line) for line in (res / "results.jsonl").read_text().splitlines()]
    base = json.loads((res / "base.json").read_text())["all"]
    n_test = len(base["test_ids"])
    pool = {json.loads(line)["id"]: json.loads(line)
            for f in ("pool_seq", "pool_noise")
            for line in (folder / "data" / f"{f}.jsonl").read_text().splitlines()}
    for r in rows:
        assert len(r["test_losses"]) == n_test == r["n_test"]
        assert np.mean(r["test_losses"]) == pytest.approx(r["test_loss"], abs=1e-4)
        assert r["worse_than_untouched"] == (r["test_loss"] > base["base_test_loss"])
        want = np.mean([bool(pool[i]["corrupted"]) for i in r["selected_ids"]])
        assert r["share_corrupted"] == pytest.approx(want)
    # the one-seed methods ran on their seed only
    assert {r["seed"] for r in rows if r["method"] == "ppl-one-seed"} == {0}
    assert {r["seed"] for r in rows if r["method"] == "auto"} == {1}
    # auto's row says which candidate won its trials
    assert {r["auto_winner"] for r in rows if r["method"] == "auto"} <= {"dsir", "perplexity",
                                                                         "random"}


def test_leaderboard_is_written_between_markers_and_keeps_the_rest(committed):
    folder, _, _ = committed
    text = (folder / "RESULTS.md").read_text()
    assert text.startswith("# Results\n") and "Hand-written notes stay." in text
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    board = text.split(BEGIN)[1].split(END)[0]
    assert "**tiny**: " in board
    assert "| dsir |" in board and "| ppl-one-seed |" in board
    # a skipped cell points to its reason, listed once under the table
    assert "| less | not run (note 1) |" in board
    assert "\n1. too costly for this test\n" in board
    assert "corrupted" in board and "seeds 0" in board
    assert " picked " in board.split("**auto**")[1] and "of its candidates (dsir, perplexity" in board
    assert re.search(r"tiny: \d+ runs, \d+\.\d h", board)
    md = (folder / "results" / "tiny" / "report.md").read_text()
    assert "Head to head against random" in md and "Configuration as run" in md
    assert md.splitlines()[2].startswith(("Best:", "No method beats random"))


def test_suite_resumes_from_committed_results_alone(committed, tmp_path):
    """A new machine: the committed folder, the config and the data, no run folder."""
    folder, cfg, _ = committed
    board = (folder / "RESULTS.md").read_text()
    shutil.rmtree(folder / "out")
    again = run_bench(cfg, out=tmp_path / "fresh")
    assert (again.n_done, again.n_failed) == (0, 0) and again.n_skipped == 12
    assert (folder / "RESULTS.md").read_text().split(BEGIN)[1].split(END)[0] == \
        board.split(BEGIN)[1].split(END)[0]
    # the report and the leaderboard come back from the result files alone
    only = run_bench(cfg, out=tmp_path / "report", report_only=True)
    assert only.n_done == 0 and (tmp_path / "report" / "report.html").is_file()
    suite = read_suite(folder / "results" / "tiny")
    sums = {s.label: s for s in suite_summaries(suite)}
    assert sums["dsir"].improvement["pairs"] == 4 and sums["ppl-one-seed"].improvement["pairs"] == 2
    (folder / "RESULTS.md").write_text("# Results\n")
    write_leaderboard(folder / "results", folder / "RESULTS.md")
    assert "| dsir |" in (folder / "RESULTS.md").read_text()
    # a configured suite that has not run yet gets a column of marked cells, not nothing
    (folder / "other.yaml").write_text(cfg.read_text().replace("name: tiny", "name: other")
                                       .replace("results/tiny", "results/other"))
    write_leaderboard(folder / "results", folder / "RESULTS.md",
                      pending=pending_suites(folder, folder / "results"))
    board = (folder / "RESULTS.md").read_text()
    assert "| method | tiny | other |" in board
    assert "| dsir | +" in board and "| not run yet |" in board
    assert "**other**: No verdict yet" in board
