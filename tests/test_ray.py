"""``--executor ray``: ToV trained by the coordinator, the pool scored by two Ray workers of
a local Ray instance, scores identical to the single-process run."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import finesift.methods.tov as tov_module
from finesift.cli import main

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'finesift[ray]')")

TOV = ["--method", "tov", "--precision", "fp32", "-o", "mode=interleaved", "-o", "rounds=2",
       "-o", "base_size=30", "-o", "lr=3e-3", "-o", "chunk_size=8", "--budget", "12"]


def argv(lm_data, model: Path, out: Path, *extra: str) -> list[str]:
    return ["select", "--pool", *map(str, lm_data.pool), "--target", str(lm_data.target),
            "--model", str(model), "--out", str(out), "--no-progress", *TOV, *extra]


def test_tov_on_two_ray_workers_equals_the_local_run(lm_data, tiny_lm_dir: Path,
                                                      tmp_path: Path, monkeypatch, capsys):
    local = tmp_path / "local"
    assert main(argv(lm_data, tiny_lm_dir, local)) == 0

    # the coordinator must not score: only the workers (other processes) may
    def not_here(*args, **kwargs):
        raise AssertionError("the coordinator scored a chunk itself")

    monkeypatch.setattr(tov_module, "score_examples", not_here)
    dist = tmp_path / "ray"
    capsys.readouterr()
    rc = main(argv(lm_data, tiny_lm_dir, dist, "--executor", "ray", "--ray-num-cpus", "2",
                   "--ray-workers", "2"))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert not ray.is_initialized()  # the local instance it started is shut down

    assert pq.read_table(dist / "scores.parquet").equals(pq.read_table(local / "scores.parquet"))
    assert (dist / "selected.jsonl").read_bytes() == (local / "selected.jsonl").read_bytes()
    info = json.loads((dist / "manifest.json").read_text())["method_info"]
    assert info["executor"]["name"] == "ray" and info["executor"]["workers"] == 2
    # results landed in the same chunk store as a local run's: 79 examples / 8 = 10 chunks
    assert len(list((dist / ".work").glob("tov-*-chunk*.npy"))) == 10


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance the next tests share (the executor then neither starts nor
    stops one)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_errors_are_clear(ray_instance, tiny_lm_dir: Path):
    from finesift.engine.tasks import CausalLMTask
    from finesift.errors import FinesiftError, OptionError
    from finesift.executors import RayExecutor
    from finesift.methods.tov import ToVChunkScorer

    scorer = ToVChunkScorer({"name": str(tiny_lm_dir / "gone"), "task": "lm"}, None, 0,
                            CausalLMTask(0), [])
    with pytest.raises(FinesiftError, match="Ray worker could not start: .*gone"):
        list(RayExecutor(workers=1).map_chunks(scorer, [(0, [])]))
    with pytest.raises(OptionError, match="need 3 CPUs; the cluster has 2"):
        list(RayExecutor(workers=3).map_chunks(scorer, [(0, [])]))
    assert list(RayExecutor(workers=1).map_chunks(scorer, [])) == []
    assert ray.is_initialized()  # not ours to stop


def test_ray_shard_run_merges_with_a_local_shard(ray_instance, lm_data, tiny_lm_dir: Path,
                                                 tmp_path: Path):
    """A shard scored on Ray and one scored locally merge into the unsharded run."""
    full = tmp_path / "full"
    assert main(argv(lm_data, tiny_lm_dir, full)) == 0
    s0, s1 = tmp_path / "s0", tmp_path / "s1"
    assert main(argv(lm_data, tiny_lm_dir, s0, "--num-shards", "2", "--shard-index", "0",
                     "--executor", "ray", "--ray-workers", "2")) == 0
    assert main(argv(lm_data, tiny_lm_dir, s1, "--num-shards", "2", "--shard-index", "1")) == 0
    merged = tmp_path / "merged"
    assert main(["merge", str(s0), str(s1), "--out", str(merged), "--budget", "12"]) == 0
    assert pq.read_table(merged / "scores.parquet").equals(pq.read_table(full / "scores.parquet"))
