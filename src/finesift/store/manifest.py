"""Run bookkeeping: package versions, per-stage wall time and peak memory."""

from __future__ import annotations

import importlib.metadata
import platform
import resource
import sys
import time
from contextlib import contextmanager
from typing import Any

PACKAGES = ("finesift", "torch", "transformers", "peft", "numpy", "pyarrow", "tokenizers")


def package_versions() -> dict[str, str]:
    """Versions of Python, the platform and the packages finesift's results depend on."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 1024.0 / 1024.0


class Stopwatch:
    """Records wall time and the peak-memory high-water mark of named stages."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = {
                "seconds": round(time.perf_counter() - t0, 3),
                "peak_rss_mb_so_far": round(peak_rss_mb(), 1),
            }

    def to_dict(self) -> dict[str, Any]:
        return dict(self.stages)
