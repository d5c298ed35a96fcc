"""In-memory pool and target (``datasets.Dataset``, pandas DataFrame, list of dicts, a dict
of named inputs) and the column mapping (``columns=`` / ``--columns`` / ``columns:``):
the same records, checks and selection as from the equivalent files; errors name the
input and row; the manifest identifies in-memory data by the hash of its rows."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import finesift
from finesift.cli import main
from finesift.data.columns import parse_columns
from finesift.data.memory import MemorySource, resolve_inputs
from finesift.data.readers import load_records
from finesift.errors import InputError, OptionError

DSIR = {"budget": 16, "method": "dsir", "precision": "fp32", "batch_size": 32}
TOV = {"budget": 16, "method": "tov", "precision": "fp32", "batch_size": 32,
       "method_options": {"mode": "basic", "lr": 3e-3, "eps": 0.5, "val_epochs": 3}}


def rows_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def rows_sha256(rows: list[dict[str, Any]]) -> str:
    """The content hash the manifest gives an in-memory input (one canonical JSON line per
    row), computed here independently."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    return h.hexdigest()


@pytest.fixture(scope="module")
def memory(lm_data) -> dict[str, Any]:
    """The lm_data files as in-memory objects: the text pool as a Dataset, the chat pool
    as a DataFrame, the target as a list of dicts."""
    return {"text": datasets.Dataset.from_list(rows_of(lm_data.pool[0])),
            "chat": pd.DataFrame(rows_of(lm_data.pool[1])),
            "target": rows_of(lm_data.target)}


# --------------------------------------------------------------------------- selection


def test_dataset_dataframe_and_list_select_as_the_files_do(lm_data, memory, tiny_lm_dir: Path,
                                                          tmp_path: Path) -> None:
    files = finesift.select(lm_data.pool, lm_data.target, model=str(tiny_lm_dir),
                            out=tmp_path / "files", **TOV)
    logged: list[str] = []
    mem = finesift.select([memory["text"], memory["chat"]], memory["target"],
                          model=str(tiny_lm_dir), out=tmp_path / "mem", log=logged.append, **TOV)
    assert mem.selected_ids == files.selected_ids
    np.testing.assert_array_equal(mem.scores, files.scores)
    # the same records, the one reply-less chat skipped and counted as from the file
    assert [r.raw for r in mem.selected] == [lm_data.raw[i] for i in files.selected_ids]
    assert mem.manifest["data"]["pool_reading"]["skipped"] == {
        "chat without a non-empty assistant reply": 1}
    # sources: pool-0, pool-1 (by position), in the score table and the manifest
    table = pq.read_table(tmp_path / "mem" / "scores.parquet").to_pydict()
    assert set(table["source"]) == {"pool-0", "pool-1"}
    assert table["id"] == lm_data.usable
    by_source = mem.manifest["selected"]["by_source"]
    assert set(by_source) <= {"pool-0", "pool-1"} and sum(by_source.values()) == 16
    # the manifest identifies in-memory data by the hash of its rows, not by a path
    pool_fp, target_fp = mem.manifest["data"]["pool"], mem.manifest["data"]["target"]
    assert [f["in_memory"] for f in pool_fp] == ["datasets.Dataset", "pandas.DataFrame"]
    assert pool_fp[0]["name"] == "pool-0" and pool_fp[0]["rows"] == 40
    assert pool_fp[0]["sha256"] == rows_sha256(memory["text"].to_list())
    assert target_fp == [{"name": "target-0", "in_memory": "list of dicts", "rows": 12,
                          "sha256": rows_sha256(memory["target"]),
                          "bytes": target_fp[0]["bytes"]}]
    # no config.yaml (it names input files), and the run says why
    assert not (tmp_path / "mem" / "config.yaml").exists()
    assert (tmp_path / "files" / "config.yaml").exists()
    assert any("no config.yaml written: pool[0] (datasets.Dataset) is in memory" in m
               for m in logged)


