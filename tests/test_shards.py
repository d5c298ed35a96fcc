"""Shard runs, ``finesift merge`` and kill -9 resume.

* shards cover the pool exactly once, and merged scores equal an unsharded run's bit for
  bit (tov, whose interleaved base set is drawn from the whole pool; perplexity; random;
  less and tracin, whose warm-up subset is drawn from the whole pool);
* merge names the folder that is missing, doubled, from another run or not a shard;
* methods whose scores need the whole pool refuse to shard;
* a real ``finesift select --method tov`` process killed with SIGKILL (during training,
  then during scoring) resumes and ends with the uninterrupted run's scores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import EXTRA_LM_WORDS, NOISE_WORDS, PATTERN

from finesift.api import select
from finesift.cli import main
from finesift.errors import OptionError
from finesift.store import chunks
from finesift.store.chunks import (
    ChunkStore,
    ShardSpec,
    chunk_grid,
    pack_ragged,
    shard_chunk_ids,
    shard_rows,
    unpack_ragged,
)

TOV = ["--method", "tov", "--precision", "fp32", "-o", "mode=interleaved", "-o", "rounds=2",
       "-o", "base_size=30", "-o", "lr=3e-3", "-o", "chunk_size=8"]


def argv(lm_data, model: Path, out: Path, *extra: str) -> list[str]:
    return ["select", "--pool", *map(str, lm_data.pool), "--target", str(lm_data.target),
            "--model", str(model), "--out", str(out), "--no-progress", *extra]


def table(folder: Path):
    return pq.read_table(folder / "scores.parquet")


# -- the chunk grid ----------------------------------------------------------------------


def test_grid_shards_cover_the_pool_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, size=103)
    grid = chunk_grid(lengths, 10)
    assert [len(c) for c in grid] == [10] * 10 + [3]
    flat = np.concatenate(grid)
    assert sorted(flat.tolist()) == list(range(103))
    assert (np.diff(lengths[flat]) <= 0).all()  # longest first
    assert shard_chunk_ids(11, ShardSpec(3, 1)) == [1, 4, 7, 10]
    parts = [shard_rows(lengths, 10, ShardSpec(3, i)) for i in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    assert [len(p) for p in parts] == [40, 33, 30]
    assert np.array_equal(shard_rows(lengths, 10, None), np.arange(103))
    for bad in [(0, 0), (2, 2), (2, -1)]:
        with pytest.raises(OptionError):
            ShardSpec(*bad)


def test_chunk_store_ignores_damaged_and_partial_files(tmp_path: Path):
    store = ChunkStore(tmp_path / "tov-abc")
    vals = np.arange(6, dtype=np.float64).reshape(2, 3)
    store.save(0, vals)
    assert np.array_equal(store.load(0, (2, 3)), vals)
    assert store.load(0, (2, 4)) is None  # wrong shape: recomputed
    # what a kill mid-write leaves: a temporary file (ignored) and no final file
    (tmp_path / ".tov-abc-chunk000001.npy.999.tmp.npy").write_bytes(b"\x93NUMPY partial")
    assert store.load(1, (2, 3)) is None
    store.path(2).write_bytes(b"garbage")  # a damaged final file counts as missing
    assert store.load(2, (2, 3)) is None
    assert sorted(p.name for p in tmp_path.glob("tov-*-chunk*.npy")) == [
        "tov-abc-chunk000000.npy", "tov-abc-chunk000002.npy"]
    ragged = [np.array([-0.5, -1.25], dtype=np.float32), np.zeros(0, np.float32),
              np.array([-3.0], dtype=np.float32)]
    packed = pack_ragged(ragged)
    assert [a.tolist() for a in unpack_ragged(packed, 3)] == [a.tolist() for a in ragged]
    assert unpack_ragged(packed, 2) is None and unpack_ragged(packed[:-1], 3) is None


# -- shard runs and merge ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tov_runs(lm_data, tiny_lm_dir: Path, tmp_path_factory):
    """An unsharded ToV run and three shard runs of the same settings (CLI, in-process)."""
    root = tmp_path_factory.mktemp("tov_shards")
    full = root / "full"
    assert main(argv(lm_data, tiny_lm_dir, full, *TOV, "--budget", "16",
                     "--strategy", "score+random")) == 0
    shards = []
    for i in range(3):
        d = root / f"shard{i}"
        assert main(argv(lm_data, tiny_lm_dir, d, *TOV, "--num-shards", "3",
                         "--shard-index", str(i))) == 0
        shards.append(d)
    return full, shards, root


def test_tov_shards_merge_to_the_unsharded_run(tov_runs, lm_data, capsys):
    full, shards, root = tov_runs
    n = len(lm_data.usable)
    parts = [table(d).to_pydict() for d in shards]
    # each shard scored only its rows; together every pool example exactly once
    sizes = [len(p["pool_index"]) for p in parts]
    assert all(0 < s < n for s in sizes) and sum(sizes) == n
    assert sorted(i for p in parts for i in p["pool_index"]) == list(range(n))
    for d in shards:
        assert not (d / "selected.jsonl").exists()
        man = json.loads((d / "manifest.json").read_text())
        assert man["shard"]["num_shards"] == 3 and man["method"] == "tov"
    # the base set is drawn from the whole pool in every shard run, as in the full run
    full_t = table(full).to_pydict()
    in_base = {pid: b for p in parts for pid, b in zip(p["id"], p["in_base_set"], strict=True)}
    assert [in_base[i] for i in full_t["id"]] == full_t["in_base_set"]
    assert sum(full_t["in_base_set"]) == 30

    merged = root / "merged"
    capsys.readouterr()
    # shards in any order
    rc = main(["merge", str(shards[2]), str(shards[0]), str(shards[1]), "--out", str(merged),
               "--budget", "16", "--strategy", "score+random"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"selected 16 of {n} pool examples" in out.out
    # bit for bit: every column, in the same order, and the same selection
    assert table(merged).equals(table(full))
    assert (merged / "selected.jsonl").read_bytes() == (full / "selected.jsonl").read_bytes()
    rows = [json.loads(x) for x in (merged / "selected.jsonl").read_text().splitlines()]
    assert rows == [lm_data.raw[r["id"]] for r in rows]  # records exactly as read
    man = json.loads((merged / "manifest.json").read_text())
    full_man = json.loads((full / "manifest.json").read_text())
    for key in ("method", "method_options", "seed", "strategy", "budget", "selected", "data"):
        assert man[key] == full_man[key], key
    assert [s["index"] for s in man["merged_from"]["shards"]] == [0, 1, 2]


def test_merge_errors_name_the_folder(tov_runs, lm_data, tiny_lm_dir: Path, tmp_path: Path,
                                      capsys):
    full, shards, _ = tov_runs

    def merge(*folders: Path) -> str:
        capsys.readouterr()
        rc = main(["merge", *map(str, folders), "--out", str(tmp_path / "m"), "--budget", "5"])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err
        assert err.startswith("finesift: error:")
        return err

    err = merge(shards[0], shards[2])
    assert "shard(s) 1 of 3 missing" in err
    err = merge(shards[0], shards[1], shards[2], shards[1])
    assert str(shards[1]) in err and "given twice" in err
    err = merge(shards[0], full, shards[2])
    assert str(full) in err and "not a shard run" in err
    err = merge(shards[0], tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in err
    # scores that are not the ones the manifest was written for
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / "manifest.json").write_bytes((shards[1] / "manifest.json").read_bytes())
    (swapped / "scores.parquet").write_bytes((shards[2] / "scores.parquet").read_bytes())
    err = merge(shards[0], swapped, shards[2])
    assert str(swapped) in err and "not the file its manifest.json was written for" in err
    # a shard of another run (another seed)
    other = tmp_path / "other1"
    assert main(argv(lm_data, tiny_lm_dir, other, *TOV, "--num-shards", "3",
                     "--shard-index", "1", "--seed", "1")) == 0
    err = merge(shards[0], other, shards[2])
    assert str(other) in err and "another run" in err and "seed" in err
    # a shard of another split of the same run
    two = tmp_path / "two"
    assert main(argv(lm_data, tiny_lm_dir, two, *TOV, "--num-shards", "2",
                     "--shard-index", "0")) == 0
    err = merge(shards[0], two, shards[2])
    assert str(two) in err and "of 2" in err
    assert not (tmp_path / "m").exists()


def test_merge_checks_the_pool_files(tov_runs, lm_data, tmp_path: Path, capsys):
    """merge rereads the pool files the shards read and refuses a changed one."""
    _, shards, _ = tov_runs
    copies = []
    for d in shards:
        c = tmp_path / d.name
        c.mkdir()
        for name in ("scores.parquet", "manifest.json"):
            (c / name).write_bytes((d / name).read_bytes())
        man = json.loads((c / "manifest.json").read_text())
        man["data"]["pool"][0]["sha256"] = "0" * 64  # as if the file had changed since
        (c / "manifest.json").write_text(json.dumps(man))
        copies.append(c)
    capsys.readouterr()
    rc = main(["merge", *map(str, copies), "--out", str(tmp_path / "m"), "--budget", "5"])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(lm_data.pool[0]) in err and "changed since the shard runs" in err


@pytest.mark.parametrize("method,options", [
    ("perplexity", {"order": "highest"}),
    ("random", {}),
    ("embed", {"embedder": "model", "aggregate": "centroid"}),
    ("less", {"lr": 3e-3, "proj_dim": 64, "warmup_fraction": 0.1, "warmup_epochs": 2,
              "chunk_size": 8}),
    ("tracin", {"lr": 3e-3, "proj_dim": 64, "warmup_fraction": 0.1, "warmup_epochs": 1,
                "chunk_size": 8, "projection": "sparse"}),
])
def test_baseline_shards_equal_unsharded(method, options, lm_data, tiny_lm_dir: Path,
                                         tmp_path: Path, monkeypatch):
    monkeypatch.setattr(chunks, "DEFAULT_CHUNK", 8)  # 79 examples -> 10 chunks
    common = {"method": method, "method_options": options, "model": str(tiny_lm_dir),
              "precision": "fp32", "batch_size": 4}
    select(lm_data.pool, lm_data.target, budget=12, out=tmp_path / "full", **common)
    shards = []
    for i in range(4):
        sel = select(lm_data.pool, lm_data.target, budget=None, out=tmp_path / f"s{i}",
                     num_shards=4, shard_index=i, **common)
        assert 0 < len(sel.scores) < len(lm_data.usable)
        shards.append(tmp_path / f"s{i}")
    from finesift.shards import merge

    merge(shards, tmp_path / "merged", budget=12)
    assert table(tmp_path / "merged").equals(table(tmp_path / "full"))
    assert ((tmp_path / "merged" / "selected.jsonl").read_bytes()
            == (tmp_path / "full" / "selected.jsonl").read_bytes())


def test_chunk_scorer_rebuilds_the_model_exactly(lm_data, tiny_lm_dir: Path, tmp_path: Path):
    """The worker path (model loaded again from its folder, adapter added, checkpoints
    loaded: what a Ray actor does) gives the in-process scores bit for bit."""
    from finesift.executors import LocalExecutor

    common = {"method": "tov", "model": str(tiny_lm_dir), "precision": "fp32",
              "method_options": {"mode": "parallel", "rounds": 2, "base_size": 30,
                                 "lr": 3e-3, "chunk_size": 16}}
    here = select(lm_data.pool, lm_data.target, budget=8, out=tmp_path / "here", **common)
    built = select(lm_data.pool, lm_data.target, budget=8, out=tmp_path / "built",
                   executor=LocalExecutor(), **common)
    assert built.manifest["method_info"]["executor"] == {"name": "local"}
    assert np.array_equal(built.scores, here.scores)
    assert np.array_equal(built.columns["score_round_2"], here.columns["score_round_2"])
    with pytest.raises(OptionError, match="in-process only"):
        select(lm_data.pool, lm_data.target, budget=8, method="random",
               executor=LocalExecutor(), model=str(tiny_lm_dir))


@pytest.mark.parametrize("method,options,message", [
    ("dsir", {}, "fitted on the whole pool"),
    ("perplexity", {"order": "middle"}, "median loss of the whole pool"),
])
def test_methods_that_need_the_whole_pool_refuse(method, options, message, lm_data,
                                                 tiny_lm_dir: Path, tmp_path: Path):
    with pytest.raises(OptionError, match=message):
        select(lm_data.pool, lm_data.target, budget=None, method=method,
               method_options=options, model=str(tiny_lm_dir), out=tmp_path / "o",
               num_shards=2, shard_index=0)


def test_shard_option_errors(lm_data, tiny_lm_dir: Path, tmp_path: Path, capsys):
    cases = [
        (["--num-shards", "2", "--budget", "5"], "--num-shards needs --shard-index"),
        (["--num-shards", "3", "--shard-index", "3"], "--shard-index must be in 0..2"),
        ([], "--budget is required"),
        (["--executor", "ray", "--method", "random", "--budget", "5"], "in-process only"),
        (["--device", "gpu7", "--budget", "5"], "not a torch device"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        rc = main(argv(lm_data, tiny_lm_dir, tmp_path / "o", *extra))
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (extra, err)


def test_another_model_in_the_same_folder_does_not_resume(lm_data, tiny_lm_dir: Path,
                                                          tmp_path: Path):
    """The resume fingerprint covers the model: same data and options, another model (same
    tokenizer, other weights) in the same --out folder scores afresh."""
    import shutil

    from finesift.testing import tiny_causal_lm, tiny_tokenizer

    other = tmp_path / "other_model"
    shutil.copytree(tiny_lm_dir, other)
    tiny_causal_lm(len(tiny_tokenizer(EXTRA_LM_WORDS)), seed=1).save_pretrained(
        other, safe_serialization=True)
    common = {"method": "tov", "precision": "fp32",
              "method_options": {"mode": "basic", "lr": 3e-3, "chunk_size": 16}}
    a = select(lm_data.pool, lm_data.target, budget=8, out=tmp_path / "o",
               model=str(tiny_lm_dir), **common)
    b = select(lm_data.pool, lm_data.target, budget=8, out=tmp_path / "o", model=str(other),
               **common)
    fresh = select(lm_data.pool, lm_data.target, budget=8, out=tmp_path / "fresh",
                   model=str(other), **common)
    assert not np.array_equal(a.scores, b.scores)
    assert np.array_equal(b.scores, fresh.scores)
    assert len(list((tmp_path / "o" / ".work").glob("tov-*.pt"))) == 2


# -- kill -9 -----------------------------------------------------------------------------

KILL_POOL = 400


@pytest.fixture(scope="module")
def kill_data(tmp_path_factory):
    """A pool big enough that scoring takes a few seconds with chunks of 8."""
    root = tmp_path_factory.mktemp("kill_data")
    rng = np.random.default_rng(1)
    words = PATTERN + NOISE_WORDS
    with open(root / "pool.jsonl", "w") as fh:
        for i in range(KILL_POOL):
            text = " ".join(str(w) for w in rng.choice(words, int(rng.integers(4, 20))))
            fh.write(json.dumps({"id": f"p{i}", "text": text}) + "\n")
    with open(root / "target.jsonl", "w") as fh:
        for i in range(8):
            done = " ".join(PATTERN[i % 3:] + PATTERN[: i % 3])
            fh.write(json.dumps({"prompt": "please continue the sequence",
                                 "completion": done}) + "\n")
    assert "sequence" in EXTRA_LM_WORDS
    return root


def _command() -> list[str]:
    script = Path(sys.executable).with_name("finesift")
    return [str(script)] if script.exists() else [sys.executable, "-m", "finesift.cli"]


KILL_OPTS = ["--precision", "fp32", "--batch-size", "4", "-o", "mode=interleaved",
             "-o", "rounds=3", "-o", "base_size=160", "-o", "lr=3e-3", "-o", "chunk_size=8"]


def _kill_argv(data: Path, model: Path, out: Path) -> list[str]:
    return ["select", "--method", "tov", "--pool", str(data / "pool.jsonl"), "--target",
            str(data / "target.jsonl"), "--model", str(model), "--out", str(out),
            "--budget", "20", "--no-progress", *KILL_OPTS]


def _start(argv_: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(_command() + argv_, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> str:
    """SIGKILL ``proc`` as soon as ``ready()`` (polled every 5 ms); returns its stderr."""
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it could be killed: {proc.stderr.read()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the run to reach the kill point")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return proc.stderr.read()


def test_sigkill_during_training_and_scoring_resumes_exactly(kill_data: Path, tiny_lm_dir: Path,
                                                             tmp_path: Path):
    out = tmp_path / "killed"
    work = out / ".work"
    n_chunks = -(-KILL_POOL // 8)

    def rounds_saved() -> bool:
        return any(work.glob("tov-*.pt"))

    def chunk_files() -> list[Path]:
        return list(work.glob("tov-*-chunk*.npy"))

    # 1. killed while training: after round 1 is saved, in round 2
    _kill_when(_start(_kill_argv(kill_data, tiny_lm_dir, out)), rounds_saved)
    assert not chunk_files(), "the kill was meant to land in training"
    assert not (out / "scores.parquet").exists()
    # 2. resumed, then killed while scoring (a few chunks written, possibly mid-write)
    err = _kill_when(_start(_kill_argv(kill_data, tiny_lm_dir, out)),
                     lambda: len(chunk_files()) >= 3)
    assert "resuming after round 1 of 3" in err or "resuming after round 2 of 3" in err
    done = len(chunk_files())
    assert 3 <= done < n_chunks, done
    assert not (out / "scores.parquet").exists()
    # 3. resumed to the end
    proc = _start(_kill_argv(kill_data, tiny_lm_dir, out))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    # an uninterrupted run of the same command (in another folder, in this process)
    ref = tmp_path / "uninterrupted"
    assert main(_kill_argv(kill_data, tiny_lm_dir, ref)) == 0

    got, want = table(out).to_pydict(), table(ref).to_pydict()
    assert len(got["id"]) == KILL_POOL and len(set(got["id"])) == KILL_POOL  # each row once
    assert got["id"] == [f"p{i}" for i in range(KILL_POOL)]
    for col in ("score", "score_round_1", "score_round_2", "score_round_3", "in_base_set"):
        assert got[col] == want[col], col  # exactly
    assert (out / "selected.jsonl").read_bytes() == (ref / "selected.jsonl").read_bytes()
    assert len(chunk_files()) == n_chunks


def test_single_pass_methods_resume_at_the_chunk(lm_data, tiny_lm_dir: Path, tmp_path: Path,
                                                monkeypatch):
    """uncertainty (and perplexity, same pass) save each scored chunk; a killed run rescores
    only the unfinished chunks and gives the uninterrupted scores exactly."""
    import finesift.methods.uncertainty as unc

    monkeypatch.setattr(chunks, "DEFAULT_CHUNK", 16)  # 79 examples -> 5 chunks
    common = {"method": "uncertainty", "model": str(tiny_lm_dir), "precision": "fp32"}
    ref = select(lm_data.pool, lm_data.target, budget=8, **common)
    real = unc.token_logprobs
    calls = []

    def die_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if killed while scoring chunk 3
        return real(*args, **kwargs)

    monkeypatch.setattr(unc, "token_logprobs", die_on_third)
    with pytest.raises(KeyboardInterrupt):
        select(lm_data.pool, lm_data.target, budget=8, out=tmp_path / "o", **common)
    assert len(list((tmp_path / "o" / ".work").glob("logprobs-*-chunk*.npy"))) == 2
    calls.clear()
    monkeypatch.setattr(unc, "token_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = select(lm_data.pool, lm_data.target, budget=8, out=tmp_path / "o", **common)
    assert len(calls) == 3  # chunks 3, 4 and 5 only
    assert np.array_equal(resumed.scores, ref.scores)
    assert np.array_equal(resumed.columns["loss"], ref.columns["loss"])
