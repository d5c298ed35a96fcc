"""Hostile input, fuzzed over every reader (issue 15).

A seeded generator builds a few hundred broken inputs from five families:

* broken records in otherwise good files, written by every reader's format (lone UTF-16
  surrogates, NUL characters, ids that are not strings or integers, chat messages mixing
  OpenAI and ShareGPT keys, nesting tens of thousands deep, wrong types, missing fields,
  unknown roles, duplicate ids, mixed shapes, tokens and tags of different lengths, binary
  text that is not UTF-8), each at a random row;
* broken files of each format (truncated, binary, unclosed CSV quotes, another format
  behind the extension, Arrow columns of timestamp, date or decimal type, incomplete
  ``datasets`` folders, ...);
* broken paths (empty, character devices, named pipes, unreadable files, symlink loops);
* broken options of ``random`` and ``dsir`` (infinities, fractions and words for counts,
  negative seeds and budgets, unknown keys);
* broken output folders (under a file, in /proc or /sys, a folder where a file goes).

Every case must end with exit code 2 and exactly one ``finesift: error:`` line, naming
the file and the line or record where there is one, no traceback, nothing on stdout and
no output files that look whole; each case runs under a time limit. The writers of
:data:`WRITERS` cover :data:`finesift.data.readers.FORMATS`, and a test fails when a
format has no writer: a new reader is fuzzed as soon as it gets one.

The cases use ``random`` and ``dsir`` (no model weights; only the tiny tokenizer is
loaded, and most cases stop while reading). The named pipe and ``/dev/zero`` cases run
in a subprocess with a timeout, as a regression there would hang or fill the memory.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from finesift.cli import main
from finesift.data import readers

SEED = 15
CASE_SECONDS = 60  # per case; each takes a fraction of a second on an idle machine
N_VARIANTS = 2  # seeded variants (position, values) of each broken-record case
OUTPUTS = ("scores.parquet", "selected.jsonl", "manifest.json")
METHODS = ("random", "dsir")

WORDS = ["the", "cat", "sat", "on", "a", "red", "mat", "while", "two", "dogs", "ran", "to",
         "old", "river", "and", "one", "bird", "sang", "song", "of", "green", "trees"]


# --------------------------------------------------------------------------- writers


@dataclass(frozen=True)
class RawJSON:
    """A value written as this JSON text verbatim (e.g. nesting too deep for json.dumps)."""

    text: str


def dumps(value: Any) -> str:
    """JSON text of ``value`` (ASCII, so lone surrogates and NULs become escapes)."""
    if isinstance(value, RawJSON):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


def _utf8(text: str) -> bytes:
    """UTF-8 bytes, lone surrogates included as the (invalid) bytes they would take."""
    return text.encode("utf-8", errors="surrogatepass")


# A writer takes a path without extension and the rows; it writes the file (or folder)
# and returns its path and, per row, where an error about that row points: "FILE:LINE"
# or "FILE (record N)", as finesift prints it.
Writer = Callable[[Path, list[dict[str, Any]]], tuple[Path, list[str]]]


def write_jsonl(stem: Path, rows: list[dict[str, Any]]) -> tuple[Path, list[str]]:
    path = stem.with_suffix(".jsonl")
    path.write_bytes(_utf8("".join(dumps(r) + "\n" for r in rows)))
    return path, [f"{path}:{i + 1}" for i in range(len(rows))]


def write_json(stem: Path, rows: list[dict[str, Any]]) -> tuple[Path, list[str]]:
    path = stem.with_suffix(".json")
    path.write_bytes(_utf8("[\n" + ",\n".join(dumps(r) for r in rows) + "\n]\n"))
    return path, [f"(record {i})" for i in range(len(rows))]


def write_csv(stem: Path, rows: list[dict[str, Any]]) -> tuple[Path, list[str]]:
    path = stem.with_suffix(".csv")
    header = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        return "" if v is None else v if isinstance(v, str) else dumps(v)

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    where, line = [], 2
    for r in rows:
        start = buf.tell()
        w.writerow([cell(r.get(h)) for h in header])
        where.append(f"{path}:{line}")
        line += buf.getvalue()[start:].count("\n")
    path.write_bytes(_utf8(buf.getvalue()))
    return path, where


def _arrow_table(rows: list[dict[str, Any]]) -> Any:
    """An Arrow table with a column for every key of any row (a row without it: null);
    ``from_pylist`` alone would keep only the first row's keys."""
    import pyarrow as pa

    keys = list(dict.fromkeys(k for r in rows for k in r))
    return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])


def write_parquet(stem: Path, rows: list[dict[str, Any]]) -> tuple[Path, list[str]]:
    import pyarrow.parquet as pq

    path = stem.with_suffix(".parquet")
    pq.write_table(_arrow_table(rows), path)
    return path, [f"{path} (record {i})" for i in range(len(rows))]


def write_hf(stem: Path, rows: list[dict[str, Any]]) -> tuple[Path, list[str]]:
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset(_arrow_table(rows)).save_to_disk(str(stem))
    return stem, [f"{stem} (record {i})" for i in range(len(rows))]


def write_conll(stem: Path, rows: list[dict[str, Any]]) -> tuple[Path, list[str]]:
    path = stem.with_suffix(".conll")
    lines, where = [], []
    for r in rows:
        where.append(f"{path}:{len(lines) + 1}")
        lines += [f"{tok}\t{tag}" for tok, tag in zip(r["tokens"], r["tags"], strict=True)]
        lines.append("")
    path.write_bytes(_utf8("\n".join(lines) + "\n"))
    return path, where


WRITERS: dict[str, Writer] = {
    "jsonl": write_jsonl,
    "json": write_json,
    "csv": write_csv,
    "parquet": write_parquet,
    "hf": write_hf,
    "conll": write_conll,
}

