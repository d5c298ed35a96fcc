"""In-memory inputs: a ``datasets.Dataset``, a pandas DataFrame, a pyarrow Table or a list
of dicts as the pool or target of :func:`finesift.select`, beside (or instead of) files.

:func:`resolve_inputs` turns what the caller passed (one input, a list of inputs, or a dict
``{name: data}``) into file paths (kept as they are: :mod:`finesift.data.readers` reads
them) and :class:`MemorySource` objects, which read their rows through the same checks as a
file's: Arrow data (a Dataset, a DataFrame, a Table) as a Parquet file's columns, a list of
dicts as JSON records; then the column mapping and :func:`~finesift.data.readers.parse_record`.
An error names the input and the row: ``pool[0] (datasets.Dataset) row 17: ...``.

Each in-memory input has a *source name* (its records' ``source``, in ``scores.parquet``,
the manifest and the default ids ``NAME:ROW``): the key of a dict input, else the
Dataset's own name and split (``gsm8k/train``) where it has one, else ``pool-0``,
``target-1``, ... by its position. Its fingerprint (the manifest's ``data`` entry, and what
keys resumable work that names inputs) is the sha256 of its rows as read, one canonical
JSON line each, so the same content always has the same key and any change another.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from finesift.data.records import Record
from finesift.errors import InputError, OptionError

KINDS = ("datasets.Dataset", "pandas.DataFrame", "pyarrow.Table", "list of dicts")
"""The kinds of in-memory input accepted (besides file paths)."""

ACCEPTED = ("a file path, a datasets.Dataset (one split of a DatasetDict), a pandas "
            "DataFrame, a pyarrow Table or a list of dicts")

_MAX_DEPTH = 100  # as finesift.data.readers.MAX_DEPTH


def _module_class(value: Any, module: str, name: str) -> type | None:
    """``module.name`` if that module is already imported (an object of it can only exist
    then), else ``None``: recognising an input never imports pandas or datasets."""
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return cls if isinstance(cls, type) else None


def _is(value: Any, module: str, name: str) -> bool:
    cls = _module_class(value, module, name)
    return cls is not None and isinstance(value, cls)


def _splits(value: Any) -> str:
    return ", ".join(repr(str(k)) for k in value) or "none"


def kind_of(value: Any) -> str | None:
    """The kind of in-memory input ``value`` is (one of :data:`KINDS`), else ``None``.

    Raises:
        OptionError: a ``DatasetDict`` (naming its splits: give one) or a streaming
            ``IterableDataset``.
    """
    if _is(value, "datasets", "DatasetDict") or _is(value, "datasets", "IterableDatasetDict"):
        first = next(iter(value), "train")
        raise OptionError(f"a datasets.DatasetDict with the splits {_splits(value)}: give one "
                          f"split, e.g. ds[{str(first)!r}]")
    if _is(value, "datasets", "IterableDataset"):
        raise OptionError("a streaming datasets.IterableDataset: finesift reads every row "
                          "(and hashes them for the manifest); take the rows you want into a "
                          "Dataset first, e.g. datasets.Dataset.from_list(list(ds.take(N)))")
    if _is(value, "datasets", "Dataset"):
        return "datasets.Dataset"
    if _is(value, "pandas", "DataFrame"):
        return "pandas.DataFrame"
    if _is(value, "pyarrow", "Table"):
        return "pyarrow.Table"
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, Mapping) and not _is(v, "datasets", "DatasetDict") for v in value):
        return "list of dicts"
    return None


def _dataset_name(ds: Any) -> str | None:
    """A Dataset's own name (``gsm8k/train``), if it was loaded from a named data set; a
    Dataset built from local files by a generic loader (``json``, ``csv``, ...) has none."""
    info = getattr(ds, "info", None)
    name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
    if not isinstance(name, str) or not name.strip():
        return None
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES as generic
    except ImportError:  # pragma: no cover -- an older datasets
        generic = {}
    if name in generic or name in ("generator", "pandas", "sql"):
        return None
    split = getattr(ds, "split", None)
    return f"{name}/{split}" if split else name


class MemorySource:
    """One in-memory pool or target input.

    Attributes:
        name: its records' ``source`` (see the module docstring).
        label: how errors name it: ``pool[0] (datasets.Dataset)``, ``pool['gsm8k']
            (pandas.DataFrame)``, or ``pool (list of dicts)`` when it was the only input.
        kind: one of :data:`KINDS`.
        data: the object itself.
        fingerprint: after :meth:`read_records`: ``{"name", "in_memory" (the kind),
            "rows", "sha256", "bytes"}`` of its rows as read.
    """

    def __init__(self, data: Any, kind: str, name: str, label: str) -> None:
        self.data = data
        self.kind = kind
        self.name = name
        self.label = label
        self.fingerprint: dict[str, Any] | None = None

    def __str__(self) -> str:
        return self.label

    def __repr__(self) -> str:
        return f"MemorySource({self.label}, name={self.name!r})"

    def rows(self) -> Iterator[tuple[int, int | None, dict[str, Any]]]:
        """``(row, None, raw)`` per row, raw as JSON-able values (checked like a file's)."""
        from finesift.data.readers import arrow_table_rows, dataset_rows

        if self.kind == "datasets.Dataset":
            yield from dataset_rows(self.data, self.name, self.label)
        elif self.kind == "pyarrow.Table":
            yield from arrow_table_rows(self.data, self.name, self.label)
        elif self.kind == "pandas.DataFrame":
            yield from arrow_table_rows(self._frame_table(), self.name, self.label)
        else:
            for row, item in enumerate(self.data):
                yield row, None, _plain_row(item, f"{self.label} row {row}")

    def _frame_table(self) -> Any:
        import pyarrow as pa

        frame = self.data
        names = [str(c) for c in frame.columns]
        dupes = sorted({c for c in names if names.count(c) > 1})
        if dupes:
            raise InputError(self.label, f"duplicate column names: {dupes}")
        try:
            return pa.Table.from_pandas(frame, preserve_index=False)
        except (pa.ArrowException, TypeError, ValueError) as e:
            raise InputError(self.label, f"cannot read the DataFrame as a table: {e} (each "
                                         "column must hold values of one type)") from None

    def column_names(self) -> list[str] | None:
        """The input's columns where it has a schema (a list of dicts has none)."""
        if self.kind == "datasets.Dataset":
            return list(self.data.column_names)
        if self.kind == "pandas.DataFrame":
            return [str(c) for c in self.data.columns]
        if self.kind == "pyarrow.Table":
            return list(self.data.column_names)
        return None

    def read_records(self, *, report: Any = None,
                     columns: dict[str, str] | None = None) -> list[Record]:
        """The input's validated records (as :func:`finesift.data.readers.read_file`
        reads a file's), and its :attr:`fingerprint`.

        Raises:
            InputError: a mapped column the input lacks, or a bad row (naming the row).
        """
        from finesift.data.columns import check_names
        from finesift.data.readers import records_from_rows

        names = self.column_names()
        if columns and names is not None:  # a schema: name the missing column up front
            check_names(columns, names, self.label)
        digest = hashlib.sha256()
        counts = {"rows": 0, "bytes": 0}

        def hashed() -> Iterator[tuple[int, int | None, dict[str, Any]]]:
            for row, line, raw in self.rows():
                blob = json.dumps(raw, sort_keys=True, separators=(",", ":"),
                                  default=str).encode("ascii") + b"\n"
                digest.update(blob)
                counts["rows"] += 1
                counts["bytes"] += len(blob)
                yield row, line, raw

        records = records_from_rows(hashed(), self.name, report=report, columns=columns,
                                    origin=self.label)
        self.fingerprint = {"name": self.name, "in_memory": self.kind, "rows": counts["rows"],
                            "sha256": digest.hexdigest(), "bytes": counts["bytes"]}
        return records


def _plain_row(item: Any, where: str) -> dict[str, Any]:
    """A list-of-dicts record as JSON data (tuples and numpy values become lists and
    numbers, a NaN a missing value); anything else (a date, an object) is refused rather
    than turned into text."""
    return _plain(item, where, "", 1)


def _plain(value: Any, where: str, path: str, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise InputError(where, f"field {path.split('.')[0].split('[')[0]!r} is nested more "
                                f"than {_MAX_DEPTH} levels deep; records must be flatter "
                                "than that")
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InputError(where, f"a field name {'in ' + repr(path) + ' ' if path else ''}"
                                        f"is {type(k).__name__} {k!r}, not a string")
            out[k] = _plain(v, where, f"{path}.{k}" if path else k, depth + 1)
        return out
    if isinstance(value, (list, tuple, np.ndarray)):
        items = value.tolist() if isinstance(value, np.ndarray) else value
        return [_plain(v, where, f"{path}[{j}]", depth + 1) for j, v in enumerate(items)]
    if depth == 1:
        raise InputError(where, f"expected a dict (one record), got {type(value).__name__}")
    raise InputError(where, f"field {path!r}: a {type(value).__module__}."
                            f"{type(value).__qualname__} value is not JSON data (strings, "
                            "numbers, booleans, lists, dicts); convert it first")


def resolve_inputs(value: Any, role: str) -> list[Any]:
    """The inputs of one role (``"pool"`` or ``"target"``): file paths as strings,
    in-memory data as :class:`MemorySource` objects, in the order given.

    Args:
        value: a path, an in-memory input, a list of either (mixed freely), or a dict
            ``{source name: in-memory input}``.
        role: ``"pool"`` or ``"target"`` (error messages and default source names).

    Raises:
        OptionError: an object that is neither a path nor accepted data, a DatasetDict
            (naming its splits), a dict value that is a path, a source name given twice.
    """
    if isinstance(value, MemorySource):
        return [value]
    single = isinstance(value, (str, os.PathLike)) or _kind(value, role) is not None
    entries: list[tuple[str, Any, str | None]]  # (how errors name the position, item, key)
    if single:
        entries = [(role, value, None)]
    elif isinstance(value, Mapping):
        entries = []
        for key, item in value.items():
            if not isinstance(key, str) or not key.strip():
                raise OptionError(f"{role}: a dict of inputs maps source names (non-empty "
                                  f"strings) to data; got the key {key!r}")
            if isinstance(item, (str, os.PathLike)):
                raise OptionError(f"{role}[{key!r}]: a dict of inputs names in-memory data "
                                  f"(a file is named by its path); give the file {str(item)!r} "
                                  "in a list instead")
            entries.append((f"{role}[{key!r}]", item, key))
    elif isinstance(value, (list, tuple)):
        entries = [(f"{role}[{i}]", item, None) for i, item in enumerate(value)]
    else:
        raise OptionError(f"{role}: expected {ACCEPTED} (or a list of them); got "
                          f"{type(value).__name__}")
    out: list[Any] = []
    names: dict[str, str] = {}
    for i, (where, item, key) in enumerate(entries):
        if isinstance(item, MemorySource):
            out.append(item)
            continue
        if isinstance(item, (str, os.PathLike)):
            out.append(str(item))
            names.setdefault(str(item), where)
            continue
        kind = _kind(item, where)
        if kind is None:
            shown = type(item).__name__
            hint = (" (a list of records must hold only dicts)"
                    if isinstance(item, Mapping) else "")
            raise OptionError(f"{where}: expected {ACCEPTED}; got {shown}{hint}")
        name = key
        if name is None and kind == "datasets.Dataset":
            name = _dataset_name(item)
            if name is not None and name in names:
                name = f"{name}-{i}"
        if name is None:
            name = f"{role}-{i}"
        if name in names:
            raise OptionError(f"{where}: the source name {name!r} is taken by {names[name]}; "
                              f"name the inputs with a dict {{name: data}}")
        names[name] = where
        out.append(MemorySource(item, kind, name, f"{where} ({kind})"))
    return out


def _kind(value: Any, where: str) -> str | None:
    try:
        return kind_of(value)
    except OptionError as e:
        raise OptionError(f"{where}: {e}") from None


def content_fingerprint(source: MemorySource) -> dict[str, Any]:
    """An in-memory input's fingerprint (:attr:`MemorySource.fingerprint`), reading it
    first if it was not read yet."""
    if source.fingerprint is None:
        source.read_records()
    assert source.fingerprint is not None
    return dict(source.fingerprint)


def in_memory(sources: Sequence[Any]) -> list[str]:
    """The labels of the in-memory inputs among ``sources`` (paths and
    :class:`MemorySource` objects)."""
    return [s.label for s in sources if isinstance(s, MemorySource)]
