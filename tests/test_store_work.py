"""The one work store: files written through it get the mode of a plain ``open(path, "w")``
(0o666 less the umask), a write that fails leaves nothing behind, the npy and torch
helpers read back what they wrote, and the store's fingerprint reproduces every old
key scheme byte for byte (the expected values were computed with the code before the
store had a fingerprint function; existing work folders and results are named by them)."""

from __future__ import annotations

import contextlib
import io
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from finesift.data.records import Example
from finesift.methods.base import MethodContext, run_fingerprint
from finesift.methods.harp import HarpOptions, _RunCache
from finesift.store import (
    atomic_path,
    atomic_save_npy,
    atomic_save_torch,
    fingerprint,
    write_json,
    write_jsonl,
    write_parquet,
)
from finesift.store.chunks import ChunkStore
from finesift.store.work import SCHEMES


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """Run the block under ``mask``, then restore the process's umask."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_every_kind(folder: Path) -> list[Path]:
    """One file of each store writer in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "manifest.json", {"a": 1})
    write_jsonl(folder / "selected.jsonl", [{"id": "x"}, {"id": "y"}])
    write_parquet(folder / "scores.parquet", {"score": np.arange(3, dtype=np.float64)})
    with atomic_path(folder / "report.md") as tmp:
        tmp.write_text("# report\n")
    atomic_save_npy(folder / "marks.done.npy", np.array([True, False]))
    atomic_save_torch(folder / "state.pt", {"w": torch.ones(2)})
    ChunkStore(folder / "tov-abc").save(0, np.zeros((2, 3), dtype=np.float32))
    return sorted(p for p in folder.iterdir())


# -- file modes ----------------------------------------------------------------------------


@pytest.mark.parametrize("mask,want", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_honour_the_umask(tmp_path: Path, mask: int, want: int) -> None:
    with umask(mask):
        files = write_every_kind(tmp_path / "out")
    assert len(files) == 7  # no temporary file left over
    assert {p.name: oct(mode(p)) for p in files} == {p.name: oct(want) for p in files}


def test_rewriting_a_0600_file_gives_the_umask_mode(tmp_path: Path) -> None:
    """An output left 0o600 by an older finesift gets the right mode when written again."""
    path = tmp_path / "manifest.json"
    path.write_text("{}")
    path.chmod(0o600)
    with umask(0o002):
        write_json(path, {"b": 2})
    assert mode(path) == 0o664


def test_the_temporary_file_has_the_final_mode_while_written(tmp_path: Path) -> None:
    with umask(0o022), atomic_path(tmp_path / "x.txt") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".x.txt.")
        assert tmp.exists() and tmp.stat().st_size == 0 and mode(tmp) == 0o644
        tmp.write_text("x")


def test_temporary_names_are_unique(tmp_path: Path) -> None:
    """Several writers of one final name (processes, threads) never share a temporary."""
    final = tmp_path / "chunk.npy"
    with atomic_path(final) as a, atomic_path(final) as b:
        assert a != b
        a.write_text("a")
        b.write_text("b")
    assert final.read_text() == "a"  # the last rename wins, each of a complete file
    assert [p.name for p in tmp_path.iterdir()] == ["chunk.npy"]


def test_select_outputs_and_work_files_honour_the_umask(lm_data, tiny_lm_dir: Path,
                                                        tmp_path: Path) -> None:
    """``finesift.select`` end to end: the outputs and LESS's work folder (warm-up
    checkpoints, pool chunks, target features and their done marks) are 0o664 under umask
    0o002, and 0o644 under umask 0o022 for a model-free method."""
    import finesift

    fast = {"lr": 3e-3, "proj_dim": 64, "warmup_fraction": 0.1, "warmup_epochs": 1}
    with umask(0o002):
        finesift.select(lm_data.pool, lm_data.target, budget=4, method="less",
                        method_options=fast, model=str(tiny_lm_dir), precision="fp32",
                        batch_size=32, out=tmp_path / "less")
    files = sorted(p for p in (tmp_path / "less").rglob("*") if p.is_file())
    names = {p.name for p in files}
    assert {"scores.parquet", "manifest.json", "selected.jsonl", "warmup.pt",
            "ckpt0-target.npy", "ckpt0-target.done.npy"} <= names
    assert any("-pool-chunk" in n for n in names)
    assert not [n for n in names if n.startswith(".")]  # no temporary file left
    assert {str(p): oct(mode(p)) for p in files} == {str(p): "0o664" for p in files}

    with umask(0o022):
        finesift.select(lm_data.pool, lm_data.target, budget=4, method="random",
                        model=str(tiny_lm_dir), out=tmp_path / "random")
    files = sorted(p for p in (tmp_path / "random").rglob("*") if p.is_file())
    assert {"scores.parquet", "manifest.json", "selected.jsonl"} <= {p.name for p in files}
    assert {str(p): oct(mode(p)) for p in files} == {str(p): "0o644" for p in files}


