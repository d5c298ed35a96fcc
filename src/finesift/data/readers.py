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

Hostile or broken input is refused with an :class:`~finesift.errors.InputError` naming the
file and the line or record, never a traceback: character devices, named pipes and other
non-regular files (each input is read twice: records, then its sha256), unreadable files,
lines longer than 256 MiB, JSON nested more than :data:`MAX_DEPTH` levels, strings holding a
NUL character or a lone UTF-16 surrogate (anywhere in a record, field names too), ids that
are neither strings nor integers, chat messages mixing OpenAI (``role``/``content``) and
ShareGPT (``from``/``value``) keys, CSV quotes that are never closed, Arrow text columns of
timestamp, date or decimal type, binary text that is not UTF-8, and a file that looks like
another format than the one it is read as (the message says which format was assumed and
why).
"""

from __future__ import annotations

import base64
import csv
import datetime
import decimal
import itertools
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
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

_FORMAT_NAMES = {
    "jsonl": "JSON Lines",
    "json": "JSON",
    "csv": "CSV",
    "parquet": "Parquet",
    "hf": "a datasets save_to_disk folder",
    "conll": "CoNLL",
}

MAX_DEPTH = 100
"""Deepest nesting of lists and objects accepted in a record (the record itself is level 1)."""

MAX_LINE_BYTES = 256 << 20
"""Longest line accepted in a line-based file (JSONL, CSV, CoNLL): 256 MiB."""

# Fields a record's content, id or labels are read from: their values must be text.
_TEXT_FIELDS = frozenset({
    "id", "messages", "conversations", "prompt", "completion", "instruction", "input",
    "output", "question", "answer", "text", "tokens", "tags", "ner_tags",
})

_SURROGATE = re.compile("[\ud800-\udfff]")

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
    columns: dict[str, str] | None = None,
) -> list[Record]:
    """Read one input file (or ``datasets`` folder) into validated records.

    Args:
        path: the file or folder; kept as given in ``Record.source`` and in default ids.
        fmt: the format (one of :data:`FORMATS`); ``None`` decides by the extension
            (``.jsonl``/``.ndjson``, ``.json``, ``.csv``, ``.parquet``,
            ``.conll``/``.txt``/``.tsv``; a folder is a ``save_to_disk`` dataset).
        report: if given, counts of kept and skipped records are added to it.
        columns: the run's column mapping (:mod:`finesift.data.columns`), checked with
            :func:`~finesift.data.columns.parse_columns`.

    Returns:
        The records in file order, all of one shape.

    Raises:
        InputError: the file is missing or unreadable, or a record is malformed (the
            message names the file and the line or record).
    """
    source = str(path)
    if not source.strip():
        raise OptionError("an empty path was given as an input file")
    p = Path(path)
    info = _stat(source)
    if info is None:
        raise InputError(source, "file not found")
    name = detect_format(path, fmt)
    is_dir = stat.S_ISDIR(info.st_mode)
    if name == "hf" and not is_dir:
        raise InputError(source, "format 'hf' expects a datasets save_to_disk folder")
    if name != "hf" and is_dir:
        raise InputError(source, f"is a folder, but format {name!r} expects a file")
    if not is_dir and not stat.S_ISREG(info.st_mode):
        raise InputError(
            source,
            f"is a {_file_kind(info.st_mode)}, not a regular file; finesift reads every input "
            "twice (its records, then its sha256 for the manifest), so give a file on disk",
        )
    _check_readable(source, is_dir)
    if fmt is not None:
        how = f"read as {_FORMAT_NAMES[name]} because the format {fmt!r} was given"
    elif is_dir:
        how = f"read as {_FORMAT_NAMES[name]} because it is a folder"
    else:
        how = f"read as {_FORMAT_NAMES[name]} because of the extension {p.suffix.lower()!r}"
    rows = _ROW_READERS[name](source, how)
    try:
        return records_from_rows(rows, source, report=report, columns=columns)
    except MemoryError:
        raise InputError(source, f"too large to read into memory ({how})") from None
    except OSError as e:
        raise InputError(source, f"cannot read: {e.strerror or e}") from None


def records_from_rows(
    rows: Iterator[tuple[int, int | None, dict[str, Any]]],
    source: str,
    *,
    report: ReadReport | None = None,
    columns: dict[str, str] | None = None,
    origin: str | None = None,
) -> list[Record]:
    """One input's raw rows -> its validated records: the column mapping, then
    :func:`parse_record`; one shape per input; chats without a reply skipped (counted in
    ``report``). Each record's ``raw`` is its row exactly as read (before the mapping).

    Args:
        rows: ``(row, line, raw)`` per record, as a row reader yields them.
        source: the file (or in-memory source name) the rows come from.
        report: if given, counts of kept and skipped records are added to it.
        columns: the column mapping (``{field: column}``), if any.
        origin: an in-memory input's description for error messages (see
            :func:`parse_record`).

    Raises:
        InputError: a row lacks a mapped column, is malformed or of another shape than
            the first.
    """
    from finesift.data.columns import map_row

    records: list[Record] = []
    first: tuple[str, str] | None = None  # (shape, where) of the input's first record
    what = "the input's" if origin is not None else "the file's"
    for row, line, raw in rows:
        mapped = raw
        if columns:
            loc = _Loc(source, row, line, origin)
            mapped = map_row(raw, columns, loc.error)
            if mapped is not raw:  # the fields the mapping replaced are written back too
                _check_values(raw, loc)
        rec = parse_record(mapped, source, row=row, line=line, origin=origin)
        rec.raw = raw
        if first is None:
            first = (rec.shape, rec.where)
        elif rec.shape != first[0]:
            raise rec.error(
                f"record shape {rec.shape!r} differs from {what} first record "
                f"({first[1]}: {first[0]!r}); {'an input' if origin else 'a file'} must "
                "hold records of one shape"
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
    paths: Sequence[Any],
    fmt: str | None = None,
    *,
    role: str = "pool",
    report: ReadReport | None = None,
    columns: dict[str, str] | None = None,
) -> list[Record]:
    """Read several files into one list of records with unique ids.

    Args:
        paths: the input files or folders, read in order; in-memory inputs
            (:class:`finesift.data.memory.MemorySource`, made by
            :func:`finesift.data.memory.resolve_inputs`) may stand among them.
        fmt: the format of every file (``None``: each by its extension).
        role: what the files are (``"pool"`` or ``"target"``), used in error messages.
        report: if given, counts of kept and skipped records are added to it.
        columns: the column mapping every input is read through (``{field: column}``,
            :mod:`finesift.data.columns`).

    Raises:
        OptionError: no paths given.
        InputError: a file is missing, given twice or malformed; no records at all
            (``"empty pool"``); or two records share an id (both locations named).
    """
    if not paths:
        raise OptionError(f"no {role} files given")
    seen_paths: dict[str, str] = {}
    for path in paths:
        if hasattr(path, "read_records"):  # an in-memory input
            continue
        if not str(path).strip():
            raise OptionError(
                f"an empty path was given as a {role} file (it would be read as the current "
                "folder); give a file or a datasets folder"
            )
        if _stat(str(path)) is None:
            raise InputError(str(path), f"{role} file not found")
        real = os.path.realpath(path)
        if real in seen_paths:
            raise InputError(str(path), f"{role} file given twice (also as {seen_paths[real]})")
        seen_paths[real] = str(path)

    local = ReadReport()
    records: list[Record] = []
    for path in paths:
        if hasattr(path, "read_records"):
            records.extend(path.read_records(report=local, columns=columns))
        else:
            records.extend(read_file(path, fmt, report=local, columns=columns))
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


def parse_record(raw: dict[str, Any], source: str, *, row: int, line: int | None,
                 origin: str | None = None) -> Record:
    """Detect a raw row's shape, validate its fields and build the record.

    Values that should be lists (``messages``, ``conversations``, ``tokens``, ``tags``)
    may also be JSON strings encoding them, as they must be in CSV.

    Args:
        raw: the row as read (a dict of field -> value); becomes ``Record.raw``.
        source: the file it came from, as given by the user (an in-memory input: its
            source name, :mod:`finesift.data.memory`).
        row: 0-based index of the record in the file.
        line: 1-based line number where the format has lines, else ``None``.
        origin: an in-memory input's description for error messages
            (``"pool[0] (datasets.Dataset)"``: errors then say ``... row 17: ...``).

    Raises:
        InputError: unknown shape or a field of the wrong type.
    """
    loc = _Loc(source, row, line, origin)
    _check_values(raw, loc)
    present = {k for k, v in raw.items() if v is not None}
    rid = raw.get("id")
    if rid is None or rid == "":
        rec_id = f"{source}:{line if line is not None else row}"
    elif isinstance(rid, str) or (isinstance(rid, int) and not isinstance(rid, bool)):
        rec_id = str(rid)
    else:
        shown = json.dumps(rid, ensure_ascii=False, default=str)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise loc.error(
            f"field 'id': expected a string or an integer, got {_type_name(rid)} {shown}"
            + (" (an integer column with missing values read as floats?)"
               if isinstance(rid, float) else "")
        )
    meta = {k: raw[k] for k in ("subtask", "domain") if raw.get(k) is not None}
    base: dict[str, Any] = {
        "id": rec_id, "source": source, "row": row, "line": line, "raw": raw, "meta": meta,
        "origin": origin,
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
    origin: str | None = None  # an in-memory input: how errors name it ("pool[0] (...)")

    def error(self, message: str) -> InputError:
        if self.origin is not None:
            return InputError(f"{self.origin} row {self.row}", message)
        if self.line is not None:
            return InputError(self.source, message, line=self.line)
        return InputError(self.source, message, record=self.row)


def _stat(source: str) -> os.stat_result | None:
    """``os.stat`` of an input, or ``None`` where there is nothing (or no usable path)."""
    try:
        return os.stat(source)
    except (OSError, ValueError) as e:
        if isinstance(e, OSError) and e.errno not in (None, 2, 20):  # not ENOENT/ENOTDIR
            raise InputError(source, f"cannot read: {e.strerror or e}") from None
        return None


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"


def _check_readable(source: str, is_dir: bool) -> None:
    """An :class:`InputError` now, rather than an ``OSError`` while reading or hashing."""
    try:
        if is_dir:
            os.listdir(source)
        else:
            with open(source, "rb") as f:
                f.read(1)
    except OSError as e:
        raise InputError(source, f"cannot read: {e.strerror or e}") from None


def _text_problem(text: str) -> str | None:
    """Why a string cannot be used as text (a NUL or a lone surrogate), or ``None``."""
    nul = text.find("\x00")
    if nul >= 0:
        return f"holds a NUL character (\\x00) at character {nul} (binary data?)"
    if not text.isascii():
        m = _SURROGATE.search(text)
        if m is not None:
            return (f"holds a lone UTF-16 surrogate {m.group()!r} at character {m.start()}, "
                    "which is not valid Unicode text")
    return None


def _looks_fine(raw: dict[str, Any]) -> bool:
    """The fast path of :func:`_check_values`: one walk gathers every string (field names
    too) and checks the nesting depth, then one C-speed check of them all for a NUL or a
    lone surrogate. ``False`` also where unsure; the slow walk then decides."""
    strings: list[str] = []
    stack: list[tuple[Any, int]] = [(raw, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return False
        if isinstance(value, dict):
            strings.extend(value)
            items = value.values()
        else:
            items = value
        for v in items:
            if isinstance(v, str):
                strings.append(v)
            elif isinstance(v, (dict, list, tuple)):
                stack.append((v, depth + 1))
    try:
        text = "".join(strings)
    except TypeError:  # a field name that is not a string
        return False
    if "\x00" in text:
        return False
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate
            return False
    return True


def _check_values(raw: dict[str, Any], loc: _Loc) -> None:
    """Refuse strings that are not text and nesting deeper than :data:`MAX_DEPTH`, anywhere
    in the record (every field is written back to ``selected.jsonl``). Iterative, so a
    deep record cannot exhaust the stack."""
    if _looks_fine(raw):
        return
    stack: list[tuple[Any, str, str, int]] = [(raw, "", "", 1)]
    while stack:
        value, path, top, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise loc.error(
                f"field {top!r} is nested more than {MAX_DEPTH} levels deep; records must be "
                "flatter than that"
            )
        if isinstance(value, dict):
            items = value.items()
        else:
            items = enumerate(value)
        for key, item in items:
            if isinstance(key, str):
                sub = f"{path}.{key}" if path else key
                problem = _text_problem(key)
                if problem is not None:
                    raise loc.error(f"a field name {'in ' + repr(path) + ' ' if path else ''}"
                                    f"{problem}")
            else:
                sub = f"{path}[{key}]"
            if isinstance(item, str):
                problem = _text_problem(item)
                if problem is not None:
                    raise loc.error(f"field {sub!r} {problem}")
            elif isinstance(item, (dict, list, tuple)):
                stack.append((item, sub, top or sub, depth + 1))


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
        decoded = json.loads(value)
    except RecursionError:
        raise loc.error(f"field {name!r}: its JSON is nested more than {MAX_DEPTH} levels "
                        "deep") from None
    except json.JSONDecodeError:
        shown = value if len(value) <= 40 else value[:37] + "..."
        raise loc.error(
            f"field {name!r}: expected {expected} (or a JSON string encoding one), "
            f"got a string that is not JSON: {shown!r}"
        ) from None
    _check_values({name: decoded}, loc)  # escapes may decode to NULs or lone surrogates
    return decoded


def _string_list(value: Any, name: str, loc: _Loc) -> list[str]:
    value = _decode_json_string(value, name, loc, "a list of strings")
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise loc.error(f"field {name!r}: expected a list of strings, got {_type_name(value)}")
    for j, item in enumerate(value):
        if not isinstance(item, str):
            raise loc.error(f"field '{name}[{j}]': expected a string, got {_type_name(item)}")
    return value


def _messages(value: Any, name: str, loc: _Loc) -> list[dict[str, str]]:
    value = _decode_json_string(value, name, loc, "a list of messages")
    if not isinstance(value, list):
        raise loc.error(f"field {name!r}: expected a list of messages, got {_type_name(value)}")
    out: list[dict[str, str]] = []
    style: tuple[str, str, str] | None = None  # (role key, content key, first message)
    for j, msg in enumerate(value):
        where = f"{name}[{j}]"
        if not isinstance(msg, dict):
            raise loc.error(
                f"field {where!r}: expected an object with role and content, "
                f"got {_type_name(msg)}"
            )
        if None in msg.values():  # keys holding null are absent (Arrow gives every
            msg = {k: v for k, v in msg.items() if v is not None}  # message every key)
        for a, b in (("role", "from"), ("content", "value")):
            if a in msg and b in msg:
                raise loc.error(
                    f"field {where!r}: has both {a!r} and {b!r}; a message has role and "
                    "content (OpenAI) or from and value (ShareGPT)"
                )
        role_key = "role" if "role" in msg else "from"
        content_key = "content" if "content" in msg else "value"
        if role_key not in msg or content_key not in msg:
            raise loc.error(
                f"field {where!r}: expected keys role and content (or from and value), "
                f"found {', '.join(map(str, msg)) or 'none'}"
            )
        if (role_key, content_key) in (("role", "value"), ("from", "content")):
            raise loc.error(
                f"field {where!r}: mixes key styles ({role_key!r} with {content_key!r}); "
                "use role and content (OpenAI) or from and value (ShareGPT)"
            )
        if style is None:
            style = (role_key, content_key, where)
        elif style[:2] != (role_key, content_key):
            raise loc.error(
                f"field {where!r}: uses {role_key}/{content_key} but {style[2]} uses "
                f"{style[0]}/{style[1]}; one conversation uses one key style"
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

# A row reader takes the file and how it was chosen (``"read as CSV because of the
# extension '.csv'"``, said in errors where the file may be of another format) and yields
# (0-based row, 1-based line or None, raw dict).
_Rows = Iterator[tuple[int, int | None, dict[str, Any]]]


def _looks_like_json(text: str) -> str | None:
    """What a line holding a whole JSON object or array looks like, else ``None``."""
    text = text.strip()
    if not text.startswith(("{", "[")):
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, dict):
        return "JSON Lines (a JSON object per line)"
    if isinstance(value, list):
        return "a JSON array"
    return None


_FORMAT_HINTS = {
    "JSON Lines (a JSON object per line)": "name it .jsonl or give the format jsonl",
    "a JSON array": "name it .json or give the format json",
}


def _binary_lines(source: str, how: str) -> Iterator[tuple[int, bytes]]:
    """The file's lines as bytes (1-based numbers, BOM of the first line dropped), each at
    most :data:`MAX_LINE_BYTES` long."""
    with open(source, "rb") as f:
        number = 0
        while True:
            data = f.readline(MAX_LINE_BYTES + 1)
            if not data:
                return
            number += 1
            if len(data) > MAX_LINE_BYTES:
                raise InputError(
                    source, f"line longer than {MAX_LINE_BYTES >> 20} MiB ({how}); is this a "
                    "text file?", line=number)
            if number == 1 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            yield number, data


def _lines(source: str, how: str) -> Iterator[tuple[int, str]]:
    """The file's lines (1-based numbers, newline stripped), decoded as UTF-8."""
    for number, data in _binary_lines(source, how):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(
                source, f"not valid UTF-8 text: {e} ({how}; a binary file?)", line=number
            ) from None
        yield number, text.rstrip("\r\n")


