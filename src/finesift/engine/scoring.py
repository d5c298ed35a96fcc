"""Batched per-example label log-probs and token-averaged losses (inference only)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from finesift.engine.batching import OomBackoff, sorted_batches
from finesift.engine.budget import MAX_AUTO_ROWS, TokenBudget, parse_batch_size
from finesift.engine.precision import autocast, low_precision_weights
from finesift.engine.tasks import Task


def _to(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.inference_mode()
def token_logprobs(
    model: torch.nn.Module,
    task: Task,
    examples: Sequence[Any],
    *,
    batch_size: int | str = 8,
    max_tokens: int | None = 4096,
    precision: str = "auto",
    device: str = "cpu",
    progress: bool = False,
    desc: str = "scoring",
) -> list[np.ndarray]:
    """Log-prob of each label token, per example (float32 arrays, in input order).

    Examples are processed longest first in batches of similar length; the result is
    returned in the order of ``examples``. Each example's values do not depend on the
    batching (up to float rounding of the kernels).

    Args:
        model: the model (may be a peft model; its current adapter weights are used).
        task: the :class:`Task` that batches examples and computes label log-probs.
        examples: the encoded examples.
        batch_size: rows per batch (default 8); or ``"auto"``: as many rows as fit
            :data:`finesift.engine.budget.DEFAULT_MEMORY` (1 GiB) of activations, or
            ``"auto:SIZE"`` (e.g. ``"auto:4GiB"``) for another limit, so batches of
            short examples hold more rows than batches of long ones
            (:class:`finesift.engine.budget.TokenBudget`).
        max_tokens: with an integer ``batch_size``, a cap on rows x longest length per
            batch (default 4096; keeps memory flat). Ignored with ``"auto"``.
        precision: ``auto``, ``bf16`` or ``fp32``.
        device: torch device.
        progress: show a progress bar on stderr.

    A batch that runs out of device memory (``torch.OutOfMemoryError``) is scored again
    in halves, down to one row, and later batches are capped at the size that fitted
    (:class:`finesift.engine.batching.OomBackoff`; logged once); the values are those of
    any other batching.
    """
    was_training = model.training
    model.eval()
    out: list[np.ndarray | None] = [None] * len(examples)
    lengths = [task.length(e) for e in examples]
    rows, memory = parse_batch_size(batch_size)
    max_rows = None
    if memory is not None:
        budget = TokenBudget.for_model(
            model, memory, head_chunk=getattr(task, "head_chunk", 0) or 0
        )
        rows, max_tokens, max_rows = MAX_AUTO_ROWS, None, budget.rows_for
    bar = tqdm(total=len(examples), desc=desc, disable=not progress, leave=False, unit="ex")
    try:
        with low_precision_weights(model, precision, device):
            _score_batches(model, task, examples, lengths, out, bar, rows=rows,
                           max_tokens=max_tokens, max_rows=max_rows, precision=precision,
                           device=device, desc=desc)
    finally:
        bar.close()
        if was_training:
            model.train()
    return out  # type: ignore[return-value]


def _score_batches(model, task, examples, lengths, out, bar, *, rows, max_tokens, max_rows,
                   precision, device, desc="scoring") -> None:
    """Score every batch; store each example's label log-probs at ``out[i]`` (a batch
    that runs out of memory is split, see :class:`OomBackoff`)."""

    def score(idx: list[int]) -> None:
        batch = _to(task.collate([examples[i] for i in idx]), device)
        with autocast(precision, device):
            logp, row = task.label_logprobs(model, batch)
        del batch
        logp = logp.float().cpu().numpy()
        row = row.cpu().numpy()
        counts = np.bincount(row, minlength=len(idx))
        parts = np.split(logp, np.cumsum(counts)[:-1])
        for j, i in enumerate(idx):
            out[i] = parts[j].astype(np.float32, copy=True)
        bar.update(len(idx))

    backoff = OomBackoff(desc, device)
    for idx in sorted_batches(
        examples, lengths, batch_size=rows, max_tokens=max_tokens, max_rows=max_rows
    ):
        backoff.run(idx, lengths, score)


def mean_losses(logprobs: Sequence[np.ndarray]) -> np.ndarray:
    """Token-averaged negative log-likelihood per example."""
    return np.array([-float(lp.mean()) if len(lp) else np.nan for lp in logprobs])


def example_losses(model, task, examples, **kw) -> np.ndarray:
    """Token-averaged log-loss of each example (see :func:`token_logprobs` for options)."""
    return mean_losses(token_logprobs(model, task, examples, **kw))
