"""Numeric precision: bf16 autocast where the CPU runs it fast, else fp32."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

PRECISIONS = ("auto", "bf16", "fp32")


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve(precision: str, device: str = "cpu") -> str:
    """Map ``auto`` to ``bf16`` or ``fp32`` for this device."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(precision: str, device: str = "cpu"):
    """Context manager running matmuls in bf16 (weights stay fp32) or doing nothing."""
    p = resolve(precision, device)
    if p == "bf16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def low_precision_weights(model: torch.nn.Module, precision: str, device: str = "cpu"):
    """While active, hold the weights of ``nn.Linear`` layers in bf16 when ``precision``
    resolves to bf16 (otherwise do nothing).

    Autocast casts an fp32 weight to bf16 on every call of the layer, i.e. once per batch
    (and once per LM-head chunk); casting once for a whole scoring pass gives the same
    values (autocast leaves a bf16 weight as it is). Weights shared with an embedding
    (a tied LM head) are left alone: the embedding lookup must stay fp32. The fp32
    tensors are put back on exit, untouched.
    """
    if resolve(precision, device) != "bf16":
        yield
        return
    shared = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        for m in model.modules():
            w = getattr(m, "weight", None)
            if (isinstance(m, torch.nn.Linear) and isinstance(w, torch.nn.Parameter)
                    and w.dtype == torch.float32 and id(w) not in shared):
                saved.append((w, w.data))
                w.data = w.data.to(torch.bfloat16)
        yield
    finally:
        for w, data in saved:
            w.data = data