def _nesting_position(text: str) -> tuple[int, int, int | None]:
    """Where JSON ``text`` first nests deeper than :data:`MAX_DEPTH`: (line, column, index
    of the top-level array item it is in, if the text is an array)."""
    depth, line, line_start, item = 0, 1, 0, -1
    for m in re.finditer(r'"(?:[^"\\\n]|\\.)*"|[\[\]{}\n]', text):
        tok = m.group()
        if tok == "\n":
            line, line_start = line + 1, m.end()
        elif tok in "[{":
            depth += 1
            if depth == 2:
                item += 1
            if depth > MAX_DEPTH:
                is_array = text.lstrip("\ufeff \t\r\n").startswith("[")
                return line, m.start() - line_start + 1, item if is_array and item >= 0 else None
        elif tok in "]}":
            depth -= 1
    return line, 1, None


def _too_deep(col: int) -> str:
    return (f"JSON nested more than {MAX_DEPTH} levels deep (at column {col}); records must "
            "be flatter than that")


def _read_jsonl(source: str, how: str) -> _Rows:
    row = 0
    for number, text in _lines(source, how):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except RecursionError:
            _, col, _ = _nesting_position(text)
            raise InputError(source, _too_deep(col), line=number) from None
        except json.JSONDecodeError as e:
            hint = f"; {how}"
            if row == 0:
                if text.lstrip().startswith("["):
                    hint += "; it starts like a JSON array: name it .json or give the format json"
                elif "," in text or "\t" in text:
                    hint += "; it looks like CSV or tab-separated text, not JSON"
            raise InputError(
                source, f"invalid JSON: {e.msg} (column {e.colno}){hint}", line=number
            ) from None
        if not isinstance(value, dict):
            hint = ""
            if isinstance(value, list) and row == 0:
                hint = f" ({how}; a JSON array holding records needs .json or the format json)"
            raise InputError(
                source,
                f"expected a JSON object per line, got {_type_name(value)}{hint}",
                line=number,
            )
        yield row, number, value
        row += 1


