"""``finesift select --estimate``: the projection's arithmetic (given rates and token counts,
exactly what the method's cost model says), every method's cost declaration, the probes
measuring on a tiny model, and the command printing its projection without writing."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from finesift.data.records import Example
from finesift.engine.cost import (
    Cost,
    Pass,
    Probe,
    ProbeResult,
    shuffled_tokens,
    sorted_tokens,
)
from finesift.errors import OptionError
from finesift.estimator import Calibrator, project
from finesift.methods.base import MethodContext, available, get_method

FORWARD_RATE, TRAIN_RATE, PROBE_RATE = 1e-3, 3e-3, 2e-6
GIVEN = {"forward": FORWARD_RATE, "train": TRAIN_RATE, "probe": PROBE_RATE}


class LengthTask:
    """A task that only knows lengths: what a cost model needs of it."""

    def length(self, example: Example) -> int:
        return len(example)


def examples(lengths: list[int]) -> list[Example]:
    return [Example(i, np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64), n - 1)
            for i, n in enumerate(lengths)]


def context(pool: list[int], target: list[int], batch_size: int = 3) -> MethodContext:
    return MethodContext(pool=examples(pool), target=examples(target), pool_records=[],
                         target_records=[], task=LengthTask(), model=None, batch_size=batch_size,
                         precision="fp32")


# -- token counts ------------------------------------------------------------------------


def test_padded_token_counts() -> None:
    # length-sorted batches of 2: [9, 5], [3, 1] -> 2 x 9 + 2 x 3
    assert sorted_tokens([5, 3, 9, 1], 2) == 24
    # the 4096-token cap splits a batch: rows x longest <= 4096
    assert sorted_tokens([3000, 3000], 2) == 6000
    # "auto" batch sizes: no padding counted
    assert sorted_tokens([5, 3, 9, 1], "auto") == 18
    # training: the random batches of engine.train.train (same generator, same draws)
    lengths = np.array([4, 8, 2, 6, 10])
    rng = np.random.default_rng(7)
    expected = 0
    for _ in range(2):  # 2 epochs of 3 steps (the last batch holds one row)
        perm = rng.permutation(5)
        expected += sum(len(perm[s:s + 2]) * lengths[perm[s:s + 2]].max() for s in (0, 2, 4))
    assert shuffled_tokens(lengths, 2, 2.0, seed=7) == expected
    assert shuffled_tokens(lengths, 2, 2.0, max_steps=1, seed=7) < expected


# -- the arithmetic ------------------------------------------------------------------------


def projected(method: str, options: dict, ctx: MethodContext, stages: dict | None = None):
    calibrate = Calibrator(ctx, given=GIVEN)
    cost = get_method(method, options).cost(ctx)
    passes, fixed, wall = project(cost, calibrate, stages or {})
    assert all(not r.measured for r in calibrate.rates.values())  # nothing was timed
    return cost, passes, fixed, wall


def test_tov_basic_projection_is_its_cost_model_times_the_rates() -> None:
    # pool: 6 examples of 10 tokens; target: 4 of 5; scoring batches of 3; training batches of 2
    ctx = context([10] * 6, [5] * 4, batch_size=3)
    _, passes, fixed, wall = projected("tov", {"mode": "basic", "val_epochs": 2,
                                               "batch_size": 2}, ctx, {"read": 1.0})
    # 2 epochs x 2 steps x 2 rows x 5 tokens on the target; 2 passes x 2 batches x 3 x 10
    assert [(p.kind, p.units) for p in passes] == [("train", 40), ("forward", 120)]
    assert [p.seconds_per_unit for p in passes] == [TRAIN_RATE, FORWARD_RATE]
    assert fixed == 0
    assert wall == pytest.approx(1.0 + 40 * TRAIN_RATE + 120 * FORWARD_RATE, abs=1e-12)


@pytest.mark.parametrize(("mode", "u_epochs"), [("interleaved", 1), ("parallel", 2)])
def test_tov_rounds_projection(mode: str, u_epochs: int) -> None:
    ctx = context([10] * 6, [5] * 4, batch_size=3)
    _, passes, _, wall = projected("tov", {"mode": mode, "rounds": 2, "base_size": 4,
                                           "batch_size": 2}, ctx)
    # per round: U (4 pool examples: 2 steps x 2 x 10) once (twice for parallel), the target
    # (2 steps x 2 x 5); then 2 forward passes per round over the pool (2 x 3 x 10 each)
    assert [p.units for p in passes] == [2 * u_epochs * 40, 2 * 20, 4 * 60]
    assert wall == pytest.approx((2 * u_epochs * 40 + 40) * TRAIN_RATE + 240 * FORWARD_RATE,
                                 abs=1e-12)


def test_forward_methods_project_one_pass() -> None:
    ctx = context([12, 7, 7, 3], [5], batch_size=2)
    for method in ("perplexity", "uncertainty"):
        _, passes, _, wall = projected(method, {}, ctx)
        assert [p.units for p in passes] == [2 * 12 + 2 * 7]  # [12, 7], [7, 3]
        assert wall == pytest.approx(38 * FORWARD_RATE, abs=1e-12)
    cost, passes, _, wall = projected("random", {}, ctx)
    assert passes == [] and wall == 0 and cost.disk == {}


def test_less_projection_counts_its_warmup_gradients_and_projection() -> None:
    ctx = context([10] * 8, [6] * 3, batch_size=4)
    opts = {"warmup_epochs": 2, "min_warmup": 4, "batch_size": 2, "chunk_size": 4,
            "projection": "sparse", "proj_dim": 64}
    cost, passes, _, wall = projected("less", opts, ctx)
    kinds = [(p.kind, p.units) for p in passes]
    # warm-up: 2 epochs x 2 steps x 2 rows x 10 on 4 pool examples
    assert kinds[0] == ("train", 80)
    # gradients: 2 checkpoints x (pool: 2 chunks of 4 x 10; target: one chunk of 3 x 6)
    assert kinds[1] == ("probe", 2 * (80 + 18))
    # projection: 2 checkpoints x 11 examples (a projection this small is generated once
    # and cached; a large dense one adds its blocks per chunk)
    assert kinds[2:] == [("probe", 22)]
    assert wall == pytest.approx(80 * TRAIN_RATE + (196 + 22) * PROBE_RATE, abs=1e-12)
    # features written: checkpoints x examples x proj_dim x 4 bytes
    assert cost.disk["target features"] == 2 * 3 * 64 * 4


def test_a_probe_is_measured_once_and_its_fixed_cost_counted_once() -> None:
    calls = []

    def measure() -> ProbeResult:
        calls.append(1)
        return ProbeResult(0.5, fixed_seconds=2.0, detail="test")

    probe = Probe("test-probe", measure, "chunk")
    cost = Cost(passes=[Pass("a", 3, kind="probe", probe=probe),
                        Pass("b", 4, kind="probe", probe=probe)])
    passes, fixed, wall = project(cost, Calibrator(context([4], [4])), {"read": 0.25})
    assert len(calls) == 1
    assert [p.seconds for p in passes] == [1.5, 2.0]
    assert fixed == 2.0 and wall == pytest.approx(0.25 + 3.5 + 2.0)


def test_estimate_refuses_what_it_cannot_project(lm_data) -> None:
    import finesift

    with pytest.raises(OptionError, match="auto"):
        finesift.estimate(lm_data.pool, lm_data.target, budget=5, method="auto")
    with pytest.raises(OptionError, match="shard"):
        finesift.estimate(lm_data.pool, lm_data.target, budget=5, method="random",
                          num_shards=2, shard_index=0)


# -- every method, on the tiny model -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ctx(lm_data, tiny_lm_dir: Path) -> MethodContext:
    """The run's context for the tiny LM and the planted data, as --estimate builds it."""
    from finesift import estimator, pipeline

    plan = pipeline.check_options(
        lm_data.pool, lm_data.target, budget=10, method="perplexity", method_options=None,
        task="lm", model=str(tiny_lm_dir), strategy="top", seed=0, out=None, fmt=None,
        max_length=64, template="auto", precision="fp32", batch_size=4, device="cpu",
        progress=False, log=None, workdir=None, num_shards=1, shard_index=None,
        executor="local", ray_address=None, ray_options=None)
    inputs = pipeline.load_inputs(plan)
    loaded = pipeline.load_model(plan, inputs)
    enc = pipeline.encode_inputs(plan, inputs, loaded)
    return estimator._context(plan, enc.pool.records, enc.pool.examples, enc, loaded)