# -- failures ------------------------------------------------------------------------------


def test_a_crash_inside_atomic_path_leaves_no_file(tmp_path: Path) -> None:
    final = tmp_path / "sub" / "scores.parquet"
    with pytest.raises(RuntimeError, match="killed"), atomic_path(final) as tmp:
        tmp.write_bytes(b"half a table")
        raise RuntimeError("killed")
    assert list(tmp_path.rglob("*")) == [tmp_path / "sub"]  # only the folder it made


def test_a_crash_keeps_the_previous_file(tmp_path: Path) -> None:
    final = tmp_path / "manifest.json"
    write_json(final, {"run": 1})
    before = final.read_bytes()
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_text("{")
        raise RuntimeError("killed")
    assert final.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_failing_npy_or_torch_save_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError):  # object arrays are refused (no pickles in the store)
        atomic_save_npy(tmp_path / "a.npy", np.array([{"x": 1}], dtype=object))
    with pytest.raises(Exception):  # noqa: B017 - torch's own error for an unpicklable object
        atomic_save_torch(tmp_path / "s.pt", {"f": lambda: None})
    assert list(tmp_path.iterdir()) == []


# -- npy and torch helpers -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["feats.npy", "marks.done.npy", "state.done", "chunk.tmp"])
def test_atomic_save_npy_writes_exactly_the_name_and_the_bytes_of_np_save(tmp_path: Path,
                                                                          name: str) -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    atomic_save_npy(tmp_path / name, arr)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # np.save would add ".npy"
    back = np.load(tmp_path / name, allow_pickle=False)
    assert back.dtype == arr.dtype and np.array_equal(back, arr)
    buf = io.BytesIO()
    np.save(buf, arr)  # what the code before the store wrote
    assert (tmp_path / name).read_bytes() == buf.getvalue()


def test_atomic_save_npy_overwrites_like_the_done_marks_do(tmp_path: Path) -> None:
    marks = tmp_path / "ckpt0-target.done.npy"
    done = np.zeros(3, dtype=bool)
    for c in range(3):
        done[c] = True
        atomic_save_npy(marks, done)
        np.testing.assert_array_equal(np.load(marks), done)
    assert [p.name for p in tmp_path.iterdir()] == [marks.name]