def _read_json(source: str, how: str) -> _Rows:
    data = Path(source).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(source, f"not valid UTF-8 text: {e} ({how}; a binary file?)") from None
    try:
        value = json.loads(text)
    except RecursionError:
        line, col, item = _nesting_position(text)
        raise InputError(source, _too_deep(col), line=line, record=item) from None
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


def _csv_lines(source: str, how: str, counter: list[int]) -> Iterator[str]:
    """The file's lines for :mod:`csv`, ends kept, split at ``\\n``, ``\\r\\n`` and ``\\r``
    as in text mode, each decoded on its own so that bad UTF-8 is reported at its line;
    ``counter[0]`` is the number of the line last yielded."""
    for _, data in _binary_lines(source, how):
        for piece in data.splitlines(keepends=True):
            counter[0] += 1
            try:
                yield piece.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(source, f"not valid UTF-8 text: {e} ({how}; a binary file?)",
                                 line=counter[0]) from None


def _read_csv(source: str, how: str) -> _Rows:
    old_limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        yield from _csv_rows(source, how)
    finally:
        csv.field_size_limit(old_limit)


def _csv_rows(source: str, how: str) -> _Rows:
    lines = _csv_lines(source, how, [0])
    first_line = next(lines, None)
    if first_line is None:
        return
    # strict: a quote that is never closed, or text after a closing quote, is an error
    # rather than a field that swallows the rest of the file
    reader = csv.reader(itertools.chain([first_line], lines), strict=True)
    start = 1  # the first line of the record being read
    try:
        header = next(reader, None)
        if header is None:
            return
        seen = _looks_like_json(first_line)
        if seen is not None:
            raise InputError(
                source,
                f"the first line looks like {seen}, not a CSV header ({how}); "
                f"{_FORMAT_HINTS[seen]}",
                line=1,
            )
        if len(header) == 1 and "\t" in header[0]:
            raise InputError(
                source,
                "the header is one column holding tabs: this looks like tab-separated text "
                f"(CoNLL 'token<TAB>tag'?), not CSV ({how})",
                line=1,
            )
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise InputError(source, f"duplicate column names: {dupes}", line=1)
        row = 0
        prev = reader.line_num
        start = prev + 1
        for cells in reader:
            line = prev + 1
            prev = reader.line_num
            start = prev + 1
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
        if "unexpected end of data" in str(e):
            raise InputError(
                source,
                "invalid CSV: a quoted field opened in the record starting on this line is "
                f"never closed (the file ends inside it, at line {reader.line_num}); an "
                "unclosed quote?",
                line=start,
            ) from None
        raise InputError(source, f"invalid CSV: {e}", line=reader.line_num) from None


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


