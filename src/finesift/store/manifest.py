"""Run bookkeeping: package versions, per-stage wall time and peak memory."""

from __future__ import annotations

import importlib.metadata
import platform
import resource
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
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


_SEEN_PEAK_MB = 0.0  # the highest mark read just before a stage reset it (see Stopwatch)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (including the peaks of
    stages whose mark :class:`Stopwatch` has since reset)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    now = kb / 1024.0 if sys.platform != "darwin" else kb / 1024.0 / 1024.0
    return max(now, _SEEN_PEAK_MB)


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the process's peak-RSS mark (Linux: ``/proc/self/clear_refs``, value 5);
    ``False`` where the OS does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def stage_peak_rss_mb() -> float:
    """Peak resident memory (MiB) since the last :func:`reset_peak_rss` (Linux ``VmHWM``),
    or the process-wide peak where that cannot be read."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return peak_rss_mb()


_SEEN_GPU_MB = 0.0  # the highest GPU mark read just before a stage reset it


def _cuda() -> Any:
    """``torch.cuda`` when this process has used CUDA (torch imported and CUDA
    initialised), else ``None``; never imports torch itself."""
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    try:
        return cuda if cuda is not None and cuda.is_initialized() else None
    except Exception:  # noqa: BLE001 - a half-imported torch: no GPU figures
        return None


def _gpu_mark_mb() -> float | None:
    """The GPU peak since the last reset, in MiB (the highest of the devices), or
    ``None`` when CUDA is not in use."""
    cuda = _cuda()
    if cuda is None:
        return None
    return max((cuda.max_memory_allocated(d) for d in range(cuda.device_count())),
               default=0) / 2**20


def gpu_peak_mb() -> float | None:
    """Peak GPU memory allocated by torch in this process, in MiB, over every GPU
    (``torch.cuda.max_memory_allocated``, including the peaks of stages whose mark
    :class:`Stopwatch` has since reset); ``None`` when CUDA was never used."""
    now = _gpu_mark_mb()
    return None if now is None else max(now, _SEEN_GPU_MB)


def _reset_gpu_peak(cuda: Any) -> None:
    for d in range(cuda.device_count()):
        cuda.reset_peak_memory_stats(d)


_LOCK = threading.Lock()
_OPEN: list[dict[str, float]] = []  # the peaks of the stages open in this process


def _fold_peak() -> None:
    """Credit the peak since the last reset to every open stage and to the process's
    peak, for resident memory and, once CUDA is in use, GPU memory (caller holds
    _LOCK)."""
    global _SEEN_PEAK_MB, _SEEN_GPU_MB
    now = stage_peak_rss_mb()
    _SEEN_PEAK_MB = max(_SEEN_PEAK_MB, now)
    gpu = _gpu_mark_mb()
    if gpu is not None:
        _SEEN_GPU_MB = max(_SEEN_GPU_MB, gpu)
    for rec in _OPEN:
        rec["peak"] = max(rec["peak"], now)
        if gpu is not None:
            rec["gpu"] = max(rec.get("gpu", 0.0), gpu)


class Stopwatch:
    """Wall time, CPU time and peak resident memory of named stages.

    ``with watch.stage("score"): ...`` records ``{"seconds", "cpu_seconds",
    "peak_rss_mb"}`` under the name; ``to_dict()`` returns every stage. ``cpu_seconds`` is
    the process's CPU time over all threads (on a shared machine it moves less than the
    wall time). ``peak_rss_mb`` is the stage's own peak: the process-wide high-water mark
    cannot tell stages apart, so each stage resets it on Linux and reads it back, after
    first crediting the peak so far to the stages still open, which keeps nested stages
    (a bench's ``select`` around ``api.select``'s own stages) right. Where the mark cannot
    be reset the figure is the process's peak so far. The reset also clears the mark the
    OS reports for the whole process (VmHWM, ``ru_maxrss``); :func:`peak_rss_mb` keeps
    the process's true peak by remembering every mark read before a reset.

    Once the process uses CUDA, each stage also records ``peak_gpu_mb``: the most GPU
    memory torch allocated during it (``torch.cuda.max_memory_allocated``, reset at the
    stage's start in the same way); on a CPU-only run the entry is absent.
    """

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}

    @contextmanager
    def stage(self, name: str):
        """Time the ``with`` block and record its peak memory under ``name``."""
        rec = {"peak": 0.0}
        with _LOCK:
            _fold_peak()
            reset_peak_rss()
            cuda = _cuda()
            if cuda is not None:
                _reset_gpu_peak(cuda)
            _OPEN.append(rec)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            with _LOCK:
                _fold_peak()
                # by identity: open records with equal peaks compare equal
                _OPEN[:] = [r for r in _OPEN if r is not rec]
            self.stages[name] = {
                "seconds": round(time.perf_counter() - t0, 3),
                "cpu_seconds": round(time.process_time() - c0, 3),
                "peak_rss_mb": round(rec["peak"], 1),
            }
            if "gpu" in rec:  # the stage ran with CUDA in use
                self.stages[name]["peak_gpu_mb"] = round(rec["gpu"], 1)

    def to_dict(self) -> dict[str, Any]:
        """A copy of the recorded stages."""
        return {k: dict(v) for k, v in self.stages.items()}