def test_content_hash_follows_the_rows(memory) -> None:
    rows = memory["target"]
    same = resolve_inputs(datasets.Dataset.from_list(rows), "target")[0]
    again = resolve_inputs(datasets.Dataset.from_list([dict(r) for r in rows]), "target")[0]
    changed_rows = [dict(r) for r in rows]
    changed_rows[5]["completion"] += " alpha"
    changed = resolve_inputs(datasets.Dataset.from_list(changed_rows), "target")[0]
    for src in (same, again, changed):
        load_records([src], role="target")
    assert same.fingerprint == again.fingerprint
    assert same.fingerprint["sha256"] == rows_sha256(rows)
    assert changed.fingerprint["sha256"] != same.fingerprint["sha256"]


def test_a_list_mixing_files_and_data_and_a_dict_of_named_inputs(lm_data, memory,
                                                               tiny_lm_dir: Path) -> None:
    files = finesift.select(lm_data.pool, lm_data.target, model=str(tiny_lm_dir), **DSIR)
    mixed = finesift.select([lm_data.pool[0], memory["chat"]], lm_data.target,
                            model=str(tiny_lm_dir), **DSIR)
    named = finesift.select({"text": memory["text"], "chat": memory["chat"]}, memory["target"],
                            model=str(tiny_lm_dir), **DSIR)
    assert mixed.selected_ids == files.selected_ids == named.selected_ids
    np.testing.assert_array_equal(mixed.scores, files.scores)
    assert {r.source for r in mixed.pool} == {str(lm_data.pool[0]), "pool-1"}
    assert {r.source for r in named.pool} == {"text", "chat"}
    assert [f.get("name", f.get("path")) for f in mixed.manifest["data"]["pool"]] == [
        str(lm_data.pool[0]), "pool-1"]


def test_default_ids_and_the_datasets_own_name() -> None:
    ds = datasets.Dataset.from_list([{"text": "a b"}, {"text": "c d"}])
    records = load_records(resolve_inputs(ds, "pool"))
    assert [r.id for r in records] == ["pool-0:0", "pool-0:1"]
    assert records[1].where == "pool (datasets.Dataset) row 1"
    ds.info.dataset_name, ds._split = "gsm8k", "train"
    src = resolve_inputs([ds, ds], "pool")
    assert [s.name for s in src] == ["gsm8k/train", "gsm8k/train-1"]
    # a Dataset loaded from local files by a generic loader has no name of its own
    ds.info.dataset_name = "json"
    assert resolve_inputs(ds, "pool")[0].name == "pool-0"


# --------------------------------------------------------------------------- errors


def test_a_datasetdict_asks_for_a_split_naming_them(lm_data) -> None:
    ds = datasets.Dataset.from_list([{"text": "a"}])
    dd = datasets.DatasetDict({"train": ds, "test": ds})
    with pytest.raises(OptionError, match=r"^pool: a datasets.DatasetDict with the splits "
                                          r"'train', 'test': give one split, e.g. ds\['train'\]"):
        finesift.select(dd, lm_data.target, budget=1, method="random")
    with pytest.raises(OptionError, match=r"^target\[1\]: a datasets.DatasetDict with the "
                                          r"splits 'train', 'test'"):
        finesift.select(lm_data.pool, [lm_data.target, dd], budget=1, method="random")


