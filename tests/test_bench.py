"""``finesift bench``: a quick benchmark end to end (rows, tables, reports), resuming,
config errors and the overlap guard, and the HTML report rendered in headless Chromium."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from finesift.cli import main
from finesift.evaluate.bench import ConfigError, load_config, quick_budgets, run_bench
from finesift.evaluate.overlap import OverlapError
from finesift.methods.base import REGISTRY, Method, MethodResult

PATTERN = ["alpha", "beta", "gamma", "delta", "zeta", "theta", "kappa", "sigma", "omega",
           "lambda"]
NOISE = ["cat", "dog", "bird", "fish", "tree", "river", "city", "car", "road", "house", "book",
         "red", "blue"]
CHROMIUM = Path("/usr/bin/chromium")

CONFIG = """name: tiny
task: lm
model: smollm2-135m
max_length: 64
pool:
  - {name: noise, path: data/pool_noise.jsonl, limit: 30}
  - {name: seq, path: data/pool_seq.jsonl}
target:
  val: data/val.jsonl
  test: data/test.jsonl
methods: [random, {tov: {mode: basic, lr: 3.0e-3, val_epochs: 2}}]
budgets: [8, 25%]
seeds: [0, 1]
finetune: {epochs: 1, lr: 2.0e-4, lora_rank: 4, batch_size: 4}
"""



def make_suite(folder: Path, write_jsonl, config: str = CONFIG) -> Path:
    """A tiny suite: target = continue a word cycle; pool = 36 such records + 40 noise chats."""
    rng = np.random.default_rng(0)
    seqs = [{"prompt": f"please continue the sequence from {PATTERN[s]}",
             "completion": " ".join(PATTERN[(s + j) % 10] for j in range(n))}
            for s in range(10) for n in range(4, 14)]
    seqs = [seqs[i] for i in rng.permutation(len(seqs))]
    for i, r in enumerate(seqs):
        r["id"] = f"seq-{i}"
    noise = [{"id": f"noise-{i}", "messages": [
        {"role": "user", "content": " ".join(rng.choice(NOISE, 4))},
        {"role": "assistant", "content": " ".join(rng.choice(NOISE, 8))}]} for i in range(40)]
    write_jsonl(folder / "data/val.jsonl", seqs[:8])
    write_jsonl(folder / "data/test.jsonl", seqs[8:24])
    write_jsonl(folder / "data/pool_seq.jsonl", seqs[24:60])
    write_jsonl(folder / "data/pool_noise.jsonl", noise)
    path = folder / "bench.yaml"
    path.write_text(config)
    return path


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, write_jsonl):
    folder = tmp_path_factory.mktemp("bench")
    cfg = make_suite(folder, write_jsonl)
    out = folder / "out"
    messages: list[str] = []
    result = run_bench(cfg, out=out, quick=True, log=messages.append)
    return cfg, out, result, messages


def test_quick_bench_end_to_end(quick_run) -> None:
    _, out, result, _ = quick_run
    # quick: 24 records per pool source (noise limited to 30 first), budgets kept as shares
    assert result.n_done == 8 and result.n_failed == 0 and result.n_skipped == 0
    assert {r["budget"] for r in result.rows} == {"6", "12"}
    for name in ("results.jsonl", "results.csv", "results.json", "report.md", "report.html"):
        assert (out / name).is_file(), name
    with open(out / "results.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 8
    for col in ("method", "budget", "seed", "test_loss", "base_test_loss",
                "improvement_over_random_pct", "n_from_noise", "n_from_seq", "select_seconds",
                "select_peak_rss_mb", "finetune_seconds", "finetune_peak_rss_mb",
                "eval_seconds"):
        assert col in table[0], col
    rows = json.loads((out / "results.json").read_text())
    for r in rows:
        assert r["status"] == "ok"
        assert r["n_train"] == int(r["budget"]) == len(r["selected_ids"])
        assert r["n_from_noise"] + r["n_from_seq"] == r["n_train"]
        assert np.isfinite(r["test_loss"]) and r["finetune_seconds"] > 0
        if r["method"] == "random":
            assert r["improvement_over_random_pct"] == 0.0
    # ToV on a pool holding target-like data picks it (random takes about half)
    share = {m: np.mean([r["n_from_seq"] / r["n_train"] for r in rows if r["method"] == m])
             for m in ("random", "tov")}
    assert share["tov"] > 0.9 and share["random"] < 0.8, share
    md = (out / "report.md").read_text()
    assert "% test log-loss improvement over random, mean ± std over seeds" in md
    assert re.search(r"\| tov \| [+-]\d+\.\d\d ± \d+\.\d\d \(n=2\) \|", md)
    assert "| lora_rank | 4 |" in md and "quick" in md
    page = (out / "report.html").read_text()
    assert page.count('<img class="plot"') == 4
    assert "http://" not in page and "https://" not in page  # self-contained


def test_bench_resumes(quick_run) -> None:
    cfg, out, _, _ = quick_run
    lines = (out / "results.jsonl").read_text().splitlines()
    again = run_bench(cfg, out=out, quick=True)
    assert (again.n_done, again.n_skipped) == (0, 8)
    assert (out / "results.jsonl").read_text().splitlines() == lines
    # lose the last finished run (and leave a torn line, as a kill mid-write would)
    (out / "results.jsonl").write_text("\n".join(lines[:-1]) + '\n{"key": "tov|')
    messages: list[str] = []
    third = run_bench(cfg, out=out, quick=True, log=messages.append)
    assert (third.n_done, third.n_skipped) == (1, 7)
    assert not any("scoring the pool" in m for m in messages)  # the selection was reused
    last = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert last["key"] == json.loads(lines[-1])["key"]
    assert last["selected_ids"] == json.loads(lines[-1])["selected_ids"]


def test_bench_cli_quick(tmp_path, write_jsonl, capsys) -> None:
    cfg = make_suite(tmp_path, write_jsonl, CONFIG.replace("methods: [random, {tov: {mode: "
                                                           "basic, lr: 3.0e-3, val_epochs: 2}}]",
                                                           "methods: [random]"))
    rc = main(["bench", "--config", str(cfg), "--quick", "--out", str(tmp_path / "o"),
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "4 run(s) done (0 already finished, 0 failed)" in out
    assert f"wrote {tmp_path / 'o' / 'report.html'}" in out


def test_overlap_with_pool_is_rejected(tmp_path, write_jsonl, capsys) -> None:
    cfg = make_suite(tmp_path, write_jsonl)
    test = (tmp_path / "data/test.jsonl").read_text().splitlines()
    # a test record appears in the pool under another id
    leaked = json.loads(test[3])
    leaked["id"] = "copied"
    with open(tmp_path / "data/pool_seq.jsonl", "a") as fh:
        fh.write(json.dumps(leaked) + "\n")
    rc = main(["bench", "--config", str(cfg), "--quick", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("finesift: error: the test set (")
    assert "data/test.jsonl) overlaps the pool source 'seq' (" in err
    assert "data/pool_seq.jsonl): 1 exact duplicate(s): test " in err
    assert "test.jsonl:4 (id seq-11) = pool source 'seq'" in err and "(id copied)" in err
    assert not (tmp_path / "o" / "results.jsonl").exists()


def test_overlap_with_val_is_rejected(tmp_path, write_jsonl) -> None:
    cfg = make_suite(tmp_path, write_jsonl)
    val = (tmp_path / "data/val.jsonl").read_text().splitlines()
    test = (tmp_path / "data/test.jsonl").read_text().splitlines()
    (tmp_path / "data/test.jsonl").write_text("\n".join(test + val[:2]) + "\n")
    with pytest.raises(OverlapError, match=r"overlaps the val set \(.*val\.jsonl\): 2 exact "
                                           r"duplicate\(s\): test .*test\.jsonl:17 \(id seq-0\)"):
        run_bench(cfg, out=tmp_path / "o", quick=True)


@pytest.mark.parametrize("change, message", [
    ("task: lm\n", "task: expected lm or ner"),
    ("seeds: [0, 1]\n", "seeds: expected a non-empty list of integers"),
    ("budgets: [8, 25%]\n", "budgets: budget 500 is larger than the pool"),
    ("methods: [random, {tov: {mode: basic, lr: 3.0e-3, val_epochs: 2}}]\n",
     "method 'tov' has no option(s) colour"),
    ("finetune: {epochs: 1, lr: 2.0e-4, lora_rank: 4, batch_size: 4}\n",
     "finetune: unknown key(s) rank"),
])
def test_config_errors(tmp_path, write_jsonl, change: str, message: str) -> None:
    bad = {
        "task: lm\n": "task: llm\n",
        "seeds: [0, 1]\n": "seeds: zero\n",
        "budgets: [8, 25%]\n": "budgets: [500]\n",
        "methods: [random, {tov: {mode: basic, lr: 3.0e-3, val_epochs: 2}}]\n":
            "methods: [random, {tov: {colour: red}}]\n",
        "finetune: {epochs: 1, lr: 2.0e-4, lora_rank: 4, batch_size: 4}\n":
            "finetune: {rank: 4}\n",
    }[change]
    cfg = make_suite(tmp_path, write_jsonl, CONFIG.replace(change, bad))
    with pytest.raises(ConfigError) as err:
        run_bench(cfg, out=tmp_path / "o")
    assert str(err.value).startswith(f"{cfg}: ") and message in str(err.value)


def test_test_limit_keeps_the_first_test_records(tmp_path, write_jsonl) -> None:
    from finesift.evaluate.bench import prepare_data

    text = CONFIG.replace("  test: data/test.jsonl\n", "  test: data/test.jsonl\n  test_limit: 5\n")
    cfg = load_config(make_suite(tmp_path, write_jsonl, text))
    full = [json.loads(line)["id"] for line in (tmp_path / "data/test.jsonl").read_text().splitlines()]
    data = prepare_data(cfg, tmp_path / "out")
    assert [r.id for r in data.test] == full[:5]
    bad = make_suite(tmp_path / "bad", write_jsonl, text.replace("test_limit: 5", "test_limit: 0"))
    with pytest.raises(ConfigError, match="target.test_limit: expected a positive count"):
        load_config(bad)


def test_paths_are_relative_to_the_config(tmp_path, write_jsonl) -> None:
    cfg = load_config(make_suite(tmp_path / "suite", write_jsonl))
    assert cfg.val == (tmp_path / "suite/data/val.jsonl").resolve()
    assert [s.limit for s in cfg.pool] == [30, None]
    assert [m.label for m in cfg.methods] == ["random", "tov"]
    assert quick_budgets([128, "10%"], 1000, 48) == [6, 5]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_html_report_renders_in_chromium(quick_run, tmp_path) -> None:
    _, out, _, _ = quick_run

    def render(page: Path) -> tuple[str, str]:
        proc = subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
             f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120, check=False,
        )
        return proc.stdout, proc.stderr

    dom, log = render(out / "report.html")
    console = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert console == []
    assert 'data-plots-loaded="4"' in dom
    assert "4 of 4 plots rendered" in dom

    # the check can fail: a corrupt plot is not counted, a script error is logged
    page = (out / "report.html").read_text()
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace("base64,iVBOR", "base64,XXXX", 1)
                      .replace("</body>", "<script>notDefined();</script></body>"))
    dom, log = render(broken)
    assert 'data-plots-loaded="3"' in dom
    assert any(":CONSOLE" in line and "notDefined" in line for line in log.splitlines())
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def test_changed_setup_is_not_mixed_with_old_results(quick_run, tmp_path) -> None:
    cfg, out, _, _ = quick_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    # other fine-tuning hyperparameters: refuse to resume into the old folder
    other = cfg.parent / "bench-lr.yaml"
    other.write_text(cfg.read_text().replace("lora_rank: 4", "lora_rank: 8"))
    with pytest.raises(ConfigError, match=r"holds results of another setup \(changed: finetune\)"):
        run_bench(other, out=copy, quick=True)
    # other method options: a new method key, so those runs are redone, random's are not
    other.write_text(cfg.read_text().replace("val_epochs: 2", "val_epochs: 1"))
    again = run_bench(other, out=copy, quick=True)
    assert (again.n_done, again.n_skipped) == (4, 4)
    assert len(list((copy / "selections").glob("tov-*-seed0"))) == 2


def test_results_of_the_other_auto_precision_are_not_mixed(quick_run, tmp_path,
                                                          monkeypatch) -> None:
    """A folder measured where ``auto`` meant bf16 does not take runs where it means fp32
    (and the other way round); FINESIFT_FAST_BF16 makes the CPU match; --report-only
    (runs nothing) still reads it."""
    cfg, out, _, _ = quick_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    was_bf16 = json.loads((copy / "setup.json").read_text()).get("auto_precision") == "bf16"
    monkeypatch.setenv("FINESIFT_FAST_BF16", "0" if was_bf16 else "1")
    with pytest.raises(ConfigError, match=r"changed: auto_precision\).*FINESIFT_FAST_BF16"):
        run_bench(cfg, out=copy, quick=True)
    assert run_bench(cfg, out=copy, quick=True, report_only=True).n_done == 0
    monkeypatch.setenv("FINESIFT_FAST_BF16", "1" if was_bf16 else "0")
    again = run_bench(cfg, out=copy, quick=True)
    assert again.n_done == 0 and again.n_skipped > 0


HARP_CONFIG = CONFIG.replace(
    "methods: [random, {tov: {mode: basic, lr: 3.0e-3, val_epochs: 2}}]",
    "methods: [random, {harp-c: {embedder: tokens, leaf_size: 4, steps: 2, repeats: 1}},\n"
    "          {harp-e: {embedder: tokens, leaf_size: 4, steps: 2, repeats: 1}}]",
).replace("seeds: [0, 1]", "seeds: [0]")


def test_quick_bench_runs_harp_per_budget_and_reports_its_cost(tmp_path, write_jsonl):
    cfg = make_suite(tmp_path, write_jsonl, HARP_CONFIG)
    out = tmp_path / "out"
    result = run_bench(cfg, out=out, quick=True)
    assert result.n_failed == 0 and result.n_done == 6
    rows = {(r["method"], r["budget"]): r for r in result.rows}
    for m in ("harp-c", "harp-e"):
        for b in ("6", "12"):
            r = rows[(m, b)]
            # HARP's own choice is the subset: at most the budget, possibly fewer
            assert r["n_train"] == r["n_selected_by_harp"] <= r["budget_count"]
            assert r["train_evaluate_runs"] >= 2
            assert r["selection_dir"].endswith(f"-b{b}")
            assert (out / r["selection_dir"] / "manifest.json").exists()
            sel = json.loads((out / r["selection_dir"] / "manifest.json").read_text())
            assert sel["method_info"]["budget"] == r["budget_count"]
    # the leaf measurements are shared by a method's budgets (done once per method), not
    # across methods: each method's cost is what it costs alone
    for m in ("harp-c", "harp-e"):
        runs_files = list((out / "work").glob(f"{m}-*/harp_runs-*.json"))
        assert len(runs_files) == 1
        measured = len(json.loads(runs_files[0].read_text())["runs"])
        assert measured == rows[(m, "6")]["train_evaluate_runs"]
    assert not list((out / "work").glob("harp_runs-*.json"))
    report = (out / "report.md").read_text()
    assert "train-eval runs" in report


@dataclasses.dataclass
class _FixedOptions:
    tag: str = "a"  # changes the method key, not the choice
    reverse: bool = False  # score by the reverse order instead


class _FixedOrder(Method):
    """Scores the pool by its order alone (or its reverse order): every seed, budget and
    tag picks the same."""

    name = "t-fixed-order"
    description = "test only"
    needs_model = False
    Options = _FixedOptions

    def score(self, ctx):
        s = -np.arange(len(ctx.pool), dtype=np.float64)
        return MethodResult(scores=-s if self.options.reverse else s)


def test_quick_bench_reuses_the_figures_of_an_identical_subset(tmp_path, write_jsonl,
                                                               monkeypatch):
    monkeypatch.setitem(REGISTRY, _FixedOrder.name, _FixedOrder)
    two = (CONFIG.replace("methods: [random, {tov: {mode: basic, lr: 3.0e-3, val_epochs: 2}}]",
                          "methods: [{t-fixed-order: {tag: a}}, {t-fixed-order: {tag: b}}]")
           .replace("seeds: [0, 1]", "seeds: [0]"))
    cfg = make_suite(tmp_path, write_jsonl, two)
    messages: list[str] = []
    result = run_bench(cfg, out=tmp_path / "out", quick=True, log=messages.append)
    assert result.n_failed == 0 and result.n_done == 4
    rows = {(r["method"], r["budget"]): r for r in result.rows}
    budgets = sorted({b for _, b in rows})
    for b in budgets:
        first, second = rows[("t-fixed-order[tag=a]", b)], rows[("t-fixed-order[tag=b]", b)]
        assert second["selected_ids"] == first["selected_ids"]
        assert "reused_from" not in first and first["finetune_seconds"] > 0
        assert second["reused_from"] == first["key"]
        assert second["finetune_seconds"] == 0.0
        assert second["test_loss"] == first["test_loss"]
        assert second["machine"] == first["machine"] and second["machine"]  # its selection's
    # the two budgets differ, so neither reuses the other
    assert (rows[("t-fixed-order[tag=a]", budgets[0])]["test_loss"]
            != rows[("t-fixed-order[tag=a]", budgets[1])]["test_loss"])
    assert sum("figures are reused" in m for m in messages) == 2
    assert "(2 reused)" in (tmp_path / "out" / "report.md").read_text()
    # the reuse is right: fine-tuning the second method's subsets afresh gives the same loss
    alone = make_suite(tmp_path / "alone", write_jsonl,
                       two.replace("{t-fixed-order: {tag: a}}, ", ""))
    fresh = {r["budget"]: r for r in run_bench(alone, out=tmp_path / "alone-out",
                                               quick=True).rows}
    for b in budgets:
        assert "reused_from" not in fresh[b]
        assert fresh[b]["test_loss"] == pytest.approx(
            rows[("t-fixed-order[tag=b]", b)]["test_loss"], rel=1e-6)


def test_quick_bench_tunes_finetuning_for_random_on_val(tmp_path, write_jsonl):
    config = (CONFIG.replace("methods: [random, {tov: {mode: basic, lr: 3.0e-3, val_epochs: 2}}]",
                             "methods: [random]")
              .replace("seeds: [0, 1]", "seeds: [0]")
              + "tune: {lr: [1.0e-5, 3.0e-2], epochs: [1]}\n")
    cfg = make_suite(tmp_path, write_jsonl, config)
    out = tmp_path / "out"
    messages: list[str] = []
    result = run_bench(cfg, out=out, quick=True, log=messages.append)
    assert result.n_failed == 0
    tuning = json.loads((out / "tuning.json").read_text())
    points = list(tuning["points"].values())
    assert len(points) == 2
    best = min(points, key=lambda p: p["val_loss"])
    # the tiny random model learns nothing in one epoch at lr 1e-5: the larger lr wins
    assert best["params"] == {"epochs": 1, "lr": 3.0e-2}
    setup = json.loads((out / "setup.json").read_text())
    assert setup["finetune"]["lr"] == 3.0e-2
    report = (out / "report.md").read_text()
    assert "Tuned once for random selection" in report and "| yes |" in report
    # resuming reuses the finished grid points
    messages.clear()
    run_bench(cfg, out=out, quick=True, log=messages.append)
    assert not any("tuning for random:" in m for m in messages)
    # a report written without running anything keeps the tuning table and the rows
    (out / "report.md").unlink()
    again = run_bench(cfg, out=out, quick=True, report_only=True)
    assert again.n_done == 0 and len(again.rows) == len(result.rows)
    report = (out / "report.md").read_text()
    assert "| yes |" in report and "measured time of the finished runs" in report
    with pytest.raises(ConfigError, match="no benchmark results"):
        run_bench(cfg, out=tmp_path / "empty", quick=True, report_only=True)


def test_config_rejects_a_bad_tune_grid(tmp_path, write_jsonl):
    cfg = make_suite(tmp_path, write_jsonl, CONFIG + "tune: {max_length: [32, 64]}\n")
    with pytest.raises(ConfigError, match="tune.max_length: not tunable"):
        load_config(cfg)
    cfg = make_suite(tmp_path, write_jsonl, CONFIG + "tune: {lr: [-1.0]}\n")
    with pytest.raises(ConfigError, match="lr must be positive"):
        load_config(cfg)


def test_seeds_first_runs_every_method_on_a_seed_before_the_next(tmp_path, write_jsonl):
    from finesift.evaluate.bench import run_order

    cfg = load_config(make_suite(tmp_path, write_jsonl, CONFIG.replace(
        "methods: [random, {tov: {mode: basic, lr: 3.0e-3, val_epochs: 2}}]",
        "methods: [random, {dsir: {}, seeds: [1]}, embed]")
        .replace("seeds: [0, 1]", "seeds: [0, 1, 2]")))
    by_method = [(s.label, seed) for s, seed in run_order(cfg.methods, cfg.seeds)]
    by_seed = [(s.label, seed) for s, seed in run_order(cfg.methods, cfg.seeds, True)]
    assert by_method == [("random", 0), ("random", 1), ("random", 2), ("dsir", 1),
                         ("embed", 0), ("embed", 1), ("embed", 2)]
    assert by_seed == [("random", 0), ("embed", 0), ("random", 1), ("dsir", 1),
                       ("embed", 1), ("random", 2), ("embed", 2)]


@dataclasses.dataclass
class _FixedOptionsReversed(_FixedOptions):
    reverse: bool = True  # the same option, a new default


def test_a_changed_default_runs_again_instead_of_reusing(tmp_path, write_jsonl, monkeypatch):
    """The config names no options, so the run key stays; the recorded options (defaults
    included) tell the old runs and selections from the new."""
    monkeypatch.setitem(REGISTRY, _FixedOrder.name, _FixedOrder)
    cfg = make_suite(tmp_path, write_jsonl, CONFIG.replace(
        "methods: [random, {tov: {mode: basic, lr: 3.0e-3, val_epochs: 2}}]",
        "methods: [t-fixed-order]").replace("seeds: [0, 1]", "seeds: [0]"))
    first = run_bench(cfg, out=tmp_path / "out", quick=True)
    assert first.n_done == 2 and first.n_failed == 0
    assert all(r["resolved_options"] == {"tag": "a", "reverse": False} for r in first.rows)
    again = run_bench(cfg, out=tmp_path / "out", quick=True)
    assert again.n_done == 0 and again.n_skipped == 2

    monkeypatch.setattr(_FixedOrder, "Options", _FixedOptionsReversed)
    messages: list[str] = []
    changed = run_bench(cfg, out=tmp_path / "out", quick=True, log=messages.append)
    assert changed.n_done == 2 and changed.n_skipped == 0
    assert sum("options changed since it ran" in m for m in messages) == 2
    assert sum("scoring again" in m for m in messages) == 1
    old = {r["budget"]: r["selected_ids"] for r in first.rows}
    for r in changed.rows:
        assert r["resolved_options"] == {"tag": "a", "reverse": True}
        assert r["selected_ids"] != old[r["budget"]]


def test_only_and_seeds_restrict_the_runs_and_name_the_choices(tmp_path, write_jsonl):
    from finesift.evaluate.bench import restrict_order, run_order

    cfg = load_config(make_suite(tmp_path, write_jsonl, CONFIG.replace(
        "methods: [random, {tov: {mode: basic, lr: 3.0e-3, val_epochs: 2}}]",
        "methods: [random, {dsir: {}, label: dsir-x}, embed]")
        .replace("seeds: [0, 1]", "seeds: [0, 1, 2]")))
    order = run_order(cfg.methods, cfg.seeds, True)
    kept = restrict_order(order, cfg, ["embed", "random"], [0, 2])
    assert [(s.label, seed) for s, seed in kept] == [("random", 0), ("embed", 0),
                                                     ("random", 2), ("embed", 2)]
    assert restrict_order(order, cfg, None, None) == order
    with pytest.raises(ConfigError, match=r"no method labelled dsir; .*random, dsir-x, embed"):
        restrict_order(order, cfg, ["dsir"], None)
    with pytest.raises(ConfigError, match=r"--seeds: 5 not among"):
        restrict_order(order, cfg, None, [5])


# --------------------------------------------------------------------------- cascade rows

TOV = "{tov: {mode: basic, lr: 3.0e-3, val_epochs: 2}}"
CASCADE_METHODS = (f"methods: [{TOV}, {{tov: {{mode: basic, lr: 3.0e-3, val_epochs: 2}}, "
                   "prefilter: \"t-fixed-order:25%\", label: tov-cascade}]")


def _with_methods(methods: str, **replace: str) -> str:
    text = CONFIG.replace(f"methods: [random, {TOV}]", methods)
    for old, new in replace.items():
        text = text.replace(old, new)
    return text


def test_method_prefilter_parses_and_enters_the_key_only_when_set(tmp_path, write_jsonl):
    from finesift.evaluate.bench import MethodSpec

    cfg = load_config(make_suite(tmp_path, write_jsonl, _with_methods(
        "methods: [random, {tov: {mode: basic, val_epochs: 2}, label: tov-tuned}, "
        "{tov: {mode: basic, val_epochs: 2}, prefilter: ' embed:20% ', label: tov-cascade}, "
        "{tov: {mode: basic, val_epochs: 2}, prefilter: {method: dsir, share: 50, "
        "options: {sampling: top}}, label: tov-dsir}]")))
    plain, cascade, by_dict = cfg.methods[1:]
    assert [m.prefilter for m in cfg.methods] == [
        None, None, "embed:20%", {"method": "dsir", "share": 50, "options": {"sampling": "top"}}]
    assert plain.options == cascade.options == by_dict.options
    # without a prefilter the key is the one it was before prefilters existed (the value
    # committed result rows carry: benchmarks/results/*/results.jsonl)
    assert plain.key == "tov-tuned#9a2253c1"
    assert MethodSpec("random", {}, "random").key == "random#bf21a9e8"
    # with one, the same label and options get another key, hence other runs and folders
    same_label = MethodSpec("tov", dict(plain.options), "tov-tuned", prefilter="embed:20%")
    assert same_label.key != plain.key and same_label.dirname != plain.dirname
    assert same_label.key.startswith("tov-tuned#")
    assert MethodSpec("tov", dict(plain.options), "tov-tuned", prefilter="embed:10%").key \
        not in (plain.key, same_label.key)
    # unlabelled entries told apart by their prefilter alone get distinct labels
    twins = load_config(make_suite(tmp_path / "twins", write_jsonl, _with_methods(
        f"methods: [{TOV}, {{tov: {{mode: basic, lr: 3.0e-3, val_epochs: 2}}, "
        "prefilter: \"dsir:50%\"}]")))
    assert len({m.label for m in twins.methods}) == 2
    assert "prefilter=dsir:50%" in twins.methods[1].label


def test_committed_result_rows_keep_their_keys() -> None:
    """The shipped suites' method keys still find their committed runs, and the large
    suite's plain rows share those keys while its cascade row has its own."""
    bench_dir = Path(__file__).resolve().parent.parent / "benchmarks"
    cfg = load_config(bench_dir / "instruct-gsm8k.yaml")
    committed = {json.loads(line)["key"].split("|")[0] for line in
                 (bench_dir / "results/instruct-gsm8k/results.jsonl").read_text().splitlines()
                 if line.strip()}
    keys = {m.label: m.key for m in cfg.methods}
    for label in ("random", "dsir-add1", "embed", "tov-tuned"):
        assert keys[label] in committed, label
    large = load_config(bench_dir / "instruct-gsm8k-large.yaml")
    by_label = {m.label: m for m in large.methods}
    assert [m.label for m in large.methods] == ["random", "embed", "dsir-add1", "tov-tuned",
                                                "tov-cascade", "tov-cascade-10"]
    for label in ("random", "embed", "dsir-add1", "tov-tuned"):
        assert by_label[label].prefilter is None and by_label[label].key == keys[label]
    assert by_label["tov-cascade"].prefilter == "embed:20%"
    assert by_label["tov-cascade-10"].prefilter == "embed:10%"
    for label in ("tov-cascade", "tov-cascade-10"):
        assert by_label[label].options == by_label["tov-tuned"].options
    assert len({m.key for m in large.methods}) == len(large.methods)
    committed_large = {json.loads(line)["key"].split("|")[0] for line in
                       (bench_dir / "results/instruct-gsm8k-large/results.jsonl")
                       .read_text().splitlines() if line.strip()}
    assert by_label["tov-cascade"].key in committed_large
    assert large.tune is None and large.budgets == [50, 100] and large.seeds == [0, 1, 2]
    assert [(s.name, s.limit) for s in large.pool] == [("sharegpt", 2000), ("gsm8k", 200)]