def test_atomic_save_torch_loads_back_identical(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    blob = {"done": 3, "info": '{"a": 1}',
            "state": {"w": torch.randn(4, 5, generator=g), "b": torch.arange(5)},
            "checkpoints": [{"before": 0.5, "after": 0.25}]}
    path = tmp_path / "tov-0123456789abcdef.pt"
    atomic_save_torch(path, blob)
    back = torch.load(path, weights_only=False)
    assert back["done"] == 3 and back["info"] == blob["info"]
    assert back["checkpoints"] == blob["checkpoints"]
    for k, v in blob["state"].items():
        assert torch.equal(back["state"][k], v) and back["state"][k].dtype == v.dtype
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_chunk_store_round_trip_and_old_files_still_load(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "less-abc" / "ckpt0-pool")
    vals = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    store.save(7, vals)
    assert store.path(7).name == "ckpt0-pool-chunk000007.npy"
    back = store.load(7, (3, 4))
    assert back.dtype == np.float32 and np.array_equal(back, vals)
    # a chunk written by the code before the store (np.save through a file) resumes
    with open(store.path(8), "wb") as fh:
        np.save(fh, vals * 2, allow_pickle=False)
    assert np.array_equal(store.load(8, (3, 4)), vals * 2)
    assert sorted(p.name for p in store.path(7).parent.iterdir()) == [
        "ckpt0-pool-chunk000007.npy", "ckpt0-pool-chunk000008.npy"]


# -- fingerprints --------------------------------------------------------------------------


@dataclass
class Opts:
    lr: float = 3e-3
    mode: str = "basic"
    rounds: int = 2
    names: tuple = ("a", "b")


def _ex(i: int, ids: list[int]) -> Example:
    ids_a = np.asarray(ids, dtype=np.int64)
    labels = np.where(np.arange(len(ids_a)) % 2 == 0, ids_a, -100).astype(np.int64)
    return Example(index=i, input_ids=ids_a, labels=labels,
                   n_label_tokens=int((labels != -100).sum()))


POOL = [_ex(0, [1, 2, 3, 4]), _ex(1, [5, 6]), _ex(2, [7, 8, 9])]
TARGET = [_ex(0, [10, 11, 12])]
SPEC = {"name": "org/tiny-model", "task": "lm", "labels": None, "seed": 0}


def _ctx(**kw) -> MethodContext:
    return MethodContext(pool=POOL, target=TARGET, pool_records=[], target_records=[],
                         task=None, seed=7, precision="fp32", **kw)


def test_run_fingerprint_keeps_its_values() -> None:
    assert run_fingerprint("tov-v3", Opts(), _ctx()) == "3eceb5f0047fa921"
    assert run_fingerprint("less-v2", Opts(), _ctx(model_spec=SPEC)) == "7028d4c492b475c8"
    # anything that enters the key changes it
    assert run_fingerprint("tov-v4", Opts(), _ctx()) != "3eceb5f0047fa921"
    assert run_fingerprint("tov-v3", Opts(lr=1e-3), _ctx()) != "3eceb5f0047fa921"


def test_store_run_v0_scheme_is_run_fingerprint() -> None:
    import json

    identity = {"tag": "less-v2", "options": {"lr": 3e-3, "mode": "basic", "rounds": 2,
                                              "names": ["a", "b"]},
                "seed": 7, "precision": "fp32", "n_pool": 3, "n_target": 1,
                "model": json.dumps(["org/tiny-model", "lm", None, 0])}
    blobs = [a for ex in POOL + TARGET for a in (ex.input_ids, ex.labels)]
    assert fingerprint(identity, version="run-v0", blobs=blobs) == "7028d4c492b475c8"
    no_model = {**identity, "tag": "tov-v3", "model": None}
    assert fingerprint(no_model, version="run-v0", blobs=iter(blobs)) == "3eceb5f0047fa921"


HARP_LOSSES = np.array([1.234567, 2.5, 0.1])
HARP_DOM = np.array([0, 1, 1, 2])
HARP_FP = "89e73d00aa178878742e654704a8d48849f7a75f524e0beb425ff84c46a1dfa5"


def test_harp_run_cache_keeps_its_values(tmp_path: Path) -> None:
    o = HarpOptions(steps=8, lr=2e-4, batch_size=8, lora_rank=16, lora_alpha=32,
                    lora_dropout=0.05, max_target=64)
    cache = _RunCache(tmp_path, o, 3, HARP_LOSSES, HARP_DOM)
    assert cache.fingerprint == HARP_FP
    assert cache.path == tmp_path / f"harp_runs-{HARP_FP[:16]}.json"
    assert _RunCache.key(POOL, 3) == "a4c0a40db8b6acaa81a1b10280dcb028"
    # options that do not change a leaf run (envelope, budget, risk) keep the cache
    other = HarpOptions(envelope="e", budget=5, risk=1.0, steps=8, lr=2e-4, batch_size=8,
                        lora_rank=16, lora_alpha=32, lora_dropout=0.05, max_target=64)
    assert _RunCache(None, other, 3, HARP_LOSSES, HARP_DOM).fingerprint == HARP_FP
    assert _RunCache(None, o, 4, HARP_LOSSES, HARP_DOM).fingerprint != HARP_FP


def test_store_harp_schemes() -> None:
    fp = {"steps": 8, "lr": 2e-4, "batch_size": 8, "lora_rank": 16, "lora_alpha": 32,
          "lora_dropout": 0.05, "max_target": 64}
    blobs = [np.round(HARP_LOSSES.astype(np.float64), 5), HARP_DOM.astype(np.int64)]
    assert fingerprint({"o": fp, "seed": 3}, version="harp-runs-v0", blobs=blobs) == HARP_FP
    leaf = [b for e in POOL for b in (e.input_ids.astype(np.int64), b"|")]
    assert (fingerprint({"seed": 3}, version="harp-leaf-v0", blobs=leaf)
            == "a4c0a40db8b6acaa81a1b10280dcb028")


SHARD_IDENTITY = {
    "method": "dsir", "method_options": {"hashing": "sha256", "n": 2}, "seed": 1,
    "model": {"name": None}, "pool_sha256": ["ab" * 32], "encoded": {"pool": "x"},
    "num_shards": 2, "path": Path("/data/p.jsonl"), "précis": "é",
}


def test_store_shard_scheme_is_the_shards_fingerprint() -> None:
    assert fingerprint(SHARD_IDENTITY, version="shard-v0") == "4d1bbfb2c4c82bd3021f0540"


def test_store_examples_scheme_is_the_shards_encoded_hash() -> None:
    """``_encoded_hash`` of shards.py: int64 ids, ``|``, int64 labels, ``#`` per example."""

    def blobs(examples):
        for e in examples:
            yield from (e.input_ids.astype(np.int64), b"|", e.labels.astype(np.int64), b"#")

    assert (fingerprint({}, version="examples-v0", blobs=blobs(POOL))
            == "63a2aad04831dc77ba4526f98cbc4eae8612b5b1272cabb02944a6ba7a18fa6c")
    assert (fingerprint({}, version="examples-v0")
            == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    with pytest.raises(ValueError, match="blobs only"):
        fingerprint({"seed": 1}, version="examples-v0")


def test_store_bench_scheme_is_the_method_spec_key() -> None:
    from finesift.evaluate.bench import MethodSpec

    options = {"lr": 3e-3, "mode": "basic", "p": Path("/x")}
    assert fingerprint(options, version="bench-v0") == "9df60f69"
    assert fingerprint({}, version="bench-v0") == "bf21a9e8"
    # the key bench.py builds today (until it calls the store itself)
    assert MethodSpec(name="tov", options=options, label="tov-basic").key == "tov-basic#9df60f69"
    assert MethodSpec(name="random", options={}, label="random").key == "random#bf21a9e8"


def test_v1_scheme_is_pinned_versioned_and_framed() -> None:
    identity = {"method": "tov", "seed": 3, "path": Path("/d/p.jsonl"), "x": np.int64(2)}
    key = fingerprint(identity, blobs=[np.arange(3, dtype=np.int64), b"|"])
    assert key == V1_KEY and len(key) == 24
    assert fingerprint(identity, version="v1", blobs=[np.arange(3, dtype=np.int64), b"|"]) == key
    # key order does not matter; the blobs' dtype does
    assert fingerprint(dict(reversed(identity.items())),
                       blobs=[np.arange(3, dtype=np.int64), b"|"]) == key
    assert fingerprint(identity, blobs=[np.arange(3, dtype=np.int32), b"|"]) != key
    # framed blobs: a different split of the same bytes is a different key (legacy: same)
    assert fingerprint({}, blobs=[b"ab", b"c"]) != fingerprint({}, blobs=[b"a", b"bc"])
    assert (fingerprint({}, version="shard-v0", blobs=[b"ab", b"c"])
            == fingerprint({}, version="shard-v0", blobs=[b"a", b"bc"]))
    # the scheme's name is hashed: v1 never equals the legacy JSON hash of the same dict
    assert fingerprint(SHARD_IDENTITY) != fingerprint(SHARD_IDENTITY, version="shard-v0")


V1_KEY = "a37231e8d67527afab25a15d"


def test_v1_is_sha256_of_canonical_json_holding_the_scheme_name() -> None:
    """The v1 format, spelled out: a change to it would strand every v1 key."""
    import hashlib
    import json

    ids = np.arange(3, dtype=np.int64)
    head = json.dumps({"fingerprint": "finesift/v1",
                       "identity": {"method": "tov", "seed": 3, "path": "/d/p.jsonl", "x": 2}},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    blob = head.encode() + b"a<i8[3]24:" + ids.tobytes() + b"b1:|"
    assert hashlib.sha256(blob).hexdigest()[:24] == V1_KEY


def test_v1_refuses_what_has_no_stable_form_and_unknown_schemes() -> None:
    with pytest.raises(TypeError, match="object"):
        fingerprint({"f": object()})
    with pytest.raises(TypeError):
        fingerprint({}, blobs=[np.array([object()])])
    with pytest.raises(ValueError, match="unknown fingerprint scheme 'v9'.*run-v0"):
        fingerprint({}, version="v9")
    assert set(SCHEMES) == {"v1", "run-v0", "harp-runs-v0", "harp-leaf-v0", "shard-v0",
                            "examples-v0", "bench-v0"}