# The record shapes each format is fuzzed with (CoNLL holds NER sentences only).
SHAPES = {
    "jsonl": ("text", "pc", "chat", "sharegpt", "ner"),
    "json": ("text", "pc", "chat", "sharegpt", "ner"),
    "csv": ("text", "pc", "chat", "sharegpt", "ner"),
    "parquet": ("text", "pc", "chat", "sharegpt", "ner"),
    "hf": ("text", "pc", "chat", "sharegpt", "ner"),
    "conll": ("ner",),
}

# Where each shape keeps the text a corruption goes into.
TEXT_FIELD = {"text": "text", "pc": "completion", "chat": "messages[1].content",
              "sharegpt": "conversations[1].value", "ner": "tokens[0]"}


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def good_row(shape: str, i: int, rng: random.Random) -> dict[str, Any]:
    rid = f"r{i}"
    if shape == "text":
        return {"id": rid, "text": _words(rng, 6)}
    if shape == "pc":
        return {"id": rid, "prompt": _words(rng, 4), "completion": _words(rng, 5)}
    if shape == "chat":
        return {"id": rid, "messages": [{"role": "user", "content": _words(rng, 4)},
                                        {"role": "assistant", "content": _words(rng, 5)}]}
    if shape == "sharegpt":
        return {"id": rid, "conversations": [{"from": "human", "value": _words(rng, 4)},
                                             {"from": "gpt", "value": _words(rng, 5)}]}
    tokens = _words(rng, 4).split()
    return {"id": rid, "tokens": tokens, "tags": [rng.choice(["O", "B-X", "I-X"]) for _ in tokens]}


def _set_text(row: dict[str, Any], shape: str, value: Any) -> None:
    if shape in ("text", "pc"):
        row[TEXT_FIELD[shape]] = value
    elif shape == "chat":
        row["messages"][1]["content"] = value
    elif shape == "sharegpt":
        row["conversations"][1]["value"] = value
    else:
        row["tokens"][0] = value


def _get_text(row: dict[str, Any], shape: str) -> str:
    if shape in ("text", "pc"):
        return row[TEXT_FIELD[shape]]
    if shape == "chat":
        return row["messages"][1]["content"]
    if shape == "sharegpt":
        return row["conversations"][1]["value"]
    return row["tokens"][0]


def _insert(text: str, piece: str, rng: random.Random) -> str:
    at = rng.randrange(len(text) + 1)
    return text[:at] + piece + text[at:]


# --------------------------------------------------------------------------- broken records

LINE_FORMATS = ("jsonl", "json")  # formats that store any JSON value as it is
UTF8_FORMATS = ("csv", "conll")  # a lone surrogate can only be written as invalid UTF-8


def _raw_text(fmt: str, shape: str) -> bool:
    """Whether the shape's text is written as it is (not inside a JSON string, as CSV
    stores lists), so that a lone surrogate becomes invalid UTF-8 in the file."""
    return fmt == "conll" or (fmt == "csv" and shape in ("text", "pc"))


@dataclass
class Corruption:
    """A broken record: ``make(row, shape, fmt, rng)`` breaks ``row`` in place and returns
    the substrings the error must hold (``None``: not applicable to that shape/format)."""

    name: str
    formats: tuple[str, ...]
    make: Callable[[dict[str, Any], str, str, random.Random], list[str] | None]
    prepare: Callable[[dict[str, Any], str], None] | None = None  # applied to every good row


def _surrogate(rng: random.Random) -> str:
    return chr(rng.randrange(0xD800, 0xE000))


def _lone_surrogate_text(row, shape, fmt, rng):
    _set_text(row, shape, _insert(_get_text(row, shape), _surrogate(rng), rng))
    if _raw_text(fmt, shape):
        return ["not valid UTF-8 text"]
    return [f"field '{TEXT_FIELD[shape]}' holds a lone UTF-16 surrogate"]


def _lone_surrogate_id(row, shape, fmt, rng):
    row["id"] = _insert("id", _surrogate(rng), rng)
    if fmt in UTF8_FORMATS:
        return ["not valid UTF-8 text"]
    return ["field 'id' holds a lone UTF-16 surrogate"]


def _lone_surrogate_extra(row, shape, fmt, rng):
    row["meta"] = {"notes": ["fine", _insert("note", _surrogate(rng), rng)]}
    return ["field 'meta.notes[1]' holds a lone UTF-16 surrogate"]


def _nul_text(row, shape, fmt, rng):
    _set_text(row, shape, _insert(_get_text(row, shape), "\x00", rng))
    return [f"field '{TEXT_FIELD[shape]}' holds a NUL character"]


def _nul_id(row, shape, fmt, rng):
    row["id"] = _insert("id", "\x00", rng)
    return ["field 'id' holds a NUL character"]


def _nul_field_name(row, shape, fmt, rng):
    row[_insert("extra", "\x00", rng)] = "x"
    return ["a field name holds a NUL character"]


def _non_string_id(row, shape, fmt, rng):
    row["id"] = rng.choice([1.5, 3.0, -0.25, True, False, [1], ["a", "b"], {"k": 1}, {}, 1e300])
    return ["field 'id': expected a string or an integer"]


def _mixed_chat_keys(row, shape, fmt, rng):
    if shape not in ("chat", "sharegpt"):
        return None
    key = "messages" if shape == "chat" else "conversations"
    msgs = row[key]
    j = rng.randrange(len(msgs))
    role = msgs[j].get("role", msgs[j].get("from"))
    content = msgs[j].get("content", msgs[j].get("value"))
    variant = rng.randrange(4)
    if variant == 0:  # from + content
        msgs[j] = {"from": role, "content": content}
        return [f"field '{key}[{j}]': mixes key styles"]
    if variant == 1:  # role + value
        msgs[j] = {"role": role, "value": content}
        return [f"field '{key}[{j}]': mixes key styles"]
    if variant == 2:  # both role keys
        msgs[j] = {"role": role, "from": role, "content": content, "value": content}
        return [f"field '{key}[{j}]': has both"]
    # the other style, whole message: the conversation switches styles
    other = {"from": "gpt" if role == "assistant" else "human", "value": content} \
        if shape == "chat" else {"role": "assistant" if role == "gpt" else "user",
                                 "content": content}
    j = len(msgs) - 1
    msgs[j] = other
    return [f"field '{key}[{j}]': uses", "one conversation uses one key style"]