SMALL = {  # keep the declared work small where a method's defaults are large
    "harp": {"embedder": "tokens"}, "harp-c": {"embedder": "tokens"},
    "harp-e": {"embedder": "tokens"},
}


def _has_minilm() -> bool:
    try:
        from finesift.methods.embed import minilm_dir

        minilm_dir()
        return True
    except Exception:  # noqa: BLE001 - the package is optional
        return False


def test_every_method_declares_its_cost(tiny_ctx: MethodContext) -> None:
    builtin = [n for n, c in available().items() if c.__module__.startswith("finesift.methods")]
    assert {"tov", "less", "tracin", "harp", "embed", "dsir", "random"} <= set(builtin)
    for name in builtin:
        if name == "embed" and not _has_minilm():
            continue
        cost = get_method(name, SMALL.get(name)).cost(tiny_ctx)
        assert isinstance(cost, Cost), name
        passes, _, wall = project(cost, Calibrator(tiny_ctx, given=GIVEN))
        if name == "random":
            assert wall == 0
            continue
        assert passes and all(p.units > 0 for p in passes), name
        assert wall > 0, name
        if get_method(name, SMALL.get(name)).trains:
            assert any(p.kind == "train" for p in cost.passes), name
    # less on an IProX proxy: the build's passes come first, and its cache is written
    cost = get_method("less", {"proxy": "iprox:0.5"}).cost(tiny_ctx)
    assert [p.what.split(":")[0] for p in cost.passes[:3]] == ["iprox"] * 3
    assert cost.disk["IProX proxy (cache)"] > 0
    # align_eval adds its figures' passes: twice the probe set's tokens per evaluation
    # (model and proxy), one evaluation before and one after the alignment
    evals = {}
    for extra in ("", ",align_eval=1", ",align_eval=1,align_epochs=0"):
        c = get_method("less", {"proxy": "iprox:0.5" + extra}).cost(tiny_ctx)
        evals[extra] = [p for p in c.passes if "align_eval" in p.what]
    assert evals[""] == []
    (after,), (before_only,) = evals[",align_eval=1"], evals[",align_eval=1,align_epochs=0"]
    assert after.units == 2 * before_only.units > 0


