"""The run writer: what a run writes to its output folder, for every kind of run.

A plain ``finesift select``, a shard run (``--shard-index``) and ``finesift merge`` write
the same kind of folder: ``scores.parquet``, ``selected.jsonl`` (not a shard run) and
``manifest.json``, written last. :func:`run_manifest` assembles the manifest of all three
(one key order, the same bookkeeping entries), :func:`write_run` writes the files through
:func:`write_outputs` (each atomically; a failed write leaves no set of outputs that looks
whole) and :func:`check_out_dir` checks the folder before any work is done.

This module sits below the pipeline (:mod:`finesift.pipeline`, :mod:`finesift.shards`,
:mod:`finesift.api`) and imports none of it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from finesift.errors import OptionError
from finesift.store.files import file_fingerprint, write_json, write_jsonl, write_parquet
from finesift.store.manifest import Stopwatch, gpu_peak_mb, package_versions, peak_rss_mb

OUTPUT_FILES = ("scores.parquet", "selected.jsonl", "manifest.json")
"""The files a run writes in its output folder (a shard run: the first and the last)."""

SETTING_KEYS = ("method", "method_options", "task", "model", "seed", "max_length", "template",
                "precision", "dtype", "batch_size", "device", "format")
"""A run's settings as its manifest records them (a select and a merge add ``strategy``)."""

MANIFEST_KEYS = (
    "kind", "finesift_version", "created", "method", "method_options", "prefilter", "task",
    "model",
    "strategy", "source_weights", "budget", "seed", "max_length", "template", "precision",
    "dtype", "batch_size", "device", "format", "columns", "shard", "data", "dedup",
    "contamination", "selected", "exports", "method_info", "merged_from", "stages", "wall_seconds", "peak_rss_mb",
    "peak_gpu_mb", "versions",
)
"""Every manifest entry, in the order manifests list them (each run has a subset: only a
shard run has ``kind`` and ``shard``, only a merge ``merged_from``, a shard run has no
``strategy``, ``budget`` or ``selected``; ``columns`` and ``exports`` appear in a run that
maps columns or exports the selection, ``prefilter`` in a run with ``--prefilter``)."""

Writer = Callable[[Path], None]