def _deep_field(row, shape, fmt, rng):
    depth = rng.choice([rng.randrange(101, 400), rng.randrange(20_000, 60_000)])
    row["extra"] = RawJSON("[" * depth + "]" * depth)
    return [f"nested more than {readers.MAX_DEPTH} levels deep"]


def _wrong_type(row, shape, fmt, rng):
    value = rng.choice([7, 2.5, True, ["a"], {"a": 1}])
    if shape == "ner":
        row["tags"] = [value] + row["tags"][1:]
        return ["field 'tags[0]': expected a string"]
    _set_text(row, shape, value)
    if shape in ("chat", "sharegpt"):
        return [f"field {TEXT_FIELD[shape]}: expected a string"]
    return [f"field '{TEXT_FIELD[shape]}': expected a string"]


def _missing_field(row, shape, fmt, rng):
    drop = {"text": "text", "pc": "completion", "ner": "tags"}.get(shape)
    if drop is None:
        return None
    del row[drop]
    if shape == "text":
        row["body"] = "no text field"
    return ["unknown record shape"]


def _unknown_role(row, shape, fmt, rng):
    if shape not in ("chat", "sharegpt"):
        return None
    key, role_key = ("messages", "role") if shape == "chat" else ("conversations", "from")
    row[key][0][role_key] = rng.choice(["wizard", "narrator", "", "USERS"])
    return [f"field {key}[0].{role_key}: unknown role"]


def _tags_mismatch(row, shape, fmt, rng):
    if shape != "ner":
        return None
    row["tags"] = row["tags"][:-1] if rng.random() < 0.5 else row["tags"] + ["O"]
    return ["items but tags has"]


def _binary_not_utf8(row, shape, fmt, rng):
    if shape not in ("text", "pc"):
        return None
    field = TEXT_FIELD[shape]
    row[field] = _insert("text", rng.choice(["\udcff", "\udcc3", "\udcfe\udcfe"]), rng) \
        .encode("utf-8", errors="surrogateescape")
    return [f"field '{field}': binary data that is not UTF-8 text"]


def _as_bytes(row: dict[str, Any], shape: str) -> None:
    """Good rows with their text as UTF-8 bytes (an Arrow binary column)."""
    if shape in ("text", "pc"):
        row[TEXT_FIELD[shape]] = row[TEXT_FIELD[shape]].encode("utf-8")


ARROW = ("parquet", "hf")
CORRUPTIONS = [
    Corruption("lone-surrogate-text", LINE_FORMATS + UTF8_FORMATS, _lone_surrogate_text),
    Corruption("lone-surrogate-id", LINE_FORMATS + ("csv",), _lone_surrogate_id),
    Corruption("lone-surrogate-extra-field", LINE_FORMATS, _lone_surrogate_extra),
    Corruption("nul-text", LINE_FORMATS + ("csv", "conll") + ARROW, _nul_text),
    Corruption("nul-id", LINE_FORMATS + ("csv",) + ARROW, _nul_id),
    Corruption("nul-field-name", LINE_FORMATS, _nul_field_name),
    Corruption("non-string-id", LINE_FORMATS, _non_string_id),
    Corruption("mixed-chat-keys", LINE_FORMATS + ("csv",) + ARROW, _mixed_chat_keys),
    Corruption("deep-nesting", LINE_FORMATS, _deep_field),
    Corruption("wrong-type", LINE_FORMATS, _wrong_type),
    Corruption("missing-field", LINE_FORMATS + ARROW, _missing_field),
    Corruption("unknown-role", LINE_FORMATS + ("csv",) + ARROW, _unknown_role),
    Corruption("tags-mismatch", LINE_FORMATS + ("csv",) + ARROW, _tags_mismatch),
    Corruption("binary-not-utf8", ARROW, _binary_not_utf8, prepare=_as_bytes),
]


# --------------------------------------------------------------------------- cases


@dataclass
class Env:
    """What every case may use: targets, tiny model folders."""

    lm_target: Path
    ner_target: Path
    lm_model: Path
    ner_model: Path

    def task_args(self, ner: bool) -> list[str]:
        if ner:
            return ["--task", "ner", "--model", str(self.ner_model), "--target",
                    str(self.ner_target)]
        return ["--model", str(self.lm_model), "--target", str(self.lm_target)]


# A case builds its input in a folder and returns (extra argv, substrings the error must
# hold, the output folder to check).
Build = Callable[[Path, Env, pytest.MonkeyPatch], tuple[list[str], list[str]]]


@dataclass
class Case:
    id: str
    build: Build
    method: str = "random"
    out_dir: str = "out"  # the output folder, relative to the case's folder