@pytest.mark.parametrize(("pool", "message"), [
    ([{"text": "a"}, {"text": "b"}, {"text": 5}],
     "pool (list of dicts) row 2: field 'text': expected a string, got int"),
    ([{"text": "a"}, {"text": "b", "when": pd.Timestamp("2024-01-01")}],
     "pool (list of dicts) row 1: field 'when': a pandas.Timestamp value is not JSON data"),
    ([{"text": "a", "id": "x"}, {"text": "b", "id": "x"}],
     ("pool (list of dicts) row 1: duplicate id 'x': first at pool (list of dicts) row 0, "
     "again at pool (list of dicts) row 1")),
    ([{"text": "a"}, {"prompt": "p", "completion": "c"}],
     ("pool (list of dicts) row 1: record shape 'prompt_completion' differs from the input's "
     "first record (pool (list of dicts) row 0: 'text')")),
    (pd.DataFrame({"text": ["a", "b\x00c"]}),
     "pool (pandas.DataFrame) row 1: field 'text' holds a NUL character"),
    (pd.DataFrame({"text": [pd.Timestamp("2024-01-01")]}),
     "pool (pandas.DataFrame): column 'text' has Arrow type timestamp"),
    (datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"},
                                               {"role": "robot", "content": "beep"}]}]),
     "pool (datasets.Dataset) row 0: field messages[1].role: unknown role 'robot'"),
    ([[{"text": "a"}], {"text": "b"}],
     "pool[1]: expected a file path, a datasets.Dataset"),
    (42, ("pool: expected a file path, a datasets.Dataset (one split of a DatasetDict), a "
         "pandas DataFrame, a pyarrow Table or a list of dicts (or a list of them); got int")),
    (datasets.Dataset.from_list([{"text": "a"}]).to_iterable_dataset(),
     "pool: a streaming datasets.IterableDataset"),
])
def test_bad_rows_and_objects_are_named_by_input_and_row(lm_data, pool, message) -> None:
    with pytest.raises((InputError, OptionError)) as info:
        finesift.select(pool, lm_data.target, budget=1, method="random")
    assert str(info.value).startswith(message), str(info.value)


def test_a_task_mismatch_names_the_row(lm_data) -> None:
    ner = [{"tokens": ["john", "ran"], "tags": ["B-PER", "O"]}]
    with pytest.raises(InputError, match=r"^pool\[1\] \(list of dicts\) row 0: "):
        finesift.select([lm_data.pool[0], ner], lm_data.target, budget=1, method="random")


def test_an_empty_dataset_is_an_empty_pool(lm_data) -> None:
    empty = datasets.Dataset.from_dict({"text": []})
    with pytest.raises(InputError, match=r"^pool \(datasets.Dataset\): empty pool"):
        finesift.select(empty, lm_data.target, budget=1, method="random")


def test_a_shard_run_needs_files(lm_data, memory, tmp_path: Path) -> None:
    with pytest.raises(OptionError, match=r"a shard run needs pool and target files .*"
                                          r"pool\[0\] \(datasets.Dataset\) is in memory"):
        finesift.select([memory["text"]], lm_data.target, method="random", out=tmp_path,
                        num_shards=2, shard_index=0)


# --------------------------------------------------------------------------- columns


def renamed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"uid": r["id"], "query": r["prompt"], "response": r["completion"]} for r in rows]


def prompt_rows(lm_data) -> list[dict[str, Any]]:
    """The text pool as prompt/completion records."""
    return [{"id": r["id"], "prompt": "please continue", "completion": r["text"]}
            for r in rows_of(lm_data.pool[0])]


def test_columns_map_a_dataset_onto_prompt_completion(lm_data, memory, tiny_lm_dir: Path,
                                                     tmp_path: Path) -> None:
    plain = finesift.select(prompt_rows(lm_data), lm_data.target, model=str(tiny_lm_dir),
                            **DSIR)
    pool = datasets.Dataset.from_list(renamed(prompt_rows(lm_data)))
    target = datasets.Dataset.from_list(renamed(memory["target"]))
    columns = {"id": "uid", "prompt": "query", "completion": "response"}
    mapped = finesift.select(pool, target, model=str(tiny_lm_dir), columns=columns,
                             out=tmp_path / "out", **DSIR)
    assert mapped.selected_ids == plain.selected_ids
    assert mapped.selected_ids[0].startswith("text-")
    np.testing.assert_array_equal(mapped.scores, plain.scores)
    # the target file already has prompt and completion: it is read as it is
    as_file = finesift.select(pool, lm_data.target, model=str(tiny_lm_dir), columns=columns,
                              **DSIR)
    assert as_file.selected_ids == plain.selected_ids
    assert mapped.manifest["columns"] == columns
    written = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    assert written["columns"] == columns
    assert list(written).index("columns") == list(written).index("format") + 1