def run_manifest(settings: dict[str, Any], data: dict[str, Any], result: dict[str, Any], *,
                 watch: Stopwatch, t_start: float) -> dict[str, Any]:
    """A run's ``manifest.json`` content.

    Args:
        settings: the run's settings (:data:`SETTING_KEYS`, and ``strategy`` when it
            selects).
        data: the ``data`` entry: fingerprints of the input files, record counts, the
            reading and encoding reports, the labels.
        result: what the run produced: ``method_info`` and, as the run has them,
            ``budget`` and ``selected`` (:func:`selection_entries`), ``kind`` and ``shard``
            (a shard run), ``merged_from`` (a merge).
        watch: the run's stages (their seconds and peak memory).
        t_start: :func:`time.perf_counter` at the start of the run (for ``wall_seconds``).

    Raises:
        ValueError: an entry that is not in :data:`MANIFEST_KEYS` (a programming error:
            every manifest has the same layout).
    """
    entries = {
        "finesift_version": package_versions().get("finesift"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **settings,
        "data": data,
        **result,
        "stages": watch.to_dict(),
        "wall_seconds": round(time.perf_counter() - t_start, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "versions": package_versions(),
    }
    gpu = gpu_peak_mb()  # only when this process used CUDA
    if gpu is not None:
        entries["peak_gpu_mb"] = round(gpu, 1)
    unknown = sorted(set(entries) - set(MANIFEST_KEYS))
    if unknown:
        raise ValueError(f"manifest entries {unknown} are not in MANIFEST_KEYS")
    return {key: entries[key] for key in MANIFEST_KEYS if key in entries}


def selection_entries(budget: str | int, k: int, selected: Sequence[Any]) -> dict[str, Any]:
    """The ``budget`` and ``selected`` entries of a run that selected ``selected``
    (records) for ``budget`` (as given), ``k`` (as a count)."""
    return {
        "budget": {"requested": str(budget), "count": int(k)},
        "selected": {"count": len(selected),
                     "by_source": dict(Counter(r.source for r in selected))},
    }


def write_run(out_dir: Path, columns: dict[str, Any], manifest: dict[str, Any],
              selected: Sequence[Any] | None = None, *,
              jsonl_writer: Callable[[Path, Iterable[dict[str, Any]]], None] | None = None,
              exports: Sequence[str] = (),
              ) -> None:
    """Write a run's outputs to ``out_dir`` with :func:`write_outputs`: ``scores.parquet``
    (``columns``), ``selected.jsonl`` (each selected record exactly as read; not written
    when ``selected`` is None, as in a shard run), the ``exports`` (formats of
    :mod:`finesift.store.export`: the selection ready for a trainer, scored from
    ``columns``; export files of an earlier run in the folder that this run does not write
    are removed) and ``manifest.json``, last; then, for a
    run that selected, ``report.html`` (:mod:`finesift.store.select_report`; a failure to
    draw it is logged as a warning and loses nothing else).

    A shard manifest (one with a ``shard`` entry) is completed with the sha256 of the
    scores file written with it (``shard.scores_sha256``, in place), so a merge can tell a
    scores file replaced since. ``jsonl_writer`` replaces :func:`write_jsonl` (the caller's
    own binding of it, which a test may swap for one that fails like a full disk).

    Raises:
        OptionError: a file could not be written (naming it and why).
    """
    write_lines = jsonl_writer or write_jsonl
    writers: list[tuple[str, Writer]] = [
        ("scores.parquet", lambda path: write_parquet(path, columns))]
    if selected is not None:
        writers.append(("selected.jsonl",
                        lambda path: write_lines(path, (r.raw for r in selected))))
        from finesift.store import export

        for fmt, name in export.FILES.items():  # no stale export beside this run's outputs
            if fmt not in exports:
                _remove(out_dir / name)
        if exports:
            score_of = dict(zip(columns["id"], columns["score"], strict=True))
            writers += export.export_writers(exports, selected,
                                             [score_of[r.id] for r in selected],
                                             jsonl_writer=write_lines)

    def write_manifest(path: Path) -> None:
        if "shard" in manifest:  # the manifest names the scores file it belongs to
            manifest["shard"]["scores_sha256"] = file_fingerprint(
                out_dir / "scores.parquet")["sha256"]
        write_json(path, manifest)

    writers.append(("manifest.json", write_manifest))
    write_outputs(out_dir, writers)
    if selected is not None:  # a view of the outputs; a failure to draw only warns
        from finesift.store.select_report import write_select_report

        write_select_report(out_dir, columns, manifest, selected)


def write_outputs(out_dir: Path, writers: list[tuple[str, Writer]]) -> None:
    """Write a run's output files in order (the manifest last), each atomically. A stale
    manifest from an earlier run is removed first, and if a write fails the files this run
    wrote are removed, so a folder never holds a set of outputs that looks whole but is not.

    Raises:
        OptionError: a file could not be written (naming it and why).
    """
    written: list[Path] = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "manifest.json").unlink(missing_ok=True)
        for name, write in writers:
            write(out_dir / name)
            written.append(out_dir / name)
    except OSError as e:
        for path in written:
            _remove(path)
        what = e.filename or out_dir
        raise OptionError(f"--out {out_dir}: cannot write {what}: {e.strerror or e}") from None


def _remove(path: Path) -> None:
    """Remove an output file or folder (an export may be a ``datasets`` folder)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_out_dir(out: str | Path | None) -> Path | None:
    """The output folder, checked before any work: not empty, not a file, creatable and
    writable, and no folder where a run writes one of its files. Nothing is created.

    Raises:
        OptionError: naming the folder and what is wrong.
    """
    if out is None:
        return None
    if not str(out).strip():
        raise OptionError("--out is empty; give the output folder (. for this one)")
    out_dir = Path(out)
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise OptionError(f"--out {out_dir}: exists and is not a folder")
        if out_dir.is_dir():
            for name in OUTPUT_FILES:
                if (out_dir / name).is_dir():
                    raise OptionError(f"--out {out_dir}: {out_dir / name} is a folder; "
                                      f"a run writes its {name} file there")
            work = out_dir / ".work"
            if work.exists() and not work.is_dir():
                raise OptionError(f"--out {out_dir}: {work} is a file; a run keeps its "
                                  "resumable state in that folder")
        parent = out_dir.absolute()
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise OptionError(f"--out {out_dir}: cannot create the folder: {parent} is a file, "
                              "not a folder")
    except OSError as e:
        raise OptionError(f"--out {out_dir}: {e.strerror or e}") from None
    try:  # the one sure test of writability (permissions, read-only mounts, /proc, /sys)
        os.rmdir(tempfile.mkdtemp(prefix=".finesift-probe-", dir=parent))
    except OSError as e:
        where = "in it" if parent == out_dir.absolute() else f"in {parent}"
        raise OptionError(f"--out {out_dir}: cannot write {where}: {e.strerror or e}") from None
    return out_dir


__all__ = ["MANIFEST_KEYS", "OUTPUT_FILES", "SETTING_KEYS", "check_out_dir", "run_manifest",
           "selection_entries", "write_outputs", "write_run"]