def _row_case(corruption: Corruption, fmt: str, shape: str, variant: int) -> Case | None:
    rng = random.Random(f"{SEED}|{corruption.name}|{fmt}|{shape}|{variant}")
    n_good = rng.randrange(2, 7)
    rows = [good_row(shape, i, rng) for i in range(n_good)]
    bad_at = rng.randrange(1, n_good + 1)  # never first: the file's shape is set by row 0
    bad = json.loads(json.dumps(rows[bad_at - 1]))  # a good row to break
    bad["id"] = f"r{n_good}"
    expected = corruption.make(bad, shape, fmt, rng)
    if expected is None:
        return None
    if corruption.prepare is not None:
        for row in rows:
            corruption.prepare(row, shape)
    rows.insert(bad_at, bad)

    def build(tmp: Path, env: Env, mp: pytest.MonkeyPatch):
        path, where = WRITERS[fmt](tmp / "pool", rows)
        return (["--pool", str(path), *env.task_args(shape == "ner")],
                [str(path), where[bad_at], *expected])

    return Case(f"record-{corruption.name}-{fmt}-{shape}-{variant}", build,
                METHODS[rng.randrange(2)])


def _duplicate_id_case(fmt: str, shape: str, variant: int) -> Case:
    rng = random.Random(f"{SEED}|dup|{fmt}|{shape}|{variant}")
    n = rng.randrange(3, 8)
    rows = [good_row(shape, i, rng) for i in range(n)]
    first, again = sorted(rng.sample(range(n), 2))
    rows[again]["id"] = rows[first]["id"]

    def build(tmp: Path, env: Env, mp: pytest.MonkeyPatch):
        path, where = WRITERS[fmt](tmp / "pool", rows)
        return (["--pool", str(path), *env.task_args(shape == "ner")],
                [f"duplicate id {rows[first]['id']!r}", str(path), where[again]])

    return Case(f"record-duplicate-id-{fmt}-{shape}-{variant}", build, METHODS[variant % 2])


def _mixed_shape_case(fmt: str, variant: int) -> Case:
    rng = random.Random(f"{SEED}|mixed|{fmt}|{variant}")
    a, b = rng.sample(["text", "pc", "chat", "ner"], 2)
    rows = [good_row(a, i, rng) for i in range(rng.randrange(1, 5))]
    at = len(rows)
    rows.append(good_row(b, at, rng))
    names = {"text": "text", "pc": "prompt_completion", "chat": "chat", "ner": "ner"}

    def build(tmp: Path, env: Env, mp: pytest.MonkeyPatch):
        path, where = WRITERS[fmt](tmp / "pool", rows)
        return (["--pool", str(path), *env.task_args(False)],
                [str(path), where[at], f"record shape {names[b]!r} differs"])

    return Case(f"record-mixed-shape-{fmt}-{variant}", build, METHODS[variant % 2])


def record_cases() -> list[Case]:
    cases = []
    for corruption in CORRUPTIONS:
        for fmt in corruption.formats:
            for shape in SHAPES[fmt]:
                for variant in range(N_VARIANTS):
                    case = _row_case(corruption, fmt, shape, variant)
                    if case is not None:
                        cases.append(case)
    for fmt in ("jsonl", "json", "csv", "parquet", "hf"):
        for shape in ("text", "chat", "ner"):
            cases.append(_duplicate_id_case(fmt, shape, 0))
    for fmt in ("jsonl", "json", "parquet", "hf"):
        for variant in range(3):
            cases.append(_mixed_shape_case(fmt, variant))
    return cases


# ---- broken files: each writes one file and names the substrings of its error

def _file(name: str, data: bytes | str, *expected: str, ner: bool = False,
          fmt: str | None = None, where: str | None = None) -> Build:
    def build(tmp: Path, env: Env, mp: pytest.MonkeyPatch):
        path = tmp / name
        path.write_bytes(data if isinstance(data, bytes) else _utf8(data))
        extra = ["--format", fmt] if fmt else []
        loc = [f"{path}{where}"] if where else [str(path)]
        return (["--pool", str(path), *extra, *env.task_args(ner)], [*loc, *expected])
    return build


def _lines(rows: list[dict[str, Any]]) -> str:
    return "".join(dumps(r) + "\n" for r in rows)


def _table(name: str, columns: dict[str, Any], *expected: str, where: str = "") -> Build:
    """A Parquet file (name ends .parquet) or datasets folder from Arrow columns."""
    def build(tmp: Path, env: Env, mp: pytest.MonkeyPatch):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(columns)
        if name.endswith(".parquet"):
            path = tmp / name
            pq.write_table(table, path)
        else:
            import datasets

            datasets.disable_progress_bars()
            path = tmp / name
            datasets.Dataset(table).save_to_disk(str(path))
        return (["--pool", str(path), *env.task_args(False)], [f"{path}{where}", *expected])
    return build


