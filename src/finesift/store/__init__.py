"""Outputs: atomic writes, the score table, selected records and the run manifest."""

from finesift.store.files import (
    atomic_path,
    file_fingerprint,
    write_json,
    write_jsonl,
    write_parquet,
)
from finesift.store.manifest import Stopwatch, package_versions, peak_rss_mb

__all__ = [
    "Stopwatch",
    "atomic_path",
    "file_fingerprint",
    "package_versions",
    "peak_rss_mb",
    "write_json",
    "write_jsonl",
    "write_parquet",
]