@pytest.mark.parametrize("value, message", [
    ('"embed:abc"', "embed:abc: the share 'abc' must be a count"),
    ('"embed:0%"', "embed:0%: the share '0%' must be"),
    ('"embed"', "'embed': expected METHOD:SHARE"),
    ('"nosuch:20%"', "nosuch:20%: unknown method 'nosuch'"),
    ('"auto:20%"', "auto:20%: auto chooses a method"),
    ('"dsir:10%,colour=red"', "dsir:10%,colour=red: method 'dsir' has no option(s) colour"),
    ("20", "expected METHOD:SHARE"),
    ("{method: dsir}", "expected a mapping with method, share"),
])
def test_a_bad_method_prefilter_is_a_config_error(tmp_path, write_jsonl, value: str,
                                                  message: str) -> None:
    cfg = make_suite(tmp_path, write_jsonl, _with_methods(
        f"methods: [random, {{tov: {{mode: basic}}, prefilter: {value}, label: tov-cascade}}]"))
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    text = str(err.value)
    assert text.startswith(f"{cfg}: methods: tov-cascade.prefilter: "), text
    assert message in text
    assert "--prefilter" not in text  # the config's key is named, not select's flag


def test_a_prefilter_keeping_less_than_the_budget_stops_before_any_run(tmp_path, write_jsonl,
                                                                      monkeypatch):
    monkeypatch.setitem(REGISTRY, _FixedOrder.name, _FixedOrder)
    cfg = make_suite(tmp_path, write_jsonl, _with_methods(
        "methods: [random, {tov: {mode: basic}, prefilter: \"t-fixed-order:4\", "
        "label: tov-cascade}]", **{"seeds: [0, 1]": "seeds: [0]"}))
    with pytest.raises(ConfigError, match=r"methods: tov-cascade.prefilter: t-fixed-order:4 "
                                          r"keeps 4 of the 48 pool examples, fewer than the "
                                          r"largest budget 12"):
        run_bench(cfg, out=tmp_path / "out", quick=True)
    assert not (tmp_path / "out" / "results.jsonl").exists()
    assert not (tmp_path / "out" / "setup.json").exists()  # stopped before the setup too


