"""Readers: turn JSONL, JSON, CSV, Parquet, ``datasets`` folders and CoNLL files into records.

Every reader yields raw rows (a dict per record, with its row and line); one function
(:func:`parse_record`) decides each row's shape, validates its fields and builds the
:class:`~finesift.data.records.Record`. A new format is therefore one new row reader.

Accepted record shapes (detected per record; one shape per file):

* ``chat``: ``messages`` = ``[{"role", "content"}, ...]`` (roles ``system``, ``user``,
  ``assistant``), or ShareGPT ``conversations`` = ``[{"from", "value"}, ...]`` (``human``
  -> user, ``gpt`` -> assistant).
* ``prompt_completion``: ``prompt`` + ``completion``; ``instruction`` (+ ``input``) +
  ``output`` (Alpaca); ``question`` + ``answer`` (GSM8K).
* ``text``: ``text``.
* ``ner``: ``tokens`` + ``tags`` (lists of strings of equal length); every CoNLL sentence.

A chat without any non-empty assistant reply has nothing to learn from: it is skipped
and counted in the optional :class:`ReadReport` rather than failing the whole file (real
ShareGPT dumps hold such conversations, often under the same id as a complete one).
"""

from __future__ import annotations

import base64
import csv
import datetime
import decimal
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finesift.data.records import Record
from finesift.errors import InputError, OptionError

FORMATS: tuple[str, ...] = ("jsonl", "json", "csv", "parquet", "hf", "conll")
"""Format names accepted by ``fmt``."""

EXTENSIONS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".conll": "conll",
    ".txt": "conll",
    ".tsv": "conll",
}
"""File extension -> format, used when ``fmt`` is not given (a folder is ``hf``)."""

_FMT_ALIASES = {"ndjson": "jsonl", "datasets": "hf", "arrow": "hf", "pq": "parquet"}

ACCEPTED_SHAPES = (
    "chat (messages: [{role, content}] or conversations: [{from, value}]), "
    "prompt_completion (prompt + completion, instruction [+ input] + output, "
    "or question + answer), text (text), ner (tokens + tags)"
)

_ROLE_MAP = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}

SKIP_NO_REPLY = "chat without a non-empty assistant reply"

_MAX_SKIPPED_IDS = 20