def file_cases() -> list[Case]:
    import datetime
    import decimal

    import pyarrow as pa

    rng = random.Random(f"{SEED}|files")
    text_rows = [good_row("text", i, rng) for i in range(4)]
    jsonl = _lines(text_rows)
    conll = "john\tB-X\nran\tO\n\nmary\tB-X\nsang\tO\n"
    deep = "[" * 50_000 + "]" * 50_000
    cases: dict[str, Build] = {
        # JSON Lines
        "jsonl-invalid-json": _file("p.jsonl", jsonl + '{"text": "a",}\n', "invalid JSON",
                                    where=":5"),
        "jsonl-truncated": _file("p.jsonl", jsonl + '{"text": "the c', "invalid JSON",
                                 where=":5"),
        "jsonl-json-array": _file("p.jsonl", "[\n" + ",\n".join(dumps(r) for r in text_rows)
                                  + "\n]\n", "starts like a JSON array", where=":1"),
        "jsonl-one-line-array": _file("p.jsonl", dumps(text_rows) + "\n",
                                      "needs .json or the format json", where=":1"),
        "jsonl-not-utf8": _file("p.jsonl", _utf8(jsonl) + b'{"text": "caf\xe9"}\n',
                                "not valid UTF-8 text", where=":5"),
        "jsonl-binary": _file("p.jsonl", bytes(rng.randrange(256) for _ in range(600)),
                              where=":"),
        "jsonl-csv-inside": _file("p.jsonl", "prompt,completion\na,b\n",
                                  "looks like CSV or tab-separated text", where=":1"),
        "jsonl-deep-line": _file("p.jsonl", jsonl + deep + "\n", "nested more than",
                                 where=":5"),
        "jsonl-scalar-line": _file("p.jsonl", jsonl + "42\n", "expected a JSON object",
                                   where=":5"),
        "jsonl-as-conll": _file("p.jsonl", jsonl, "looks like JSON Lines", "not CoNLL",
                                "because the format 'conll' was given", fmt="conll",
                                where=":1"),
        "jsonl-as-csv": _file("p.jsonl", jsonl, "looks like JSON Lines",
                              "because the format 'csv' was given", fmt="csv", where=":1"),
        "jsonl-in-txt": _file("p.txt", jsonl, "looks like JSON Lines",
                              "because of the extension '.txt'", where=":1"),
        # JSON
        "json-truncated": _file("p.json", "[" + dumps(text_rows[0]) + ", {",
                                "invalid JSON", where=":"),
        "json-jsonl-inside": _file("p.json", jsonl, "name it .jsonl", where=":2"),
        "json-no-list": _file("p.json", '{"a": 1, "b": {"c": 2}}', "expected a JSON array"),
        "json-scalar-item": _file("p.json", "[" + dumps(text_rows[0]) + ", 7]",
                                  "expected a JSON object", where=" (record 1)"),
        "json-deep": _file("p.json", "[" + dumps(text_rows[0]) + ",\n{\"x\": " + deep + "}]",
                           "nested more than", where=":2 (record 1)"),
        "json-not-utf8": _file("p.json", b'[{"text": "caf\xe9"}]', "not valid UTF-8"),
        # CSV
        "csv-unclosed-quote": _file("p.csv", 'prompt,completion\na,b\n"c,d\ne,f\ng,h\n',
                                    "never closed", "unclosed quote", where=":3"),
        "csv-unclosed-quote-last-column": _file(
            "p.csv", 'prompt,completion\na,b\nc,"d\ne,f\n', "never closed", where=":3"),
        "csv-text-after-quote": _file("p.csv", 'prompt,completion\na,b\n"c"x,d\n',
                                      "invalid CSV", where=":3"),
        "csv-too-many-cells": _file("p.csv", "prompt,completion\na,b\nc,d,e\n",
                                    "3 cells but the header has 2", where=":3"),
        "csv-duplicate-columns": _file("p.csv", "text,text\na,b\n", "duplicate column",
                                       where=":1"),
        "csv-nul-in-header": _file("p.csv", "te\x00xt\na\n", "a field name holds a NUL",
                                   where=":2"),
        "csv-nul-in-cell": _file("p.csv", "text\nthe cat\nthe\x00dog\n", "NUL character",
                                 where=":3"),
        "csv-not-utf8": _file("p.csv", b"text\nthe cat\ncaf\xe9\n", "not valid UTF-8",
                              where=":3"),
        "csv-conll-inside": _file("p.csv", conll, "tab-separated text", where=":1"),
        "csv-jsonl-inside": _file("p.csv", jsonl, "looks like JSON Lines",
                                  "because of the extension '.csv'", where=":1"),
        # CoNLL
        "conll-no-tag": _file("p.conll", "john\tB-X\nran\n", "expected 'token<TAB>tag'",
                              ner=True, where=":2"),
        "conll-empty-token": _file("p.conll", "john\tB-X\n\tO\n", "expected 'token<TAB>tag'",
                                   ner=True, where=":2"),
        "conll-nul": _file("p.conll", "john\tB-X\nr\x00n\tO\n", "NUL character", ner=True,
                           where=":1"),
        "conll-not-utf8": _file("p.conll", b"john\tB-X\n\nr\xffn\tO\n", "not valid UTF-8",
                                ner=True, where=":3"),
        "conll-csv-inside": _file("p.conll", "prompt,completion\na,b\n", "expected 'token",
                                  "because of the extension '.conll'", ner=True, where=":1"),
        # Parquet
        "parquet-not-parquet": _file("p.parquet", jsonl, "not a readable Parquet file"),
        "parquet-truncated": _truncated_parquet(text_rows),
        "parquet-timestamp-text": _table(
            "p.parquet", {"text": pa.array([datetime.datetime(2024, 1, 1)] * 3)},
            "column 'text' has Arrow type timestamp"),
        "parquet-date-completion": _table(
            "p.parquet", {"prompt": ["a", "b"], "completion": pa.array(
                [datetime.date(2024, 1, 1)] * 2)}, "column 'completion' has Arrow type date32"),
        "parquet-decimal-text": _table(
            "p.parquet", {"text": pa.array([decimal.Decimal("1.5")] * 2)},
            "column 'text' has Arrow type decimal"),
        "parquet-timestamp-id": _table(
            "p.parquet", {"id": pa.array([datetime.datetime(2024, 1, 1, 0, i) for i in range(2)]),
                          "text": ["a", "b"]}, "column 'id' has Arrow type timestamp"),
        "parquet-time-in-messages": _table(
            "p.parquet", {"messages": pa.array([[{"role": "user", "content":
                                                  datetime.time(1, 2)}]])},
            "column 'messages' has Arrow type"),
        "parquet-float-id": _table("p.parquet", {"id": [1.0, 2.0], "text": ["a", "b"]},
                                   "field 'id': expected a string or an integer",
                                   where=" (record 0)"),
        "parquet-bool-id": _table("p.parquet", {"id": [False, True], "text": ["a", "b"]},
                                  "field 'id': expected a string or an integer",
                                  where=" (record 0)"),
        # datasets folders
        "hf-timestamp-text": _table(
            "ds", {"text": pa.array([datetime.datetime(2024, 1, 1)] * 2)},
            "column 'text' has Arrow type timestamp"),
        "hf-missing-arrow-file": _hf_damaged("missing"),
        "hf-zero-rows": _hf_damaged("zero"),
        "hf-bad-state": _hf_damaged("state"),
        "hf-no-state": _hf_damaged("no-state"),
        "hf-dataset-dict": _hf_damaged("dict"),
        "hf-not-a-folder": _file("p.bin", jsonl, "format 'hf' expects a datasets",
                                 fmt="hf"),
    }
    return [Case(f"file-{name}", build, METHODS[i % 2]) for i, (name, build)
            in enumerate(cases.items())]