def _kept_ids(out: Path, row: dict) -> list[str]:
    """The pool ids the row's selection kept through its prefilter (its scores table)."""
    import pyarrow.parquet as pq

    table = pq.read_table(out / row["selection_dir"] / "scores.parquet").to_pydict()
    return [i for i, kept in zip(table["id"], table["prefilter_kept"], strict=True) if kept]


def test_quick_bench_runs_a_cascade_row_beside_the_plain_method(tmp_path, write_jsonl,
                                                                monkeypatch):
    """A cascade row selects with the prefilter (here one that keeps the first quarter of
    the pool: noise records only, which plain ToV would not pick), records it, and neither
    reuses the plain method's selection nor lets the plain method reuse its own."""
    import pyarrow.parquet as pq

    monkeypatch.setitem(REGISTRY, _FixedOrder.name, _FixedOrder)
    one_run = {"seeds: [0, 1]": "seeds: [0]", "budgets: [8, 25%]": "budgets: [8]"}
    cfg = make_suite(tmp_path, write_jsonl, _with_methods(CASCADE_METHODS, **one_run))
    out = tmp_path / "out"
    messages: list[str] = []
    result = run_bench(cfg, out=out, quick=True, log=messages.append)
    assert result.n_failed == 0 and result.n_done == 2, messages
    rows = {r["method"]: r for r in result.rows}
    plain, cascade = rows["tov"], rows["tov-cascade"]
    assert "prefilter" not in plain and cascade["prefilter"] == "t-fixed-order:25%"
    assert cascade["key"].split("|")[0] != plain["key"].split("|")[0]
    assert cascade["selection_dir"] != plain["selection_dir"]
    assert any("scoring the pool with tov-cascade" in m for m in messages)
    # the prefilter kept the first quarter of the 48-example pool: 12 noise records
    pool_ids = [json.loads(line)["id"] for name in ("pool-noise", "pool-seq")
                for line in (out / "data" / f"{name}.jsonl").read_text().splitlines()]
    kept = _kept_ids(out, cascade)
    assert kept == pool_ids[:12] and all(i.startswith("noise-") for i in kept)
    assert len(cascade["selected_ids"]) == 6 and set(cascade["selected_ids"]) <= set(kept)
    assert cascade["n_from_seq"] == 0
    # the plain method scored the whole pool (no prefilter) and picked target-like records
    plain_table = pq.read_table(out / plain["selection_dir"] / "scores.parquet")
    assert "prefilter_kept" not in plain_table.column_names
    assert not set(plain["selected_ids"]) <= set(kept) and plain["n_from_seq"] > 0
    manifest = json.loads((out / cascade["selection_dir"] / "manifest.json").read_text())
    assert (manifest["prefilter"]["method"], manifest["prefilter"]["kept"]) == (
        "t-fixed-order", 12)
    with open(out / "results.csv", newline="") as fh:
        assert {r["method"]: r["prefilter"] for r in csv.DictReader(fh)} == {
            "tov": "", "tov-cascade": "t-fixed-order:25%"}

    # the plain entry given the prefilter under its old label: new runs, not the old ones
    moved = make_suite(tmp_path / "moved", write_jsonl, _with_methods(
        "methods: [{tov: {mode: basic, lr: 3.0e-3, val_epochs: 2}, "
        "prefilter: \"t-fixed-order:25%\"}]", **one_run))
    messages.clear()
    again = run_bench(moved, out=out, quick=True, log=messages.append)
    assert again.n_done == 1 and again.n_skipped == 0, messages
    assert any("scoring the pool with tov, seed 0" in m for m in messages)
    (row,) = again.rows
    assert row["method"] == "tov" and row["prefilter"] == "t-fixed-order:25%"
    assert row["selection_dir"] != plain["selection_dir"]
    assert set(row["selected_ids"]) <= set(_kept_ids(out, row))
    # and it resumes like any row
    assert run_bench(moved, out=out, quick=True).n_skipped == 1