def test_the_iprox_alignment_is_counted_and_timed_as_it_runs(tiny_ctx: MethodContext,
                                                             monkeypatch) -> None:
    """The estimate's alignment pass counts the padded tokens of the very batches the
    build's alignment trains on (all epochs, each capped at align_tokens), and times one
    real alignment step (a double backward) on the heaviest of them, so that its peak
    memory is measured; the factored copy is then not counted again as held memory."""
    import torch

    from finesift.methods._proxy import check_proxy
    from finesift.models import proxy as ipx

    spec = "iprox:0.5,probe_examples=16,align_epochs=2,align_batch_size=4,align_tokens=50"
    cost = get_method("less", {"proxy": spec}).cost(tiny_ctx)
    (align,) = [p for p in cost.passes if "gradient alignment" in p.what]
    assert align.kind == "probe"
    assert "IProX proxy (a factored copy of the model)" not in cost.memory
    no_align = get_method("less", {"proxy": "iprox:0.5,align_epochs=0"}).cost(tiny_ctx)
    assert no_align.memory["IProX proxy (a factored copy of the model)"] > 0
    assert not [p for p in no_align.passes if "gradient alignment" in p.what]

    seen: list[tuple[int, int]] = []  # (rows, longest) of each alignment step
    real = ipx.align_step

    def spy(target, proxy, pairs, task, batch_examples, **kw):
        seen.append((len(batch_examples), max(len(e.input_ids) for e in batch_examples)))
        return real(target, proxy, pairs, task, batch_examples, **kw)

    monkeypatch.setattr(ipx, "align_step", spy)
    ipx.build_proxy(tiny_ctx.model, tiny_ctx.task, tiny_ctx.pool, check_proxy(spec),
                    model_task=tiny_ctx.model_task, seed=tiny_ctx.seed,
                    batch_size=tiny_ctx.batch_size)
    assert len(seen) > 2 * 16 // 4  # the cap split some batches of 4
    assert all(rows * longest <= 50 or rows == 1 for rows, longest in seen)
    assert align.units == sum(rows * longest for rows, longest in seen)
    assert f"{len(seen)} step(s)" in align.what

    seen.clear()
    before = {k: v.clone() for k, v in tiny_ctx.model.state_dict().items()}
    rate = Calibrator(tiny_ctx, batches=1)(align)
    assert rate.measured and rate.seconds_per_unit > 0
    assert len(seen) == 2  # one untimed step, one timed
    after = tiny_ctx.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad or p.grad is None for p in tiny_ctx.model.parameters())


