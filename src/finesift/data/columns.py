"""Column mapping: read records whose fields are named otherwise (``--columns``).

``columns={"prompt": "query", "completion": "answer"}`` (``--columns
prompt=query,completion=answer``, ``columns:`` in a run's YAML) reads each row's ``query``
as its ``prompt`` and its ``answer`` as its ``completion``, before the row's shape is
recognised (:func:`finesift.data.readers.parse_record`); every input of the run, pool and
target, files and in-memory data, is read through the same mapping. The mapped source
columns are taken out of the row the shape is recognised from (so an unmapped
``question`` + ``answer`` pair cannot win over the mapped ``prompt``), a mapped column
wins over a column that already has the field's name, and the row's other fields stay;
``selected.jsonl`` keeps the rows exactly as they were read.

An input that has neither the mapped column nor the field itself is an error naming the
column, the input (and row) and the columns it has; an input that already has the field
under finesift's own name and not the mapped column is read as it is (a pool and a target
often name their columns differently).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from finesift.errors import InputError, OptionError

FIELDS: tuple[str, ...] = (
    "id", "messages", "conversations", "prompt", "completion", "instruction", "input",
    "output", "question", "answer", "text", "tokens", "tags", "ner_tags", "subtask", "domain",
)
"""The record fields a column can be mapped onto (see the shapes in
:mod:`finesift.data.readers`)."""


def parse_columns(value: Any) -> dict[str, str]:
    """The mapping ``finesift field -> the data's column``, checked.

    Args:
        value: ``None`` (no mapping), a mapping ``{"prompt": "query", ...}``, a string
            ``"prompt=query,completion=answer"`` (as ``--columns`` takes it) or a list of
            ``"field=column"`` strings.

    Raises:
        OptionError: a field finesift does not read, an empty column name, a field given
            twice or a value that is not a mapping.
    """
    if value is None or value == "" or value == {} or value == []:
        return {}
    pairs: list[tuple[Any, Any]]
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, str) or (isinstance(value, (list, tuple))
                                    and all(isinstance(v, str) for v in value)):
        items = value.split(",") if isinstance(value, str) else [
            part for v in value for part in v.split(",")]
        pairs = []
        for item in items:
            if not item.strip():
                continue
            if "=" not in item:
                raise OptionError(f"--columns {item.strip()!r}: expected FIELD=COLUMN, e.g. "
                                  "--columns prompt=query,completion=answer")
            field, column = item.split("=", 1)
            pairs.append((field.strip(), column.strip()))
    else:
        raise OptionError(f"--columns: expected a mapping of finesift fields to your column "
                          f"names, e.g. {{'prompt': 'query'}}; got {type(value).__name__}")
    out: dict[str, str] = {}
    for field, column in pairs:
        if field not in FIELDS:
            raise OptionError(f"--columns {field}={column}: {field!r} is not a field finesift "
                              f"reads; map onto one of: {', '.join(FIELDS)}")
        if not isinstance(column, str) or not column.strip():
            raise OptionError(f"--columns {field}=...: expected a column name, got {column!r}")
        if field in out:
            raise OptionError(f"--columns: {field!r} is mapped twice ({out[field]!r} and "
                              f"{column!r})")
        out[field] = column
    return out


def shown(columns: Mapping[str, str]) -> str:
    """The mapping as ``--columns`` writes it."""
    return ",".join(f"{f}={c}" for f, c in columns.items())


def missing(columns: Mapping[str, str], names: Iterable[str]) -> list[tuple[str, str]]:
    """The ``(field, column)`` pairs of ``columns`` that an input with these column or field
    ``names`` can satisfy neither through the column nor by having the field itself."""
    have = set(names)
    return [(f, c) for f, c in columns.items() if c not in have and f not in have]


def missing_message(columns: Mapping[str, str], names: Iterable[str],
                    lacking: list[tuple[str, str]], what: str) -> str:
    """The error for an input (``what``: ``"record"``, ``"data"``) that lacks mapped
    columns, naming them and the columns it has."""
    names = list(names)
    first = ", ".join(f"{c!r} (for {f})" for f, c in lacking)
    return (f"--columns {shown(columns)}: the {what} has no column {first}; its columns: "
            f"{', '.join(map(str, names)) or 'none'}")


def check_names(columns: Mapping[str, str], names: Iterable[str], source: str) -> None:
    """Raise an :class:`InputError` naming ``source`` unless an input with these column
    ``names`` (a table's schema) has every mapped column (or the field itself)."""
    names = list(names)
    lacking = missing(columns, names)
    if lacking:
        raise InputError(source, missing_message(columns, names, lacking, "data"))


def map_row(raw: dict[str, Any], columns: Mapping[str, str],
            error: Callable[[str], Exception]) -> dict[str, Any]:
    """The row as finesift reads it: each mapped column under its field's name, the mapped
    source columns left out, other fields as they were (``raw`` is not changed).

    Raises:
        what ``error(message)`` makes: the row lacks a mapped column and its field.
    """
    if not columns:
        return raw
    lacking = missing(columns, raw)
    if lacking:
        raise error(missing_message(columns, raw, lacking, "record"))
    sources = set(columns.values())
    out = {k: v for k, v in raw.items() if k not in sources}
    for field, column in columns.items():
        if column in raw:
            out[field] = raw[column]
        elif field in raw:  # the input has the field itself
            out[field] = raw[field]
    return out
