"""benchmarks/throughput.py and memory_scale.py stay runnable (tiny model, seconds).

No timing is asserted: the scripts print figures; these tests check that they run, that
their FLOP count equals torch's own count of the forward pass, and the JSON they write.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def throughput():
    return _load("throughput")


def test_forward_flops_equal_torch_flop_counter(throughput):
    """2*P*T + attention + the LM head at label positions = what torch counts for the
    scoring pass (eager attention: full L x L score matrices, so causal=False)."""
    from torch.utils.flop_counter import FlopCounterMode

    from finesift.engine.scoring import token_logprobs
    from finesift.engine.tasks import task_for

    model, tok, _ = throughput.load(quick=True)
    model.set_attn_implementation("eager")
    dims = throughput.model_dims(model)
    exs = throughput.make_examples(tok, 6, 24)
    task = task_for("lm", tok)
    with FlopCounterMode(display=False) as fc:
        token_logprobs(model, task, exs, batch_size=3, precision="fp32")
    counted = fc.get_total_flops()
    lengths = [len(e) for e in exs]
    labels = [int(e.n_label_tokens) for e in exs]
    assert counted == throughput.forward_flops(dims, lengths, labels, causal=False)
    # the causal count is the smaller one; the head counts label positions only
    assert throughput.forward_flops(dims, lengths, labels) < counted
    no_head = throughput.forward_flops(dims, lengths, [0] * len(exs), causal=False)
    assert counted - no_head == 2 * dims["d_model"] * dims["vocab"] * sum(labels)


def test_make_examples_exact_length_and_labels(throughput):
    _, tok, _ = throughput.load(quick=True)
    exs = throughput.make_examples(tok, 5, 20)
    for e in exs:
        assert len(e.input_ids) == 20 and e.n_label_tokens == 10
        assert (e.labels[:10] == -100).all()
        np.testing.assert_array_equal(e.labels[10:], e.input_ids[10:])


def test_throughput_quick_runs_and_writes_json(throughput, tmp_path, capsys):
    out = tmp_path / "t.json"
    n = torch.get_num_threads()
    try:
        assert throughput.main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    text = capsys.readouterr().out
    assert "FLOPs = 2*P*T" in text and "| bf16 | 16 |" in text and "| fp32 | 32 |" in text
    res = json.loads(out.read_text())
    assert "| bf16-weights | 16 |" in text and "scores against fp32" in text
    assert set(res["peaks"]) == {"bf16", "fp32"}
    for peak in res["peaks"].values():  # torch.mm and F.linear at each size; the best counts
        assert set(peak["by_size"]) == {"128", "256", "linear 128", "linear 256"}
        assert peak["flops"] == max(peak["by_size"].values())
    assert [r["precision"] for r in res["rows"]] == ["bf16", "bf16-weights"] * 2 + ["fp32"] * 2
    for r in res["rows"]:
        peak = res["peaks"][r["precision"].removesuffix("-weights")]["flops"]
        assert r["achieved_flops"] > 0 and r["peak_flops"] == peak
        assert r["ratio_to_peak"] == pytest.approx(r["achieved_flops"] / r["peak_flops"])
        assert r["tokens_per_s"] == pytest.approx(r["examples_per_s"] * r["tokens_per_example"])


    # both bf16 paths scored the same examples as fp32: close, not identical
    assert [(a["precision"], a["tokens_per_example"]) for a in res["agreement"]] == [
        ("bf16", 16), ("bf16-weights", 16), ("bf16", 32), ("bf16-weights", 32)]
    for a in res["agreement"]:
        assert 0 < a["mean_abs_diff"] <= a["max_abs_diff"] < 0.05
        assert a["spearman"] > 0.9


def test_bf16_weights_model_is_bf16_and_agreement_arithmetic(throughput):
    model, _, _ = throughput.load(quick=True, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ref = np.array([-1.0, -2.0, -3.0, -4.0])
    a = throughput.agreement(ref, np.array([-1.5, -2.0, -2.9, -4.0]))
    assert a["mean_abs_diff"] == pytest.approx(0.15) and a["max_abs_diff"] == pytest.approx(0.5)
    assert a["spearman"] == pytest.approx(1.0) and a["examples"] == 4
    # a swapped pair lowers the rank correlation
    assert throughput.agreement(ref, np.array([-2.0, -1.0, -3.0, -4.0]))["spearman"] == (
        pytest.approx(0.8))


def test_memory_scale_tiny_runs(tmp_path, monkeypatch):
    mem = _load("memory_scale")
    monkeypatch.setenv("FINESIFT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "m.json"
    assert mem.main(["--model", "tiny", "--sizes", "30", "60", "--threads", "1",
                     "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["pool_examples"] for r in rows] == [30, 60]
    for r in rows:
        assert r["scoring_calls"] >= 1 and r["scored_tokens"] > 10 * r["pool_examples"]
        # the process's peak is read from the OS's mark, the scoring peak from samples of
        # VmRSS: the two are rounded separately and may differ by a fraction of a MiB
        assert r["peak_rss_mib"] >= r["scoring_peak_mib"] - 1.0
        assert r["scoring_peak_mib"] >= r["rss_before_scoring_mib"] > 0


def test_throughput_processes_sum_concurrent_workers(tmp_path):
    """--processes: N spawned scoring processes (as Ray workers or shard runs) measured
    together; their summed throughput is compared with the peak of all their threads."""
    import subprocess

    out = tmp_path / "p.json"
    script = ROOT / "benchmarks" / "throughput.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--processes", "2",
                           "--lengths", "16", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["processes"] == 2 and res["threads_per_process"] == 1
    assert [(r["precision"], r["tokens_per_example"]) for r in res["rows"]] == [
        ("bf16", 16), ("fp32", 16)]
    for r in res["rows"]:
        assert r["examples"] == 2 * (512 // 16)
        assert r["examples_per_s"] == pytest.approx(r["examples"] / r["seconds"], rel=0.01)
        assert r["ratio_to_peak"] == pytest.approx(r["achieved_flops"] / r["peak_flops"])


# -- influence_cost.py -----------------------------------------------------------------


@pytest.fixture(scope="module")
def influence():
    return _load("influence_cost")


def test_influence_plan_has_references_and_a_proxy_grid(influence):
    args = influence.build_parser().parse_args([
        "--out", "x", "--methods", "less", "iprox", "--rhos", "0.25", "0.5",
        "--align-epochs", "0", "2", "--splits", "ipsvd", "adapted", "--align-eval",
        "--reference-seeds", "1", "--reference-mode", "both", "--proxy-options", "align_lr=1e-3"])
    runs = influence.plan_runs(args)
    by = {r.label: r for r in runs}
    # less first, its reference reruns last (a run cut short keeps the proxies' rows)
    assert runs[0].label == "less" and runs[0].kind == "base"
    assert [r.label for r in runs[-2:]] == ["less-seed1", "less-seed1-samewarmup"]
    assert [r.kind for r in runs[-2:]] == ["reference", "reference"]
    assert all(r.kind == "proxy" for r in runs[1:-2])
    assert (by["less"].seed, by["less-seed1"].seed) == (0, 1)
    assert by["less-seed1"].warmup_seed is None and by["less-seed1-samewarmup"].warmup_seed == 0
    proxies = [r for r in runs if r.kind == "proxy"]
    assert len(proxies) == 8 and all(r.seed == 0 for r in proxies)
    r = by["less+iprox:0.25,align=0,split=adapted"]
    assert r.options["proxy"] == ("iprox:0.25,probe_examples=8,align_epochs=0,split=adapted,"
                                  "align_eval=1,align_lr=1e-3")
    assert by["less+iprox:0.5,align=2,split=ipsvd"].options["proxy"] == (
        "iprox:0.5,probe_examples=8,align_epochs=2,align_eval=1,align_lr=1e-3")
    # every planned option is valid (the script checks them before the first run)
    from finesift.methods import get_method
    from finesift.models.proxy import parse_proxy

    for run in runs:
        get_method(run.method, run.options)
    assert parse_proxy(r.options["proxy"]).align_eval is True
    # one value each: the labels of earlier results
    args = influence.build_parser().parse_args(["--out", "x", "--methods", "less", "iprox",
                                                "--rhos", "0.75", "--align-epochs", "2"])
    assert [r.label for r in influence.plan_runs(args)] == ["less", "less+iprox:0.75"]


def test_influence_compare_runs_against_every_reference(influence, capsys):
    rng = np.random.default_rng(0)
    base = rng.normal(size=40)
    scores = {"less": base, "less-seed1": base + 0.01 * rng.normal(size=40),
              "less+iprox:0.5": -base, "tov": rng.normal(size=40)}
    out = influence.compare_runs(scores, ["less", "less-seed1", "less-missing"])
    assert set(out["less"]) == {"less-seed1"} and set(out["less-seed1"]) == {"less"}
    assert set(out["less+iprox:0.5"]) == {"less", "less-seed1"}
    near = out["less-seed1"]["less"]
    assert near["spearman"] > 0.99 and near["top10"] == 1.0 and near["top5"] == 1.0
    far = out["less+iprox:0.5"]["less"]
    assert far["spearman"] == pytest.approx(-1.0) and far["top10"] == 0.0
    assert out["less+iprox:0.5"]["less-seed1"]["spearman"] < -0.99
    # the table prints the reference columns and the alignment figures
    align = {"align": 0.9, "kl": 11.0, "total": 2.0, "align_A": 0.8, "align_B": 1.0,
             "by_block": {"0": 0.5, "1": 0.99}, "by_kind": {"mlp.up_proj": 0.7}}
    rows = []
    for label in scores:
        row = {"method": label, "seed": 0, "wall_s": 1.0, "cpu_s": 1.0, "stages": {},
               "peak_rss_mib": 1.0, "store_bytes": 0, "proxy_parameters": None,
               "agreement": out[label]}
        if label == "less+iprox:0.5":
            row.update(align_before=align, align_after={**align, "align": 0.95},
                       align_epochs=2, align_epoch_terms=[{"align": 0.9, "kl": 11.0}])
        rows.append(row)
    influence.print_tables(rows, ["less", "less-seed1"])
    text = capsys.readouterr().out
    assert "vs less-seed1: top-10% / top-5% / Spearman" in text
    assert "| 0.00 / 0.00 / -0.998 |" in text  # the proxy row against less-seed1
    assert "0.9000 (0.800 / 1.000) | 11.000 | 0.9500" in text
    assert "before: 0 0.500, 1 0.990" in text


def test_influence_recall_and_agreement_within_groups(influence, capsys):
    base = np.arange(40.0)  # less's top 10%: examples 36-39
    run = base.copy()
    run[36:] = [31.9, 31.8, 31.7, 31.6]  # ranked 5th-8th: out of its top 10%, inside its top 25%
    first = np.arange(40) < 20
    out = influence.compare_runs({"less": base, "proxy": run}, ["less"],
                                 {"a": first, "b": ~first})
    a = out["proxy"]["less"]
    assert a["top10"] == 0.0 and a["top10_in_top25"] == 1.0 and a["top10_in_top50"] == 1.0
    assert a["top25"] == 1.0 and a["top50"] == 1.0
    assert a["spearman_a"] == pytest.approx(1.0) and a["spearman_b"] < 0.9
    assert influence.top_recall(-base, base, 0.25) == 0.0
    rows = [{"method": label, "seed": 0, "wall_s": 1.0, "cpu_s": 1.0, "stages": {},
             "peak_rss_mib": 1.0, "store_bytes": 0, "proxy_parameters": None,
             "agreement": out[label]} for label in ("less", "proxy")]
    influence.print_tables(rows, ["less"])
    text = capsys.readouterr().out
    assert "| proxy | 1.00 / 1.00 | 1.00 / 1.00 | +1.000 |" in text


def test_influence_refuses_bad_reference_seeds(influence):
    with pytest.raises(SystemExit):
        influence.main(["--out", "x", "--methods", "iprox", "--reference-seeds", "1"])
    with pytest.raises(SystemExit):
        influence.main(["--out", "x", "--reference-seeds", "0"])


# -- score_agreement.py ----------------------------------------------------------------


def test_score_agreement_against_a_reference_selection(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    agree = _load("score_agreement")
    ids = [f"p{i}" for i in range(20)]
    ref = np.arange(20, dtype=float)  # p19 ranks first

    def folder(name: str, scores, keep=None):
        d = tmp_path / name
        d.mkdir()
        rows = [(i, s) for i, s in zip(ids, scores) if keep is None or i in keep]
        pq.write_table(pa.table({"id": [r[0] for r in rows], "score": [r[1] for r in rows]}),
                       d / "scores.parquet")
        return d

    a = folder("ref", ref)
    same = folder("same", 3 * ref + 1)  # a monotone transform: the same ranking
    flipped = folder("flipped", -ref)
    # the top two swapped with the bottom two, and p0 not scored
    swapped = ref.copy()
    swapped[[18, 19, 1, 2]] = swapped[[1, 2, 18, 19]]
    part = folder("part", swapped, keep=set(ids[1:]))
    res = agree.main([str(a), str(same), str(flipped), str(part), "--shares", "0.1", "0.25",
                      "--out", str(tmp_path / "a.json")])
    assert res[str(same)] == {"n": 20, "spearman": pytest.approx(1.0),
                              "top_overlap": {"0.1": 1.0, "0.25": 1.0}}
    assert res[str(flipped)]["spearman"] == pytest.approx(-1.0)
    assert res[str(flipped)]["top_overlap"] == {"0.1": 0.0, "0.25": 0.0}
    got = res[str(part)]
    assert got["n"] == 19
    # 19 examples: top-10% is 2 (p19, p18 against p2, p1: none shared), top-25% is 5
    # (p19..p15 against p2, p1, p17, p16, p15: three shared)
    assert got["top_overlap"] == {"0.1": 0.0, "0.25": pytest.approx(3 / 5)}
    assert json.loads((tmp_path / "a.json").read_text())[str(part)]["n"] == 19