def _arrow_leaves(t: Any) -> Iterator[Any]:
    """The leaf types of an Arrow type (through lists, structs, maps, dictionaries)."""
    import pyarrow as pa

    stack = [t]
    while stack:
        t = stack.pop()
        if isinstance(t, pa.DictionaryType):
            stack.append(t.value_type)
        elif isinstance(t, pa.MapType):
            stack += [t.key_type, t.item_type]
        elif pa.types.is_struct(t):
            stack += [t.field(i).type for i in range(t.num_fields)]
        elif hasattr(t, "value_type"):  # list, large list, fixed-size list, list view
            stack.append(t.value_type)
        else:
            yield t


def _is_binary(t: Any) -> bool:
    import pyarrow as pa

    checks = ("is_binary", "is_large_binary", "is_fixed_size_binary", "is_binary_view")
    return any(getattr(pa.types, name, lambda _: False)(t) for name in checks)


def _text_columns(schema: Any, source: str) -> list[str]:
    """Check the Arrow columns that hold a record's text: refuse temporal and decimal
    types (they would be turned into text silently) and return the columns that hold
    binary values (checked value by value: they must be UTF-8)."""
    import pyarrow as pa

    binary: list[str] = []
    for fld in schema:
        if fld.name not in _TEXT_FIELDS:
            continue
        for leaf in _arrow_leaves(fld.type):
            if pa.types.is_temporal(leaf) or pa.types.is_decimal(leaf):
                raise InputError(
                    source,
                    f"column {fld.name!r} has Arrow type {fld.type}; a record's text, id and "
                    "tags must be strings (convert the column to strings first)",
                )
            if _is_binary(leaf) and fld.name not in binary:
                binary.append(fld.name)
    return binary