def _truncated_parquet(rows: list[dict[str, Any]]) -> Build:
    def build(tmp: Path, env: Env, mp: pytest.MonkeyPatch):
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp / "p.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return (["--pool", str(path), *env.task_args(False)],
                [str(path), "not a readable Parquet file"])
    return build


def _hf_damaged(how: str) -> Build:
    def build(tmp: Path, env: Env, mp: pytest.MonkeyPatch):
        import datasets

        datasets.disable_progress_bars()
        folder = tmp / "ds"
        rows = {"text": [] if how == "zero" else ["the cat", "the dog"]}
        features = datasets.Features({"text": datasets.Value("string")})
        ds = datasets.Dataset.from_dict(rows, features=features)
        if how == "dict":
            datasets.DatasetDict({"train": ds}).save_to_disk(str(folder))
            return (["--pool", str(folder), *env.task_args(False)],
                    [str(folder), "is a DatasetDict with splits ['train']"])
        ds.save_to_disk(str(folder))
        expected = {
            "missing": "state.json lists the data file 'data-00000-of-00001.arrow', which is "
                       "missing",
            "zero": "empty pool: no usable records",
            "state": "state.json is not a datasets state file",
            "no-state": "not a datasets save_to_disk folder (no state.json)",
        }[how]
        if how == "missing":
            (folder / "data-00000-of-00001.arrow").unlink()
        elif how == "state":
            (folder / "state.json").write_text('{"_data_files": 3}')
        elif how == "no-state":
            (folder / "state.json").unlink()
        return (["--pool", str(folder), *env.task_args(False)], [str(folder), expected])
    return build


# ---- broken paths

def path_cases() -> list[Case]:
    def empty(role: str) -> Build:
        def build(tmp, env, mp):
            pool = tmp / "good.jsonl"
            pool.write_text(_lines([{"text": "the cat"}, {"text": "the dog"}]))
            argv = ["--pool", str(pool), *env.task_args(False)]
            argv += [f"--{role}", ""]
            return argv, [f"an empty path was given as a {role} file"]
        return build

    def device(tmp, env, mp):
        return (["--pool", "/dev/null", "--format", "jsonl", *env.task_args(False)],
                ["/dev/null: is a character device, not a regular file"])

    def unreadable(tmp, env, mp):
        path = tmp / "locked.jsonl"
        path.write_text(_lines([{"text": "the cat"}]))
        path.chmod(0)
        if os.geteuid() == 0:  # root reads anything: make the open fail as it would
            real_open = open

            def fake_open(file, *args, **kwargs):
                if str(file) == str(path):
                    raise PermissionError(13, "Permission denied", str(path))
                return real_open(file, *args, **kwargs)

            mp.setattr(readers, "open", fake_open, raising=False)
        return (["--pool", str(path), *env.task_args(False)],
                [f"{path}: cannot read: Permission denied"])

    def symlink_loop(tmp, env, mp):
        path = tmp / "loop.jsonl"
        path.symlink_to(path)
        return (["--pool", str(path), *env.task_args(False)],
                [f"{path}: cannot read: Too many levels of symbolic links"])

    def name_too_long(tmp, env, mp):
        path = tmp / ("x" * 300 + ".jsonl")
        return (["--pool", str(path), *env.task_args(False)],
                [f"{path}: cannot read: File name too long"])

    def folder_as_file(tmp, env, mp):
        (tmp / "d").mkdir()
        return (["--pool", str(tmp / "d"), "--format", "jsonl", *env.task_args(False)],
                [f"{tmp / 'd'}: is a folder, but format 'jsonl' expects a file"])

    def given_twice(tmp, env, mp):
        pool = tmp / "p.jsonl"
        pool.write_text(_lines([{"text": "the cat"}, {"text": "the dog"}]))
        return (["--pool", str(pool), str(tmp / "." / "p.jsonl"), *env.task_args(False)],
                ["pool file given twice"])

    builds = {"empty-pool-path": empty("pool"), "empty-target-path": empty("target"),
              "character-device": device, "unreadable": unreadable,
              "symlink-loop": symlink_loop, "name-too-long": name_too_long,
              "folder-as-file": folder_as_file, "given-twice": given_twice}
    return [Case(f"path-{name}", b, METHODS[i % 2]) for i, (name, b) in enumerate(builds.items())]


# ---- broken options and output folders

def _argv(*args: str, expected: str, good: bool = True) -> Build:
    def build(tmp: Path, env: Env, mp: pytest.MonkeyPatch):
        pool = tmp / "good.jsonl"
        pool.write_text(_lines([{"text": _words(random.Random(i), 5)} for i in range(4)]))
        return ["--pool", str(pool), *env.task_args(False), *args], [expected]
    return build