@dataclass
class ReadReport:
    """What reading kept and what it skipped (pass one in to collect the counts).

    Attributes:
        n_records: records returned.
        skipped: reason -> number of records skipped for it.
        skipped_ids: ids (or locations) of the first 20 skipped records.
    """

    n_records: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_ids: list[str] = field(default_factory=list)

    def skip(self, reason: str, record_id: str) -> None:
        """Count one skipped record.

        Args:
            reason: short human-readable reason, used as the key of ``skipped``.
            record_id: the record's id, kept if fewer than 20 ids are stored.
        """
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.skipped_ids) < _MAX_SKIPPED_IDS:
            self.skipped_ids.append(record_id)

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-serialisable dict."""
        return {
            "n_records": self.n_records,
            "skipped": dict(self.skipped),
            "skipped_ids": list(self.skipped_ids),
        }


# --------------------------------------------------------------------------- formats


def detect_format(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """The reader format for ``path``: ``fmt`` if given, else from the extension.

    Args:
        path: the input file, or a ``datasets`` ``save_to_disk`` folder.
        fmt: one of :data:`FORMATS` (or ``None`` to decide by the extension).

    Raises:
        OptionError: ``fmt`` is not a known format.
        InputError: no ``fmt`` and the extension is not one of :data:`EXTENSIONS`.
    """
    if fmt is not None:
        name = _FMT_ALIASES.get(fmt.lower(), fmt.lower())
        if name not in FORMATS:
            raise OptionError(f"unknown input format {fmt!r}; expected one of {', '.join(FORMATS)}")
        return name
    p = Path(path)
    if p.is_dir():
        return "hf"
    ext = p.suffix.lower()
    if ext in EXTENSIONS:
        return EXTENSIONS[ext]
    accepted = ", ".join(f"{e} ({f})" for e, f in EXTENSIONS.items())
    raise InputError(
        str(path),
        f"cannot tell the format from the extension {ext or '(none)'!r}; accepted: {accepted}, "
        "or a datasets save_to_disk folder; or pass the format explicitly "
        f"(one of {', '.join(FORMATS)})",
    )


def read_file(
    path: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    report: ReadReport | None = None,
) -> list[Record]:
    """Read one input file (or ``datasets`` folder) into validated records.

    Args:
        path: the file or folder; kept as given in ``Record.source`` and in default ids.
        fmt: the format (one of :data:`FORMATS`); ``None`` decides by the extension
            (``.jsonl``/``.ndjson``, ``.json``, ``.csv``, ``.parquet``,
            ``.conll``/``.txt``/``.tsv``; a folder is a ``save_to_disk`` dataset).
        report: if given, counts of kept and skipped records are added to it.

    Returns:
        The records in file order, all of one shape.

    Raises:
        InputError: the file is missing or unreadable, or a record is malformed (the
            message names the file and the line or record).
    """
    source = str(path)
    p = Path(path)
    if not p.exists():
        raise InputError(source, "file not found")
    name = detect_format(path, fmt)
    if name == "hf" and not p.is_dir():
        raise InputError(source, "format 'hf' expects a datasets save_to_disk folder")
    if name != "hf" and p.is_dir():
        raise InputError(source, f"is a folder, but format {name!r} expects a file")
    rows = _ROW_READERS[name](source)

    records: list[Record] = []
    first: tuple[str, str] | None = None  # (shape, where) of the file's first record
    for row, line, raw in rows:
        rec = parse_record(raw, source, row=row, line=line)
        if first is None:
            first = (rec.shape, rec.where)
        elif rec.shape != first[0]:
            raise rec.error(
                f"record shape {rec.shape!r} differs from the file's first record "
                f"({first[1]}: {first[0]!r}); a file must hold records of one shape"
            )
        if rec.shape == "chat" and not _has_reply(rec.messages or []):
            if report is not None:
                report.skip(SKIP_NO_REPLY, rec.id)
            continue
        records.append(rec)
    if report is not None:
        report.n_records += len(records)
    return records


def load_records(
    paths: list[str] | list[os.PathLike[str]],
    fmt: str | None = None,
    *,
    role: str = "pool",
    report: ReadReport | None = None,
) -> list[Record]:
    """Read several files into one list of records with unique ids.

    Args:
        paths: the input files or folders, read in order.
        fmt: the format of every file (``None``: each by its extension).
        role: what the files are (``"pool"`` or ``"target"``), used in error messages.
        report: if given, counts of kept and skipped records are added to it.

    Raises:
        OptionError: no paths given.
        InputError: a file is missing, given twice or malformed; no records at all
            (``"empty pool"``); or two records share an id (both locations named).
    """
    if not paths:
        raise OptionError(f"no {role} files given")
    seen_paths: dict[str, str] = {}
    for path in paths:
        if not Path(path).exists():
            raise InputError(str(path), f"{role} file not found")
        real = os.path.realpath(path)
        if real in seen_paths:
            raise InputError(str(path), f"{role} file given twice (also as {seen_paths[real]})")
        seen_paths[real] = str(path)

    local = ReadReport()
    records: list[Record] = []
    for path in paths:
        records.extend(read_file(path, fmt, report=local))
    if report is not None:
        report.n_records += local.n_records
        for reason, n in local.skipped.items():
            report.skipped[reason] = report.skipped.get(reason, 0) + n
        room = _MAX_SKIPPED_IDS - len(report.skipped_ids)
        report.skipped_ids.extend(local.skipped_ids[: max(room, 0)])

    names = ", ".join(str(p) for p in paths)
    if not records:
        detail = ""
        if local.skipped:
            detail = "; skipped: " + ", ".join(f"{n} {r}" for r, n in local.skipped.items())
        raise InputError(names, f"empty {role}: no usable records{detail}")

    by_id: dict[str, Record] = {}
    for rec in records:
        prev = by_id.get(rec.id)
        if prev is not None:
            raise rec.error(
                f"duplicate id {rec.id!r}: first at {prev.where}, again at {rec.where}"
            )
        by_id[rec.id] = rec
    return records


# --------------------------------------------------------------------------- records


def parse_record(raw: dict[str, Any], source: str, *, row: int, line: int | None) -> Record:
    """Detect a raw row's shape, validate its fields and build the record.

    Values that should be lists (``messages``, ``conversations``, ``tokens``, ``tags``)
    may also be JSON strings encoding them, as they must be in CSV.

    Args:
        raw: the row as read (a dict of field -> value); becomes ``Record.raw``.
        source: the file it came from, as given by the user.
        row: 0-based index of the record in the file.
        line: 1-based line number where the format has lines, else ``None``.

    Raises:
        InputError: unknown shape or a field of the wrong type.
    """
    loc = _Loc(source, row, line)
    present = {k for k, v in raw.items() if v is not None}
    rid = raw.get("id")
    if rid is None or rid == "":
        rec_id = f"{source}:{line if line is not None else row}"
    else:
        rec_id = str(rid)
    meta = {k: raw[k] for k in ("subtask", "domain") if raw.get(k) is not None}
    base: dict[str, Any] = {
        "id": rec_id, "source": source, "row": row, "line": line, "raw": raw, "meta": meta
    }

    if "messages" in present or "conversations" in present:
        key = "messages" if "messages" in present else "conversations"
        return Record(shape="chat", messages=_messages(raw[key], key, loc), **base)
    for p_key, c_key in (("prompt", "completion"), ("instruction", "output"),
                         ("question", "answer")):
        if p_key in present and c_key in present:
            prompt = _string(raw[p_key], p_key, loc)
            completion = _string(raw[c_key], c_key, loc)
            if p_key == "instruction" and raw.get("input") is not None:
                extra = _string(raw["input"], "input", loc)
                if extra.strip():
                    prompt = f"{prompt}\n\n{extra}"
            return Record(shape="prompt_completion", prompt=prompt, completion=completion, **base)
    tag_key = "tags" if "tags" in present else "ner_tags"
    if "tokens" in present and tag_key in present:
        tokens = _string_list(raw["tokens"], "tokens", loc)
        tags = _string_list(raw[tag_key], tag_key, loc)
        if len(tokens) != len(tags):
            raise loc.error(f"tokens has {len(tokens)} items but {tag_key} has {len(tags)}")
        return Record(shape="ner", tokens=tokens, tags=tags, **base)
    if "text" in present:
        return Record(shape="text", text=_string(raw["text"], "text", loc), **base)

    hint = ""
    for a, b in (("prompt", "completion"), ("instruction", "output"), ("question", "answer"),
                 ("tokens", "tags")):
        if (a in present) != (b in present):
            have, lack = (a, b) if a in present else (b, a)
            hint = f" (has {have!r} but no {lack!r})"
            break
    found = ", ".join(sorted(map(str, present))) or "none"
    raise loc.error(
        f"unknown record shape{hint}: fields found: {found}; expected one of: {ACCEPTED_SHAPES}"
    )


@dataclass
class _Loc:
    source: str
    row: int
    line: int | None

    def error(self, message: str) -> InputError:
        if self.line is not None:
            return InputError(self.source, message, line=self.line)
        return InputError(self.source, message, record=self.row)


def _has_reply(messages: list[dict[str, str]]) -> bool:
    return any(m["role"] == "assistant" and m["content"].strip() for m in messages)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _string(value: Any, name: str, loc: _Loc) -> str:
    if not isinstance(value, str):
        raise loc.error(f"field {name!r}: expected a string, got {_type_name(value)}")
    return value


def _decode_json_string(value: Any, name: str, loc: _Loc, expected: str) -> Any:
    """A string holding JSON (as list-valued fields are stored in CSV) -> its value."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        shown = value if len(value) <= 40 else value[:37] + "..."
        raise loc.error(
            f"field {name!r}: expected {expected} (or a JSON string encoding one), "
            f"got a string that is not JSON: {shown!r}"
        ) from None