def _check_binary(value: Any, name: str, source: str, row: int,
                  origin: str | None = None) -> None:
    """Every bytes value inside ``value`` must be UTF-8 text."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, (bytes, bytearray)):
            try:
                bytes(v).decode("utf-8")
            except UnicodeDecodeError as e:
                raise _Loc(source, row, None, origin).error(
                    f"field {name!r}: binary data that is not UTF-8 text ({e.reason} "
                    f"at byte {e.start})") from None
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)


def _arrow_rows(rows: Iterator[dict[str, Any]], binary: list[str], source: str,
                origin: str | None = None) -> _Rows:
    for row, item in enumerate(rows):
        for col in binary:
            _check_binary(item.get(col), col, source, row, origin)
        yield row, None, _jsonable(item)


def arrow_table_rows(table: Any, source: str, origin: str | None = None) -> _Rows:
    """The rows of a pyarrow Table, checked as a Parquet file's are (text columns of
    temporal or decimal type refused, binary ones must be UTF-8); errors name ``origin``
    (an in-memory input) if given, else ``source``."""
    binary = _text_columns(table.schema, origin or source)
    yield from _arrow_rows(iter(table.to_pylist()), binary, source, origin)


def dataset_rows(ds: Any, source: str, origin: str | None = None) -> _Rows:
    """The rows of a ``datasets.Dataset`` (its indices and format applied), checked as a
    Parquet file's are; integer class labels (``ner_tags`` of conll2003, wnut_17) become
    their names. Errors name ``origin`` (an in-memory input) if given, else ``source``."""
    import datasets

    binary = _text_columns(ds.data.schema, origin or source)
    names: dict[str, list[str]] = {}
    for col, feat in ds.features.items():
        inner = getattr(feat, "feature", None)
        if isinstance(inner, datasets.ClassLabel):
            names[col] = list(inner.names)
    for row, line, item in _arrow_rows(iter(ds.to_list()), binary, source, origin):
        for col, labels in names.items():
            values = item.get(col)
            if isinstance(values, list):
                item[col] = [
                    labels[v] if isinstance(v, int) and 0 <= v < len(labels) else v
                    for v in values
                ]
        yield row, line, item


def _read_parquet(source: str, how: str) -> _Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(source)
    except (pa.ArrowException, OSError) as e:
        raise InputError(source, f"not a readable Parquet file ({how}): {e}") from None
    yield from arrow_table_rows(table, source)


def _read_hf(source: str, how: str) -> _Rows:
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
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        files = [d["filename"] for d in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(source, f"state.json is not a datasets state file: {e}") from None
    if not files:  # save_to_disk of a Dataset without rows writes no data file
        return
    for name in files:
        if not isinstance(name, str) or not (folder / name).is_file():
            raise InputError(
                source,
                f"state.json lists the data file {name!r}, which is missing from the folder "
                "(an incomplete copy of a save_to_disk folder?)",
            )
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:  # noqa: BLE001 -- datasets raises many types for a damaged folder
        raise InputError(source, f"cannot load the datasets folder: {e}") from None
    if not isinstance(ds, datasets.Dataset):
        raise InputError(source, f"expected a Dataset, got {type(ds).__name__}")
    yield from dataset_rows(ds, source)


def _read_conll(source: str, how: str) -> _Rows:
    row = 0
    tokens: list[str] = []
    tags: list[str] = []
    start: int | None = None
    for number, text in _lines(source, how):
        if not text.strip():
            if tokens:
                yield row, start, {"tokens": tokens, "tags": tags}
                row += 1
            tokens, tags, start = [], [], None
            continue
        if text.startswith("-DOCSTART-"):
            continue
        seen = _looks_like_json(text)
        if seen is not None:
            raise InputError(
                source,
                f"this line looks like {seen}, not CoNLL 'token<TAB>tag' ({how}); "
                f"{_FORMAT_HINTS[seen]}",
                line=number,
            )
        parts = text.split("\t") if "\t" in text else text.split(" ")
        parts = [p.strip() for p in parts]
        if len(parts) < 2 or not parts[0] or not parts[-1]:
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise InputError(
                source,
                f"expected 'token<TAB>tag' (or 'token tag'), got {shown!r} ({how})",
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


def register_reader(name: str, extensions: Sequence[str],
                    read: Callable[[str, str], Iterator[tuple[int, int | None, dict[str, Any]]]]
                    ) -> None:
    """Add an input format: ``read(path, how)`` yields ``(row, line, raw record)`` per
    record (``line`` 1-based, or ``None`` where the format has no lines; ``how`` says how
    the format was chosen, for error messages). Files with one of ``extensions`` are read
    with it; ``fmt=name`` chooses it for any file. The record shapes are then recognised
    from the fields as for every other format."""
    global FORMATS
    _ROW_READERS[name] = read
    _FORMAT_NAMES.setdefault(name, name)
    if name not in FORMATS:
        FORMATS = (*FORMATS, name)
    for ext in extensions:
        EXTENSIONS[(ext if ext.startswith(".") else f".{ext}").lower()] = name