def test_the_probes_measure_on_the_tiny_model(tiny_ctx: MethodContext) -> None:
    """Measured, not given: the forward and training calibrations, less's gradient and
    projection probes and dsir's hashing probe give positive seconds per unit, and the
    model comes back unchanged (no adapter left on it)."""
    import torch

    before = {k: v.clone() for k, v in tiny_ctx.model.state_dict().items()}
    calibrate = Calibrator(tiny_ctx, batches=1)
    for name, opts in (("tov", {"mode": "basic"}),
                       ("less", {"projection": "sparse", "proj_dim": 64, "warmup_epochs": 1}),
                       ("dsir", {})):
        for p in get_method(name, opts).cost(tiny_ctx).passes:
            rate = calibrate(p)
            assert rate.measured and rate.seconds_per_unit > 0, (name, p.what)
    after = tiny_ctx.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- the command ---------------------------------------------------------------------------


def test_cli_estimate_prints_the_projection_and_writes_nothing(
        lm_data, tiny_lm_dir: Path, tmp_path: Path, capsys) -> None:
    from finesift.cli import main

    out = tmp_path / "out"
    rc = main(["select", "--pool", *map(str, lm_data.pool), "--target", str(lm_data.target),
               "--out", str(out), "--model", str(tiny_lm_dir), "--budget", "10",
               "--max-length", "64", "--precision", "fp32", "-o", "mode=basic",
               "--no-progress", "--estimate"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    text = captured.out
    assert text.startswith("estimate: tov (mode=basic) on 80 pool examples")
    for part in ("wall ~", "peak memory ~", "disk ~", "tov: fine-tune on the target",
                 "tov: 2 forward passes over the pool", "forward+backward+step, target",
                 "s/token", "calibration on this machine", "scores.parquet"):  # s, ms or us
        assert part in text, part
    assert not out.exists()
    # without --out: the same projection, nothing to write
    rc = main(["select", "--pool", *map(str, lm_data.pool), "--target", str(lm_data.target),
               "--model", str(tiny_lm_dir), "--budget", "10", "--max-length", "64",
               "--precision", "fp32", "--method", "random", "--estimate"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "estimate: random on 80 pool examples" in captured.out
    assert "nothing is written" in captured.out


def test_estimate_api_returns_figures(lm_data, tiny_lm_dir: Path) -> None:
    import finesift

    est = finesift.estimate(lm_data.pool, lm_data.target, budget=10, method="perplexity",
                            model=str(tiny_lm_dir), max_length=64, precision="fp32",
                            rates=GIVEN)
    assert est.n_pool == 80 and est.pool_tokens > 0 and est.model_parameters > 0
    assert est.wall_seconds == pytest.approx(
        sum(est.stages.values()) + sum(p.units * FORWARD_RATE for p in est.passes))
    assert est.peak_memory_bytes > 0 and est.disk_bytes == 0
    assert SimpleNamespace(**est.to_dict()).method == "perplexity"


# -- benchmarks/estimate_check.py ------------------------------------------------------------

SUITE = """name: tiny-estimate
task: lm
model: smollm2-135m
max_length: 64
pool:
  - {name: text, path: pool_text.jsonl, limit: 30}
  - {name: chat, path: pool_chat.jsonl}
target: {val: target.jsonl, test: test.jsonl}
methods: [random, {tov: {mode: basic}, label: tov-basic}, auto,
          {tov: {mode: basic}, prefilter: "dsir:50%", label: tov-cascade}]
budgets: [8, 25%]
seeds: [0, 1]
finetune: {epochs: 1, lr: 2.0e-4, lora_rank: 4, batch_size: 4}
results: results
"""


def test_estimate_check_script(lm_data, tiny_lm_dir: Path, tmp_path: Path, write_jsonl,
                               capsys) -> None:
    import importlib.util
    import json
    import shutil
    import sys

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("estimate_check",
                                                  root / "benchmarks" / "estimate_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)

    suite = tmp_path / "suite"
    for f in [*lm_data.pool, lm_data.target]:
        suite.mkdir(exist_ok=True)
        shutil.copy(f, suite / f.name)
    write_jsonl(suite / "test.jsonl", [{"id": f"test-{i}", "prompt": f"count {i} cats",
                                        "completion": f"{'dog ' * (i % 4 + 1)}{i}"}
                                       for i in range(6)])
    (suite / "suite.yaml").write_text(SUITE)
    from finesift.evaluate.bench import load_config

    keys = {s.label: s.key for s in load_config(suite / "suite.yaml").methods}
    write_jsonl(suite / "results" / "results.jsonl", [
        {"key": f"{keys['tov-basic']}|{b}|{seed}", "method": "tov-basic", "seed": seed,
         "status": "ok", "select_seconds": 10.0 + seed + (b == "8"), "select_peak_rss_mb": 400.0}
        for seed in (0, 1) for b in ("8", "25%")])
    out = tmp_path / "check.jsonl"
    rc = mod.main([str(suite / "suite.yaml"), "--model", str(tiny_lm_dir), "--methods",
                   "random,tov-basic,auto,tov-cascade", "--calibration-batches", "1",
                   "--write", str(out),
                   "--work", str(tmp_path / "work")])
    text = capsys.readouterr().out
    assert rc == 0
    assert "auto" in text and "skipped" in text
    rows = {r["label"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"random", "tov-basic", "tov-cascade"}
    # a cascade row is estimated as the bench runs it: the prefilter over the whole pool,
    # then the method over the kept half
    cascade = [p["what"] for p in rows["tov-cascade"]["passes"]]
    assert cascade[0].startswith("prefilter dsir:50%: ")
    assert not any(p["what"].startswith("prefilter") for p in rows["tov-basic"]["passes"])
    tov = rows["tov-basic"]
    # per seed the largest over the budgets (11, 12); their median
    assert tov["measured_select_seconds"] == {"0": 11.0, "1": 12.0}
    assert tov["measured_median_seconds"] == 11.5
    # the written estimate is rounded to the millisecond, the ratio is not
    assert tov["ratio_wall"] == pytest.approx(tov["estimate_wall_seconds"] / 11.5,
                                              abs=0.0005 / 11.5 + 1e-12)
    assert tov["n_pool"] == 70 and tov["passes"]
    assert rows["random"]["measured_median_seconds"] is None  # no rows for it
