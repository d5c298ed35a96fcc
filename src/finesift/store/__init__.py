"""Outputs: atomic writes, the score table, selected records, the run manifest and the
fingerprints that key resumable work."""

from finesift.store.files import (
    atomic_path,
    atomic_save_npy,
    atomic_save_torch,
    file_fingerprint,
    write_json,
    write_jsonl,
    write_parquet,
)
from finesift.store.manifest import Stopwatch, package_versions, peak_rss_mb
from finesift.store.run import check_out_dir, run_manifest, write_outputs, write_run
from finesift.store.work import fingerprint

__all__ = [
    "Stopwatch",
    "atomic_path",
    "atomic_save_npy",
    "atomic_save_torch",
    "check_out_dir",
    "file_fingerprint",
    "fingerprint",
    "package_versions",
    "peak_rss_mb",
    "run_manifest",
    "write_json",
    "write_jsonl",
    "write_outputs",
    "write_parquet",
    "write_run",
]