def option_cases() -> list[Case]:
    cases: list[Case] = []
    dsir = {
        "num_buckets=1e999": "option num_buckets=inf: expected an integer",
        "num_buckets=-1e999": "option num_buckets=-inf: expected an integer",
        "num_buckets=true": "option num_buckets=True is not a number",
        "num_buckets=2.7": "option num_buckets=2.7: expected an integer",
        "num_buckets=many": "option num_buckets='many' is not a number",
        "num_buckets=0": "num_buckets must be from 1 to",
        "num_buckets=1000000000000000000000000": "expected an integer of at most 19 digits",
        "num_buckets=[3]": "option num_buckets=[3] is not a number",
        "ngrams=1000000000": "ngrams must be from 1 to",
        "ngrams=NaN": "option ngrams=nan: expected an integer",
        "smoothing=Infinity": "option smoothing=inf: expected a finite number",
        "smoothing=-Infinity": "option smoothing=-inf: expected a finite number",
        "smoothing=NaN": "option smoothing=nan: expected a finite number",
        "smoothing=1e999": "option smoothing=inf: expected a finite number",
        "smoothing=-1": "smoothing and floor must be >= 0",
        "floor=-1e-8": "smoothing and floor must be >= 0",
        "floor=0": "smoothing or floor must be > 0",  # with smoothing=0, the default
        "floor=Infinity": "option floor=inf: expected a finite number",
        "hashing=md5": "hashing must be one of sha256, blake2b",
        "smoothing=1e308": "smoothing 1e+308 is too large",
        "smoothing=false": "option smoothing=False is not a number",
        "normalize=maybe": "option normalize='maybe': expected true or false",
        "normalize=2": "option normalize=2: expected true or false",
        "normalize=-1": "option normalize=-1: expected true or false",
        "normalize=null": "option normalize=None: expected true or false",
        "sampling=sometimes": "sampling must be one of gumbel, top",
        "chunk_size=0": "chunk_size must be >= 1",
        "speed=9": "method 'dsir' has no option(s) speed; its options are: num_buckets",
    }
    for opt, expected in dsir.items():
        cases.append(Case(f"option-dsir-{opt}", _argv("-o", opt, expected=expected), "dsir"))
    common = {
        "random-unknown-option": (["-o", "speed=9"],
                                  "method 'random' takes no options (got 'speed')"),
        "seed-negative": (["--seed", "-1"], "--seed -1: expected an integer from 0 to"),
        "seed-too-large": (["--seed", str(2**32)], "expected an integer from 0 to 4294967295"),
        "seed-huge": (["--seed", str(2**70)], "expected an integer from 0 to 4294967295"),
        "budget-negative-percent": (["--budget", "-10%"], "budget -10%: must be positive"),
        "budget-negative": (["--budget", "-5"], "budget -5: must be positive"),
        "budget-zero": (["--budget", "0"], "budget 0: must be at least 1"),
        "budget-zero-percent": (["--budget", "0%"], "a percentage must be in (0, 100]"),
        "budget-over-100-percent": (["--budget", "101%"], "a percentage must be in (0, 100]"),
        "budget-word": (["--budget", "lots"], "expected a count like 500"),
        "budget-empty": (["--budget", ""], "expected a count like 500"),
        "budget-too-large": (["--budget", "5"], "budget 5 is larger than the pool"),
        "option-syntax": (["-o", "normalize"], "expected KEY=VALUE"),
        "max-length": (["--max-length", "0"], "max_length must be a positive integer"),
        "batch-size": (["--batch-size", "-3"], "batch size"),
        "empty-model": (["--model", ""], "--model is empty"),
    }
    for i, (name, (args, expected)) in enumerate(common.items()):
        method = "random" if name.startswith("random") else METHODS[i % 2]
        cases.append(Case(f"option-{name}", _argv(*args, expected=expected), method))
    return cases


def out_cases() -> list[Case]:
    def under_file(tmp, env, mp):
        (tmp / "afile").write_text("x")
        return _argv("--out", str(tmp / "afile" / "sub"),
                     expected=f"cannot create the folder: {tmp / 'afile'} is a file")(tmp, env, mp)

    def is_file(tmp, env, mp):
        (tmp / "out").write_text("x")
        return _argv(expected=f"--out {tmp / 'out'}: exists and is not a folder")(tmp, env, mp)

    def output_is_folder(name: str) -> Build:
        def build(tmp, env, mp):
            (tmp / "out" / name).mkdir(parents=True)
            return _argv(expected=f"{tmp / 'out' / name} is a folder")(tmp, env, mp)
        return build

    def work_is_file(tmp, env, mp):
        (tmp / "out").mkdir()
        (tmp / "out" / ".work").write_text("x")
        return _argv(expected=f"{tmp / 'out' / '.work'} is a file")(tmp, env, mp)

    builds: dict[str, tuple[Build, str]] = {
        "empty": (_argv("--out", "", expected="--out is empty"), "."),
        "under-a-file": (under_file, "afile/sub"),
        "is-a-file": (is_file, "out"),
        "in-proc": (_argv("--out", "/proc/finesift-fuzz/out",
                          expected="--out /proc/finesift-fuzz/out: cannot write in /proc"),
                    "out"),
        "in-sys": (_argv("--out", "/sys/finesift-fuzz",
                         expected="--out /sys/finesift-fuzz: cannot write in /sys"), "out"),
        "selected-is-folder": (output_is_folder("selected.jsonl"), "out"),
        "manifest-is-folder": (output_is_folder("manifest.json"), "out"),
        "scores-is-folder": (output_is_folder("scores.parquet"), "out"),
        "work-is-file": (work_is_file, "out"),
    }
    return [Case(f"out-{name}", b, METHODS[i % 2], out_dir=od)
            for i, (name, (b, od)) in enumerate(builds.items())]


CASES: list[Case] = record_cases() + file_cases() + path_cases() + option_cases() + out_cases()


# --------------------------------------------------------------------------- the tests