def test_columns_are_read_from_files_too_and_rows_stay_as_read(lm_data, tiny_lm_dir: Path,
                                                              tmp_path: Path,
                                                              write_jsonl) -> None:
    target = write_jsonl(tmp_path / "renamed.jsonl", renamed(rows_of(lm_data.target)))
    pool = tmp_path / "pool.csv"
    pd.DataFrame(renamed(rows_of(lm_data.target))[:6]
                 + [{"uid": f"n{i}", "query": "lorem ipsum", "response": "dolor amet"}
                    for i in range(10)]).to_csv(pool, index=False)
    sel = finesift.select(pool, target, model=str(tiny_lm_dir), budget=6, method="dsir",
                          columns="prompt=query,completion=response,id=uid",
                          out=tmp_path / "out")
    assert {r.shape for r in sel.pool} == {"prompt_completion"}
    assert sel.pool[0].prompt == "please continue the sequence"
    assert [r.id for r in sel.pool][:2] == ["target-0", "target-1"]
    rows = [json.loads(x) for x in (tmp_path / "out" / "selected.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"uid", "query", "response"}  # selected.jsonl: rows as read
    # config.yaml keeps the mapping, and runs again to the same selection
    cfg = (tmp_path / "out" / "config.yaml").read_text(encoding="utf-8")
    assert "columns:\n  prompt: query\n  completion: response\n  id: uid\n" in cfg
    rc = main(["select", "--config", str(tmp_path / "out" / "config.yaml"),
               "--out", str(tmp_path / "again"), "--no-progress"])
    assert rc == 0
    assert (tmp_path / "again" / "selected.jsonl").read_text() == \
        (tmp_path / "out" / "selected.jsonl").read_text()


def test_cli_columns_flag(lm_data, tiny_lm_dir: Path, tmp_path: Path, write_jsonl,
                          capsys) -> None:
    pool = write_jsonl(tmp_path / "renamed.jsonl", renamed(prompt_rows(lm_data)))
    argv = ["select", "--pool", str(pool), "--target", str(lm_data.target),
            "--out", str(tmp_path / "out"), "--model", str(tiny_lm_dir), "--no-progress",
            "--budget", "8", "--method", "random"]
    rc = main([*argv, "--columns", "prompt=query,completion=response"])
    assert rc == 0, capsys.readouterr().err
    man = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    assert man["columns"] == {"prompt": "query", "completion": "response"}
    capsys.readouterr()
    rc = main([*argv, "--columns", "prompt=qeury,completion=response"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip() == (
        f"finesift: error: {pool}:1: --columns prompt=qeury,completion=response: the record "
        "has no column 'qeury' (for prompt); its columns: uid, query, response")


@pytest.mark.parametrize(("columns", "message"), [
    ({"prompt": "query", "completion": "nope"},
     ("pool[0] (datasets.Dataset): --columns prompt=query,completion=nope: the data has no "
     "column 'nope' (for completion); its columns: uid, query, response")),
    ({"prompt": "query"},
     ("pool[0] (datasets.Dataset) row 0: unknown record shape (has 'prompt' but no "
     "'completion')")),
])
def test_a_missing_column_names_the_column_the_input_and_its_columns(lm_data, memory, columns,
                                                                    message) -> None:
    pool = datasets.Dataset.from_list(renamed(memory["target"]))
    with pytest.raises(InputError) as info:
        finesift.select([pool], lm_data.target, budget=1, method="random", columns=columns)
    assert str(info.value).startswith(message), str(info.value)


def test_a_mapping_is_checked_for_each_input(lm_data, memory) -> None:
    # the text pool has neither 'query' nor 'prompt': the mapping cannot apply to it
    pool = [datasets.Dataset.from_list(renamed(memory["target"])), memory["text"]]
    with pytest.raises(InputError, match=r"^pool\[1\] \(datasets.Dataset\): --columns "
                                         r"prompt=query,completion=response: the data has no "
                                         r"column 'query' \(for prompt\), 'response' \(for "
                                         r"completion\); its columns: id, text"):
        finesift.select(pool, lm_data.target, budget=1, method="random",
                        columns={"prompt": "query", "completion": "response"})


@pytest.mark.parametrize(("value", "message"), [
    ({"promt": "q"}, ("--columns promt=q: 'promt' is not a field finesift reads; map onto one "
                     "of: id, messages")),
    ("prompt", "--columns 'prompt': expected FIELD=COLUMN"),
    ({"prompt": ""}, "--columns prompt=...: expected a column name, got ''"),
    (["prompt=a", "prompt=b"], "--columns: 'prompt' is mapped twice ('a' and 'b')"),
    (3, "--columns: expected a mapping of finesift fields to your column names"),
])
def test_bad_mappings_are_option_errors(value, message) -> None:
    with pytest.raises(OptionError) as info:
        parse_columns(value)
    assert str(info.value).startswith(message), str(info.value)


def test_mapping_swaps_and_keeps_other_fields() -> None:
    rows = [{"prompt": "the answer", "completion": "the question", "domain": "x", "id": 3}]
    (rec,) = load_records(resolve_inputs(rows, "pool"),
                          columns={"prompt": "completion", "completion": "prompt"})
    assert (rec.prompt, rec.completion, rec.meta, rec.id) == (
        "the question", "the answer", {"domain": "x"}, "3")
    assert rec.raw == rows[0]
    assert isinstance(resolve_inputs(rows, "pool")[0], MemorySource)


def test_auto_takes_in_memory_data_and_columns(lm_data, memory, tiny_lm_dir: Path,
                                               tmp_path: Path) -> None:
    pool = datasets.Dataset.from_list(renamed(prompt_rows(lm_data)))
    columns = {"id": "uid", "prompt": "query", "completion": "response"}
    out = tmp_path / "auto"
    sel = finesift.select(pool, memory["target"], budget=8, method="auto", out=out,
                          model=str(tiny_lm_dir), precision="fp32", columns=columns,
                          export="messages",
                          method_options={"candidates": "dsir", "steps": 2, "lr": 3e-3,
                                          "trial_pool": 20})
    man = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert man["auto"]["winner"] in ("dsir", "random") and man["method"] == man["auto"]["winner"]
    assert man["data"]["pool"][0]["in_memory"] == "datasets.Dataset"
    assert man["columns"] == columns and man["exports"]["messages"]["rows"] == 8
    assert [r["id"] for r in map(json.loads, (out / "selected_messages.jsonl").read_text(
        encoding="utf-8").splitlines())] == sel.selected_ids
    # the trials read the subsampled rows as written (the data's own columns), mapped
    data_dir = next((out / ".work" / "auto").glob("data-*"))
    trial_rows = [json.loads(x) for p in data_dir.glob("pool-*") for x in p.read_text().splitlines()]
    assert len(trial_rows) == 20 and set(trial_rows[0]) == {"uid", "query", "response", "id"}


def test_merge_reads_the_pool_files_through_the_shards_columns(lm_data, tiny_lm_dir: Path,
                                                               tmp_path: Path, write_jsonl,
                                                               monkeypatch) -> None:
    from finesift import shards
    from finesift.store import chunks

    monkeypatch.setattr(chunks, "DEFAULT_CHUNK", 8)  # 40 examples -> 5 chunks, both shards
    pool = write_jsonl(tmp_path / "renamed.jsonl", renamed(prompt_rows(lm_data)))
    kw = {"method": "random", "model": str(tiny_lm_dir),
          "columns": {"id": "uid", "prompt": "query", "completion": "response"}}
    full = finesift.select(pool, lm_data.target, budget=10, out=tmp_path / "full", **kw)
    for i in range(2):
        finesift.select(pool, lm_data.target, out=tmp_path / f"s{i}", num_shards=2,
                        shard_index=i, **kw)
    merged = shards.merge([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged", budget=10)
    assert merged.selected_ids == full.selected_ids
    assert merged.manifest["columns"] == kw["columns"]
    assert (tmp_path / "merged" / "selected.jsonl").read_text() == \
        (tmp_path / "full" / "selected.jsonl").read_text()
