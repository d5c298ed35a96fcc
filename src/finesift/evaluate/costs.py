"""Per-stage cost accounting: wall time and peak resident memory of each stage.

``store.peak_rss_mb`` is the process's high-water mark since it started, which cannot tell
stages apart. On Linux the mark can be reset (``/proc/self/clear_refs``, value 5) and read
back (``VmHWM`` in ``/proc/self/status``), so :class:`StageCosts` reports each stage's own
peak there and falls back to the process-wide figure elsewhere.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from finesift.store import peak_rss_mb

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the process's peak-RSS mark; ``False`` where the OS does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def stage_peak_rss_mb() -> float:
    """Peak resident memory (MiB) since the last :func:`reset_peak_rss` (or process start)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return peak_rss_mb()


class StageCosts:
    """Wall time and peak memory of named stages.

    ``with costs.stage("finetune"): ...`` records ``{"seconds", "cpu_seconds",
    "peak_rss_mb"}`` under the name (``cpu_seconds``: the process's CPU time, all threads;
    on a shared machine it moves less than the wall time); ``to_dict()`` returns them all.
    """

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}

    @contextmanager
    def stage(self, name: str):
        """Time the ``with`` block and record its peak memory under ``name``."""
        reset_peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.stages[name] = {
                "seconds": round(time.perf_counter() - t0, 3),
                "cpu_seconds": round(time.process_time() - c0, 3),
                "peak_rss_mb": round(stage_peak_rss_mb(), 1),
            }

    def to_dict(self) -> dict[str, Any]:
        """A copy of the recorded stages."""
        return {k: dict(v) for k, v in self.stages.items()}
