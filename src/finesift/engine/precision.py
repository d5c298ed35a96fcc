"""Numeric precision: bf16 autocast where the CPU runs it fast, else fp32; and the dtype
models are loaded in.

Two settings, kept apart:

* ``precision`` (autocast): the weights stay fp32 in memory and matmuls run in bf16
  where the device is fast at it. It saves time, not memory.
* ``dtype`` (:func:`resolve_dtype`): the dtype the weights are *loaded* in. ``bf16`` or
  ``fp16`` halve the model's memory (a 7B model: 14 GB instead of 28 GB); everything then
  computes in that dtype and ``precision`` has nothing left to do
  (:func:`compute_precision`). LoRA adapters stay fp32 whatever the dtype (peft keeps
  them so), so training them keeps its small updates.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch

PRECISIONS = ("auto", "bf16", "fp32")
DTYPES = ("fp32", "bf16", "fp16", "auto")
"""The ``--dtype`` values: fp32 (the default), bf16, fp16, or auto (bf16 where the
device is fast at it and the method does not need fp32, else fp32)."""
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX).

    ``FINESIFT_FAST_BF16=0`` in the environment answers False on any CPU, so that
    ``auto`` means fp32 everywhere: to reproduce, on a CPU with fast bf16, figures
    measured on one without it (a results folder's rows then stay comparable).
    ``FINESIFT_FAST_BF16=1`` answers True (bf16 then runs, slowly, where it is emulated).
    """
    flag = os.environ.get("FINESIFT_FAST_BF16", "").strip()
    if flag not in ("", "0", "1"):
        raise ValueError(f"FINESIFT_FAST_BF16 must be 0 or 1 (or unset), got {flag!r}")
    if flag:
        return flag == "1"
    return _cpu_flags_have_bf16()


@functools.lru_cache(maxsize=1)
def _cpu_flags_have_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve(precision: str, device: str = "cpu") -> str:
    """Map ``auto`` to ``bf16`` or ``fp32`` for this device."""
    from finesift.errors import check_choice

    check_choice(precision, PRECISIONS, "precision", error=ValueError)
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


def cuda_has_bf16(device: str = "cuda") -> bool:
    """True when ``device``'s GPU runs bf16 natively (Ampere and later), not emulated."""
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # pragma: no cover - an older torch without the keyword
        return bool(torch.cuda.is_bf16_supported())


def device_has_fast_bf16(device: str = "cpu") -> bool:
    """Whether ``device`` (``cpu``, ``cuda``, ``cuda:1``, ...) computes bf16 natively."""
    if device.startswith("cuda"):
        return cuda_has_bf16(device)
    return cpu_has_fast_bf16()


def resolve_dtype(dtype: str, device: str = "cpu", *,
                  required: tuple[str, str] | None = None, trains: bool = False,
                  who: str = "this run") -> str:
    """The dtype (``fp32``, ``bf16`` or ``fp16``) to load a model in for ``--dtype dtype``.

    ``auto`` is ``required``'s dtype when given, else ``bf16`` where ``device`` computes
    bf16 natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else ``fp32``.

    Args:
        dtype: ``fp32``, ``bf16``, ``fp16`` or ``auto``.
        device: the torch device the model runs on.
        required: ``(dtype, why)``: the dtype the method needs with its options (e.g. ToV
            scoring in fp32), or ``None``.
        trains: the model is trained or differentiated (fp16 is refused: its gradients
            underflow without loss scaling, which finesift does not do).
        who: names the user of the model in error messages (``method 'tov'``).

    Raises:
        OptionError: an unknown dtype, or one that contradicts ``required`` or ``trains``.
    """
    from finesift.errors import OptionError, check_choice

    check_choice(dtype, DTYPES, "--dtype")
    if dtype == "auto":
        if required is not None:
            return required[0]
        return "bf16" if device_has_fast_bf16(device) else "fp32"
    if required is not None and dtype != required[0]:
        raise OptionError(f"--dtype {dtype}: {who} needs {required[0]} weights: {required[1]}")
    if trains and dtype == "fp16":
        raise OptionError(f"--dtype fp16: {who} trains or takes gradients, and fp16 gradients "
                          "underflow without loss scaling (which finesift does not do); use "
                          "--dtype bf16 (a GPU from Ampere on, or a CPU with AVX512-BF16) or fp32")
    return dtype


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a resolved dtype name (``fp32``, ``bf16``, ``fp16``)."""
    return TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32``, ``bf16``, ``fp16`` for those torch dtypes, else torch's own name."""
    for name, t in TORCH_DTYPES.items():
        if t == dtype:
            return name
    return str(dtype).replace("torch.", "")


def compute_precision(precision: str, dtype: str) -> str:
    """The autocast precision to run with weights loaded in ``dtype``: ``precision`` for
    fp32 weights; ``fp32`` (no autocast) for bf16 or fp16 weights, which already compute
    in their own dtype (autocasting fp16 weights to bf16 would only lose digits)."""
    return precision if dtype == "fp32" else "fp32"
