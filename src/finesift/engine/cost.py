"""What a selection run costs, declared before it runs (``finesift select --estimate``).

A method describes its work as a :class:`Cost` (:meth:`finesift.methods.base.Method.cost`):
a list of :class:`Pass` entries (forward passes, training passes, and work of its own that
it measures itself through a :class:`Probe`), the state it holds in memory beyond what a
few measured batches show, and what it writes to disk. :mod:`finesift.estimator` measures
seconds per unit of each pass on this machine (a few real batches) and multiplies.

Units are *padded* tokens, rows x longest length of each batch, because that is what a
batch computes: :func:`sorted_tokens` counts them for the length-sorted batches of the
scoring passes, :func:`shuffled_tokens` for the random batches of a training loop (the
same permutations :func:`finesift.engine.train.train` draws). A probe's unit is its own
(an example, a chunk, a text).

Nothing here names a method: each method module declares its own cost.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from finesift.errors import check_choice

#: a forward pass without gradients (scoring, embedding with the run's model)
FORWARD = "forward"
#: a training step: forward + backward + optimiser step
TRAIN = "train"
#: work a method measures itself (per-example gradients, projections, another encoder)
PROBE = "probe"
KINDS = (FORWARD, TRAIN, PROBE)
#: ``Pass.adapter`` for a pass that trains (or runs) every parameter of the model
FULL = "full"


@dataclass
class ProbeResult:
    """What a probe measured: ``seconds_per_unit`` of its work, plus ``fixed_seconds`` paid
    once per run (loading an encoder, generating a projection that is then cached), and a
    few words on how it measured (shown in the estimate)."""

    seconds_per_unit: float
    fixed_seconds: float = 0.0
    detail: str = ""


@dataclass
class Probe:
    """Work a method times itself: ``measure()`` runs a few units of it on this machine and
    returns a :class:`ProbeResult`. Passes with the same ``key`` share one measurement."""

    key: str
    measure: Callable[[], ProbeResult]
    unit: str = "unit"


@dataclass
class Pass:
    """One kind of work a run does, and how much of it.

    Attributes:
        what: a few words shown in the breakdown (``"fine-tune on the target, 2 epochs"``).
        units: padded tokens (``FORWARD``, ``TRAIN``) or the probe's units (``PROBE``).
        kind: ``FORWARD``, ``TRAIN`` or ``PROBE``.
        data: ``"pool"`` or ``"target"``: the examples calibration batches are drawn from.
        batch_size: rows per batch (``None``: the run's ``--batch-size``).
        precision: ``auto``/``bf16``/``fp32`` (``None``: the run's).
        adapter: ``None`` (the model as loaded), a LoRA adapter's
            :class:`~finesift.engine.train.LoraOptions`, or :data:`FULL` (every parameter
            trains).
        probe: ``PROBE`` only: what measures its seconds per unit.
    """

    what: str
    units: float
    kind: str = FORWARD
    data: str = "pool"
    batch_size: int | str | None = None
    precision: str | None = None
    adapter: Any = None
    probe: Probe | None = None

    def __post_init__(self) -> None:
        check_choice(self.kind, KINDS, "pass kind", error=ValueError)
        if (self.kind == PROBE) != (self.probe is not None):
            raise ValueError("a PROBE pass needs a probe, and only a PROBE pass has one")
        if self.data not in ("pool", "target"):
            raise ValueError(f"pass data must be 'pool' or 'target', got {self.data!r}")

    @property
    def unit(self) -> str:
        return self.probe.unit if self.probe is not None else "token"


@dataclass
class Cost:
    """A method's declaration of what a run costs (see :meth:`Method.cost`).

    Attributes:
        passes: the work, in the order it runs.
        memory: bytes the method holds at its peak beyond what the measured batches
            show (checkpoints kept, feature matrices), by what.
        disk: bytes it writes to its work folder, by what (the run's own outputs are
            added by the estimator).
        score_columns: extra per-example columns it adds to ``scores.parquet``.
        notes: caveats shown with the estimate.
    """

    passes: list[Pass] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)
    disk: dict[str, float] = field(default_factory=dict)
    score_columns: int = 0
    notes: list[str] = field(default_factory=list)


# -- token counts ------------------------------------------------------------------------


def lengths_of(task: Any, examples: Sequence[Any]) -> np.ndarray:
    """Each example's length in tokens as ``task`` batches it."""
    return np.array([task.length(e) for e in examples], dtype=np.int64)


def sorted_tokens(lengths: Sequence[int] | np.ndarray, batch_size: int | str,
                  max_tokens: int | None = 4096) -> int:
    """Padded tokens of one length-sorted pass (:func:`~finesift.engine.batching.sorted_batches`
    with the scoring defaults). ``"auto"`` batch sizes group examples of near-equal
    length: their padding is taken as nil."""
    from finesift.engine.batching import sorted_batches

    lengths = np.asarray(lengths, dtype=np.int64)
    if not isinstance(batch_size, int):
        return int(lengths.sum())
    return int(sum(len(idx) * int(lengths[idx].max())
                   for idx in sorted_batches(lengths, lengths, batch_size=batch_size,
                                             max_tokens=max_tokens)))


def shuffled_tokens(lengths: Sequence[int] | np.ndarray, batch_size: int,
                    epochs: float = 1.0, *, max_steps: int | None = None, seed: int = 0) -> int:
    """Padded tokens of a training loop over examples of ``lengths``: the steps and random
    batches of :func:`finesift.engine.train.train` (``ceil(epochs x batches per epoch)``
    steps, at most ``max_steps``), drawn with ``seed``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n == 0:
        return 0
    per_epoch = (n + batch_size - 1) // batch_size
    total = int(np.ceil(epochs * per_epoch))
    if max_steps is not None:
        total = min(total, int(max_steps))
    rng = np.random.default_rng(seed)
    tokens, step = 0, 0
    while step < total:
        perm = rng.permutation(n)
        for s in range(0, n, batch_size):
            if step >= total:
                break
            idx = perm[s : s + batch_size]
            tokens += len(idx) * int(lengths[idx].max())
            step += 1
    return tokens


def train_steps(n: int, batch_size: int, epochs: float = 1.0, max_steps: int | None = None) -> int:
    """Optimiser steps of :func:`finesift.engine.train.train` over ``n`` examples."""
    total = int(np.ceil(epochs * ((n + batch_size - 1) // batch_size))) if n else 0
    return total if max_steps is None else min(total, int(max_steps))


# -- model sizes -------------------------------------------------------------------------


def parameter_bytes(model: Any) -> tuple[int, int]:
    """``(parameters, bytes)`` of a model's weights (0, 0 for no model)."""
    if model is None:
        return 0, 0
    n = b = 0
    for p in model.parameters():
        n += p.numel()
        b += p.numel() * p.element_size()
    return n, b


_ADAPTERS: weakref.WeakKeyDictionary[Any, dict[str, tuple[int, int]]] = weakref.WeakKeyDictionary()


def adapter_size(model: Any, model_task: str, adapter: Any, seed: int = 0) -> tuple[int, int]:
    """``(parameters, bytes)`` an adapter trains on ``model``: a LoRA adapter is added,
    counted and removed again (cached per model and settings); :data:`FULL` counts every
    parameter."""
    if model is None or adapter is None:
        return 0, 0
    if adapter == FULL:
        return parameter_bytes(model)
    known = _ADAPTERS.setdefault(model, {})
    key = f"{model_task}:{adapter!r}"
    if key not in known:
        with with_adapter(model, model_task, adapter, seed) as m:
            n = b = 0
            for p in m.parameters():
                if p.requires_grad:
                    n += p.numel()
                    b += p.numel() * p.element_size()
        known[key] = (n, b)
    return known[key]


@contextlib.contextmanager
def with_adapter(model: Any, model_task: str, adapter: Any, seed: int = 0) -> Iterator[Any]:
    """``model`` with ``adapter`` for a few measured batches, as it was afterwards: a LoRA
    adapter is added and removed (the base weights untouched); :data:`FULL` makes every
    parameter trainable and puts the weights and flags back; ``None`` changes nothing."""
    import torch

    if adapter is None:
        yield model
        return
    if adapter == FULL:
        saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(True)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(saved[n])
                    p.requires_grad_(flags[n])
                    p.grad = None
        return
    from finesift.engine.train import add_lora

    wrapped = add_lora(model, model_task, adapter, seed=seed)
    try:
        yield wrapped
    finally:
        wrapped.unload()


# -- timing ------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA) so a clock reading means something."""
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str = "cpu") -> float:
    """Seconds ``fn()`` took (the device synchronised before and after)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def spread(n_items: int, k: int) -> list[int]:
    """``k`` positions spread evenly over ``range(n_items)`` (all of them if fewer), for
    picking representative batches."""
    if n_items <= 0:
        return []
    if n_items <= k:
        return list(range(n_items))
    return sorted({round(x) for x in np.linspace(0, n_items - 1, k + 2)[1:-1]})
