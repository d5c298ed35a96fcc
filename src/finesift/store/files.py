"""Atomic file writes: write to a temporary name in the same folder, then rename.

A crash never leaves a half-written file under the final name. Outputs and resumable
state written through :func:`atomic_path` (and the writers here built on it) get the
permissions a plain ``open(path, "w")`` would give them (``0o666`` less the umask).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

_TEMP_TRIES = 100


def _create_temp(path: Path, suffix: str) -> Path:
    """Create a new empty file next to ``path`` and return its name.

    The file is created with ``O_CREAT | O_EXCL`` and mode ``0o666``, so the kernel
    applies the process umask (and a folder's default ACL) exactly as for
    ``open(path, "w")``; ``tempfile.mkstemp`` would make it ``0o600`` whatever the umask,
    and the rename would carry that mode over to the output (unreadable to the rest of a
    group sharing a folder). The umask is never read or changed, so threads are safe.
    The name holds the process id and a random part, so several processes or threads
    writing the same final name never share a temporary file.
    """
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    for _ in range(_TEMP_TRIES):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name next to {path} after {_TEMP_TRIES} tries")


@contextlib.contextmanager
def atomic_path(path: str | Path, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a new, empty temporary file next to ``path``; rename it over ``path`` when
    the ``with`` block ends without an exception.

    Write into the yielded file (opening it truncates it and keeps its mode); replacing
    it by another file would lose the mode. On an exception the temporary file is
    removed and ``path`` is left as it was (absent, or its previous contents).

    Args:
        path: the final name (its folder is created).
        suffix: how the temporary name ends, for writers that look at it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create_temp(path, suffix)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_save_npy(path: str | Path, array: Any, *, fsync: bool = True) -> None:
    """Write ``array`` as a ``.npy`` file named exactly ``path``, atomically.

    ``np.save`` appends ``.npy`` to a file *name* that does not end in it, so this writes
    through an open file instead: the name is ``path`` whatever it ends in, and the
    bytes are those of ``np.save(path, array)`` (no pickled objects allowed).

    Args:
        path: the final name.
        array: a numeric array (or anything ``np.asarray`` makes one of).
        fsync: flush the data to disk before the rename, so a crash of the machine
            cannot leave an empty file under the final name.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.asarray(array), allow_pickle=False)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def atomic_save_torch(path: str | Path, obj: Any) -> None:
    """``torch.save(obj, path)``, atomically (same bytes, the mode of a plain file)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_default, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row, default=_default, ensure_ascii=False) + "\n" for row in rows)


def write_parquet(path: str | Path, columns: dict[str, Any]) -> None:
    """Write a dict of equal-length columns as a Parquet table, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({k: (np.asarray(v) if not isinstance(v, list) else v) for k, v in columns.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """sha256 and size of a file, or of every file in a folder (sorted by name)."""
    path = Path(path)
    h = hashlib.sha256()
    size = 0
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
                size += len(chunk)
    return {"path": str(path), "sha256": h.hexdigest(), "bytes": size}
