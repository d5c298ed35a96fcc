"""Per-example LoRA gradients and Adam preconditioning (the seeded random projections
are :mod:`finesift.engine.projection`).

Shared by ``less`` and ``tracin``.

Per-example gradients use the outer-product identity for linear layers: for
``y = x W^T + b`` applied to a sequence, the gradient of example i's loss is
``sum_t g_{i,t} x_{i,t}^T`` (and ``sum_t g_{i,t}`` for the bias), where ``x`` is the
layer input and ``g`` the gradient of the batch loss with respect to the layer output.
Rows of a batch do not interact (attention masks keep padding out), so one backward pass
of the *sum* of per-example losses gives every example's gradient exactly. LoRA's A
and B factors are ``nn.Linear`` modules, so every LoRA parameter is covered; so is the
fully trained classification head of a NER model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from finesift.engine.batching import sorted_batches
from finesift.engine.tasks import Task
from finesift.errors import OptionError, check_choice


def trainable_linear_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear, str]]:
    """``(parameter name, owning nn.Linear, "weight"|"bias")`` for every trainable
    parameter, in ``model.named_parameters()`` order. Raises when a trainable parameter
    does not belong to an ``nn.Linear`` (its per-example gradient is not supported)."""
    owner: dict[int, tuple[torch.nn.Linear, str]] = {}
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            for attr in ("weight", "bias"):
                p = getattr(mod, attr, None)
                if p is not None and p.requires_grad:
                    owner[id(p)] = (mod, attr)
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) not in owner:
            raise OptionError(
                f"per-example gradients support trainable nn.Linear parameters only; "
                f"{name!r} is not one"
            )
        mod, attr = owner[id(p)]
        out.append((name, mod, attr))
    return out


def per_example_loss(task: Task, model: torch.nn.Module, batch: dict[str, torch.Tensor], n: int):
    """Token-averaged label NLL of each of the ``n`` rows, shape (n,)."""
    logp, row = task.label_logprobs(model, batch)
    logp = logp.float()
    counts = torch.bincount(row, minlength=n).clamp_min(1).float()
    return -torch.zeros(n, device=logp.device).index_add(0, row, logp) / counts


def _grad_hook(slots: list, slot: int):
    def hook(g: torch.Tensor) -> None:
        while len(slots) <= slot:
            slots.append(None)
        slots[slot] = g.detach()

    return hook


def per_example_grads(
    model: torch.nn.Module,
    task: Task,
    examples: Sequence[Any],
    params: list[tuple[str, torch.nn.Linear, str]],
    device: str = "cpu",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradient of each example's token-averaged loss w.r.t. every trainable parameter.

    One forward and one backward pass over the batch. Returns ``({name: (n, numel)},
    losses (n,))``, fp32, in the order of ``examples``.
    """
    n = len(examples)
    modules = {id(m): m for _, m, _ in params}
    acts: dict[int, list[torch.Tensor]] = {k: [] for k in modules}
    gouts: dict[int, list[torch.Tensor]] = {k: [] for k in modules}
    handles = []

    def fwd_hook(mod, inputs, output):
        x = inputs[0]
        if x.dim() != 3 or x.shape[0] != n:
            raise RuntimeError(
                f"per-example gradients need (batch, seq, features) inputs to linear layers, "
                f"got {tuple(x.shape)}"
            )
        acts[id(mod)].append(x.detach())
        if output.requires_grad:
            output.register_hook(_grad_hook(gouts[id(mod)], len(acts[id(mod)]) - 1))

    for m in modules.values():
        handles.append(m.register_forward_hook(fwd_hook))
    was_training = model.training
    model.eval()
    try:
        batch = {k: v.to(device) for k, v in task.collate(list(examples)).items()}
        with torch.enable_grad():
            losses = per_example_loss(task, model, batch, n)
            tracked = [getattr(m, a) for _, m, a in params]
            # gradients flow only to the hooks; parameter .grad stays untouched
            torch.autograd.grad(losses.sum(), tracked, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        if was_training:
            model.train()
    out: dict[str, torch.Tensor] = {}
    for name, mod, attr in params:
        key = id(mod)
        total = None
        for x, g in zip(acts[key], gouts[key], strict=False):
            if g is None:
                continue
            g = g.float()
            part = torch.einsum("bto,bti->boi", g, x.float()) if attr == "weight" else g.sum(1)
            total = part if total is None else total + part
        numel = getattr(mod, attr).numel()
        out[name] = (
            torch.zeros(n, numel) if total is None else total.reshape(n, numel).cpu()
        )
    return out, losses.detach().cpu()


def batched_grads(
    model, task: Task, examples: Sequence[Any], params, *, batch_size: int, device: str = "cpu",
    max_tokens: int | None = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat per-example gradients (n, P) (parameters concatenated in ``params`` order)
    and losses (n,), computed in length-sorted micro-batches."""
    n = len(examples)
    sizes = [getattr(m, a).numel() for _, m, a in params]
    flat = torch.empty(n, sum(sizes))
    losses = torch.empty(n)
    lengths = [task.length(e) for e in examples]
    for idx in sorted_batches(examples, lengths, batch_size=batch_size, max_tokens=max_tokens):
        grads, loss = per_example_grads(model, task, [examples[i] for i in idx], params, device)
        flat[idx] = torch.cat([grads[name] for name, _, _ in params], dim=1)
        losses[idx] = loss
    return flat, losses


ADAM_FORMULAS = ("reference", "paper")


def adam_direction(
    g: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    betas: tuple[float, float],
    eps: float,
    formula: str = "reference",
) -> torch.Tensor:
    """The Adam update direction if ``g`` (rows: examples) were the next step's gradient.

    Both formulas first fold ``g`` into the moments: m = b1 m + (1-b1) g,
    v = b2 v + (1-b2) g^2.

    - ``reference`` (LESS's released code): m / sqrt(v + eps). No bias correction, and
      eps inside the root floors the denominator at sqrt(eps) (1e-4 for eps = 1e-8).
    - ``paper`` (the Adam update as written): m_hat / (sqrt(v_hat) + eps) with
      m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t), t = step + 1.
    """
    b1, b2 = betas
    m = b1 * exp_avg + (1 - b1) * g
    v = b2 * exp_avg_sq + (1 - b2) * g * g
    if formula == "reference":
        return m / (v + eps).sqrt()
    check_choice(formula, ADAM_FORMULAS, "adam formula", error=ValueError)
    t = step + 1
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    return m_hat / (v_hat.sqrt() + eps)


def as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy().astype(np.float32, copy=False)