def _string_list(value: Any, name: str, loc: _Loc) -> list[str]:
    value = _decode_json_string(value, name, loc, "a list of strings")
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise loc.error(f"field {name!r}: expected a list of strings, got {_type_name(value)}")
    for j, item in enumerate(value):
        if not isinstance(item, str):
            raise loc.error(f"field {name!r}[{j}]: expected a string, got {_type_name(item)}")
    return value


def _messages(value: Any, name: str, loc: _Loc) -> list[dict[str, str]]:
    value = _decode_json_string(value, name, loc, "a list of messages")
    if not isinstance(value, list):
        raise loc.error(f"field {name!r}: expected a list of messages, got {_type_name(value)}")
    out: list[dict[str, str]] = []
    for j, msg in enumerate(value):
        where = f"{name}[{j}]"
        if not isinstance(msg, dict):
            raise loc.error(
                f"field {where!r}: expected an object with role and content, "
                f"got {_type_name(msg)}"
            )
        role_key = "role" if "role" in msg else "from"
        content_key = "content" if "content" in msg else "value"
        if role_key not in msg or content_key not in msg:
            raise loc.error(
                f"field {where!r}: expected keys role and content (or from and value), "
                f"found {', '.join(map(str, msg)) or 'none'}"
            )
        role = msg[role_key]
        if not isinstance(role, str):
            raise loc.error(f"field {where}.{role_key}: expected a string, got {_type_name(role)}")
        mapped = _ROLE_MAP.get(role.strip().lower())
        if mapped is None:
            raise loc.error(
                f"field {where}.{role_key}: unknown role {role!r}; expected user, assistant "
                "or system (ShareGPT: human, gpt)"
            )
        content = msg[content_key]
        if not isinstance(content, str):
            raise loc.error(
                f"field {where}.{content_key}: expected a string, got {_type_name(content)}"
            )
        out.append({"role": mapped, "content": content})
    return out