class CaseTimeout(BaseException):
    """A case ran past its time limit (not an OSError: finesift must not catch it)."""


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def on_alarm(signum: int, frame: Any) -> None:
        raise CaseTimeout(f"the case ran past its limit of {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_lm_dir: Path, tiny_ner_dir: Path) -> Env:
    folder = tmp_path_factory.mktemp("fuzz_targets")
    rng = random.Random(SEED)
    lm = folder / "target.jsonl"
    lm.write_text(_lines([{"id": f"t{i}", "text": _words(rng, 6)} for i in range(3)]))
    ner = folder / "target_ner.jsonl"
    ner.write_text(_lines([good_row("ner", i, rng) for i in range(3)]))
    return Env(lm, ner, tiny_lm_dir, tiny_ner_dir)


def run_select(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with time_limit(CASE_SECONDS):
        rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def check_refused(rc: int, out: str, err: str, expected: list[str], out_dir: Path) -> None:
    assert rc == 2, (rc, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err[-2000:]
    line = errors[0]
    assert line.startswith("finesift: error: ") and err.rstrip("\n").endswith(line), err
    for text in expected:
        assert text in line, (text, line)
    assert out == "", out
    for name in OUTPUTS:
        assert not (out_dir / name).is_file(), f"{out_dir / name} was left behind"


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 200, len(CASES)
    assert len({c.id for c in CASES}) == len(CASES)


def test_every_reader_has_a_fuzz_writer() -> None:
    """A new reader (format) must get a writer here, so that it is fuzzed too."""
    assert set(WRITERS) == set(readers.FORMATS)
    assert set(SHAPES) == set(readers.FORMATS)
    fuzzed = {fmt for c in CORRUPTIONS for fmt in c.formats}
    assert fuzzed == set(readers.FORMATS)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_refused(case: Case, env: Env, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # where an empty --out would write
    extra, expected = case.build(tmp_path, env, monkeypatch)
    out_dir = tmp_path / case.out_dir
    argv = ["select", "--method", case.method, "--out", str(tmp_path / "out"), "--budget",
            "2", "--no-progress", *extra]  # a later --out/--budget/--model/--target wins
    rc, out, err = run_select(argv, capsys)
    check_refused(rc, out, err, expected, out_dir)


@pytest.mark.parametrize("fmt", sorted(readers.FORMATS))
def test_clean_files_of_every_writer_are_accepted(fmt: str, env: Env, tmp_path: Path,
                                                  capsys) -> None:
    """The control: the generator's good rows, in every format and shape, select fine (so
    every refusal above is about the broken part)."""
    for shape in SHAPES[fmt]:
        rng = random.Random(f"{SEED}|clean|{fmt}|{shape}")
        rows = [good_row(shape, i, rng) for i in range(5)]
        path, _ = WRITERS[fmt](tmp_path / f"pool_{shape}", rows)
        out = tmp_path / f"out_{shape}"
        rc, _, err = run_select(["select", "--method", "dsir", "--pool", str(path), "--out",
                                 str(out), "--budget", "2", "--no-progress",
                                 *env.task_args(shape == "ner")], capsys)
        assert rc == 0, (shape, err)
        assert all((out / name).is_file() for name in OUTPUTS)


def test_a_chat_of_thousands_of_turns_is_read_in_linear_time(env: Env, tmp_path: Path,
                                                             capsys) -> None:
    """A chat of 6,000 turns (hours before: every reply's prefix was rendered) selects
    within the case limit; only the turns inside --max-length are located exactly."""
    msgs = []
    for i in range(3000):
        msgs += [{"role": "user", "content": f"the cat {i}"},
                 {"role": "assistant", "content": "the dog sat"}]
    pool = tmp_path / "long.jsonl"
    pool.write_text(_lines([{"id": "long", "messages": msgs},
                            {"id": "short", "messages": msgs[:2]}]))
    rc, _, err = run_select(["select", "--method", "random", "--pool", str(pool), "--out",
                             str(tmp_path / "out"), "--budget", "1", "--no-progress",
                             *env.task_args(False)], capsys)
    assert rc == 0, err


def test_a_failed_write_leaves_no_output_that_looks_whole(env: Env, tmp_path: Path,
                                                           monkeypatch, capsys) -> None:
    """A write that fails half-way (here selected.jsonl, as on a full disk) removes what
    the run wrote and the manifest of an earlier run."""
    import finesift.api

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # from an earlier run

    def full_disk(path, rows):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(finesift.api, "write_jsonl", full_disk)
    pool = tmp_path / "p.jsonl"
    pool.write_text(_lines([{"text": "the cat"}, {"text": "the dog"}]))
    rc, stdout, err = run_select(["select", "--method", "random", "--pool", str(pool), "--out",
                                  str(out), "--budget", "1", "--no-progress",
                                  *env.task_args(False)], capsys)
    expected = f"--out {out}: cannot write {out / 'selected.jsonl'}: No space left on device"
    check_refused(rc, stdout, err, [expected], out)
    assert not (out / "scores.parquet").exists()


def _finesift(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    code = "import sys; from finesift.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


@pytest.mark.parametrize("kind", ["named-pipe", "dev-zero"])
def test_streams_that_never_end_are_refused_in_a_subprocess(kind: str, env: Env,
                                                            tmp_path: Path) -> None:
    """A named pipe with no writer (opening it blocks forever) and /dev/zero (one endless
    line): refused before they are opened. In a subprocess, so that a regression ends in a
    timeout rather than a hung or out-of-memory test run."""
    if kind == "named-pipe":
        path = tmp_path / "pipe.jsonl"
        os.mkfifo(path)
        argv, expected = ["--pool", str(path)], f"{path}: is a named pipe (FIFO)"
    else:
        argv, expected = ["--pool", "/dev/zero", "--format", "jsonl"], \
            "/dev/zero: is a character device"
    out = tmp_path / "out"
    proc = _finesift(["select", "--method", "dsir", "--out", str(out), "--budget", "1",
                      "--no-progress", *env.task_args(False), *argv], timeout=240)
    check_refused(proc.returncode, proc.stdout, proc.stderr, [expected], out)