# --------------------------------------------------------------------------- row readers

# A row reader yields (0-based row, 1-based line or None, raw dict).
_Rows = Iterator[tuple[int, int | None, dict[str, Any]]]


def _lines(source: str) -> Iterator[tuple[int, str]]:
    """The file's lines (1-based numbers, newline stripped), decoded as UTF-8."""
    with open(source, "rb") as f:
        for number, data in enumerate(f, start=1):
            if number == 1 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(source, f"not valid UTF-8 text: {e}", line=number) from None
            yield number, text.rstrip("\r\n")


def _read_jsonl(source: str) -> _Rows:
    row = 0
    for number, text in _lines(source):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(
                source, f"invalid JSON: {e.msg} (column {e.colno})", line=number
            ) from None
        if not isinstance(value, dict):
            raise InputError(
                source, f"expected a JSON object per line, got {_type_name(value)}", line=number
            )
        yield row, number, value
        row += 1


def _read_json(source: str) -> _Rows:
    data = Path(source).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(source, f"not valid UTF-8 text: {e}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ""
        if e.msg == "Extra data":
            hint = "; if this is JSON Lines (one object per line), name it .jsonl or use fmt='jsonl'"
        elif e.msg.startswith("Unterminated") or e.pos >= len(text.rstrip()):
            hint = "; the file ends early (truncated?)"
        raise InputError(
            source, f"invalid JSON: {e.msg} (column {e.colno}){hint}", line=e.lineno
        ) from None
    if isinstance(value, dict):
        lists = [k for k, v in value.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise InputError(
                source,
                "expected a JSON array of records, or an object with exactly one list-valued "
                f"key holding them; found an object with list-valued keys: {lists or 'none'}",
            )
        value = value[lists[0]]
    if not isinstance(value, list):
        raise InputError(source, f"expected a JSON array of records, got {_type_name(value)}")
    for row, item in enumerate(value):
        if not isinstance(item, dict):
            raise InputError(
                source, f"expected a JSON object, got {_type_name(item)}", record=row
            )
        yield row, None, item


def _read_csv(source: str) -> _Rows:
    old_limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with open(source, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            try:
                header = next(reader, None)
                if header is None:
                    return
                dupes = sorted({h for h in header if header.count(h) > 1})
                if dupes:
                    raise InputError(source, f"duplicate column names: {dupes}", line=1)
                row = 0
                prev = reader.line_num
                for cells in reader:
                    line = prev + 1
                    prev = reader.line_num
                    if not cells or all(c == "" for c in cells):
                        continue
                    if len(cells) > len(header):
                        raise InputError(
                            source,
                            f"{len(cells)} cells but the header has {len(header)} columns",
                            line=line,
                        )
                    yield row, line, dict(zip(header, cells))
                    row += 1
            except csv.Error as e:
                raise InputError(source, f"invalid CSV: {e}", line=reader.line_num) from None
            except UnicodeDecodeError as e:
                raise InputError(
                    source, f"not valid UTF-8 text: {e}", line=reader.line_num + 1
                ) from None
    finally:
        csv.field_size_limit(old_limit)


def _jsonable(value: Any) -> Any:
    """Make a value read from Arrow (numpy arrays, dates, bytes, ...) JSON-serialisable."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return None if np.isnan(value) else value  # NaN (a missing value) -> null
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(bytes(value)).decode("ascii")
    return str(value)


def _read_parquet(source: str) -> _Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(source)
    except (pa.ArrowException, OSError) as e:
        raise InputError(source, f"not a readable Parquet file: {e}") from None
    for row, item in enumerate(table.to_pylist()):
        yield row, None, _jsonable(item)


def _read_hf(source: str) -> _Rows:
    folder = Path(source)
    if (folder / "dataset_dict.json").exists():
        splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise InputError(
            source,
            f"is a DatasetDict with splits {splits}; give one split's folder, "
            f"e.g. {folder / (splits[0] if splits else 'train')}",
        )
    if not (folder / "state.json").exists():
        raise InputError(
            source,
            "is a folder but not a datasets save_to_disk folder (no state.json); "
            "accepted folders hold a Dataset saved with save_to_disk",
        )
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:  # noqa: BLE001 -- datasets raises many types for a damaged folder
        raise InputError(source, f"cannot load the datasets folder: {e}") from None
    if not isinstance(ds, datasets.Dataset):
        raise InputError(source, f"expected a Dataset, got {type(ds).__name__}")
    # Integer class labels (e.g. ner_tags in conll2003/wnut_17) -> their names.
    names: dict[str, list[str]] = {}
    for col, feat in ds.features.items():
        inner = getattr(feat, "feature", None)
        if isinstance(inner, datasets.ClassLabel):
            names[col] = list(inner.names)
    for row, item in enumerate(ds.to_list()):
        item = _jsonable(item)
        for col, labels in names.items():
            values = item.get(col)
            if isinstance(values, list):
                item[col] = [
                    labels[v] if isinstance(v, int) and 0 <= v < len(labels) else v
                    for v in values
                ]
        yield row, None, item


def _read_conll(source: str) -> _Rows:
    row = 0
    tokens: list[str] = []
    tags: list[str] = []
    start: int | None = None
    for number, text in _lines(source):
        if not text.strip():
            if tokens:
                yield row, start, {"tokens": tokens, "tags": tags}
                row += 1
            tokens, tags, start = [], [], None
            continue
        if text.startswith("-DOCSTART-"):
            continue
        parts = text.split("\t") if "\t" in text else text.split(" ")
        parts = [p.strip() for p in parts]
        if len(parts) < 2 or not parts[0] or not parts[-1]:
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise InputError(
                source,
                f"expected 'token<TAB>tag' (or 'token tag'), got {shown!r}",
                line=number,
            )
        if start is None:
            start = number
        tokens.append(parts[0])
        tags.append(parts[-1])
    if tokens:
        yield row, start, {"tokens": tokens, "tags": tags}


_ROW_READERS = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "parquet": _read_parquet,
    "hf": _read_hf,
    "conll": _read_conll,
}
