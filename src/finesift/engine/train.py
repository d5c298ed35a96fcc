"""LoRA adapters and short training loops (one or a few epochs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from finesift.engine.batching import shuffled_batches
from finesift.engine.precision import autocast
from finesift.engine.tasks import Task, task_class


@dataclass
class LoraOptions:
    """LoRA adapter settings.

    Attributes:
        rank: adapter rank r (default 16).
        alpha: scaling numerator; the update is scaled by alpha / rank (default 32).
        dropout: dropout on the adapter input during training (default 0.05).
        target_modules: module names to adapt; ``"all-linear"`` adapts every linear
            layer of the attention and MLP blocks (not the LM head).
    """

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def add_lora(model: torch.nn.Module, task: Any, options: LoraOptions, *, seed: int = 0):
    """Wrap ``model`` with a fresh LoRA adapter (B = 0, so outputs are unchanged).

    For token classification the classification head is trained in full as well
    (``modules_to_save``), since a new head starts random.
    """
    import warnings

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    targets = options.target_modules
    factored = any(getattr(m, "finesift_factored", False) for m in model.modules())
    targets, kwargs = task_class(task).lora_config(model, targets, factored)
    if targets == "all-linear" and factored:
        # an IProX proxy (finesift.models.proxy): peft's "all-linear" matches by the last
        # name component, which would also hit factored layers (not nn.Linear) that share a
        # name with a kept-full layer; list every linear by its full name instead (the one
        # factor of each factored layer that is an nn.Linear, the other being a plain
        # module; every kept-full linear; no LM head or head)
        skip = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head_name = kwargs.get("modules_to_save", [None])[0]
        targets = sorted(
            name for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and mod is not skip
            and not (head_name and name.startswith(head_name))
        )
    cfg = LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=targets,
        bias="none",
        **kwargs,
    )
    with warnings.catch_warnings():
        # peft calls a transformers helper that transformers 5 marks deprecated
        warnings.filterwarnings("ignore", category=FutureWarning)
        return get_peft_model(model, cfg)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every trainable parameter (the adapter, for a LoRA model)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`trainable_state` snapshot back into the model in place."""
    params = dict(model.named_parameters())
    for n, v in state.items():
        params[n].copy_(v)


@dataclass
class TrainOptions:
    """One training phase.

    Attributes:
        lr: learning rate.
        epochs: passes over the data (fractional values stop part-way).
        batch_size: examples per optimiser step.
        optimizer: ``adamw`` or ``sgd``.
        weight_decay: weight decay (AdamW: decoupled; SGD: an L2 penalty lambda/2 |w|^2).
        max_steps: stop after this many steps if set.
        grad_clip: clip the gradient norm (0 = off).
        warmup_steps: raise the learning rate linearly over this many first steps (step
            s < warmup_steps runs at lr * (s + 1) / (warmup_steps + 1); default 0 = off).
        schedule: after the warm-up, ``constant`` (default) or ``linear``: decay linearly
            towards 0 over the remaining steps of this call (the last step still runs at
            a small positive rate).
    """

    lr: float = 1e-4
    epochs: float = 1.0
    batch_size: int = 8
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    max_steps: int | None = None
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"


def lr_factor(step: int, total: int, opts: TrainOptions) -> float:
    """The multiplier of the base learning rate at 0-based ``step`` of ``total`` steps."""
    warm = max(0, int(opts.warmup_steps))
    if step < warm:
        return (step + 1) / (warm + 1)
    if opts.schedule == "linear":
        return max(total - step, 1) / max(total - warm, 1)
    if opts.schedule != "constant":
        raise ValueError(f"schedule must be 'constant' or 'linear', got {opts.schedule!r}")
    return 1.0


def make_optimizer(params: Sequence[torch.nn.Parameter] | Sequence[dict[str, Any]],
                   opts: TrainOptions, lr: float):
    """AdamW or SGD over ``params``: parameters, or torch parameter groups (dicts with
    ``params``; an optional ``lr_scale`` multiplies the learning rate :func:`train` sets
    on that group, e.g. a larger rate for a new classification head)."""
    if opts.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=opts.weight_decay)
    if opts.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=opts.weight_decay)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {opts.optimizer!r}")


def train(
    model: torch.nn.Module,
    task: Task,
    examples: Sequence[Any],
    opts: TrainOptions,
    *,
    lr: float | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    param_groups: Sequence[dict[str, Any]] | None = None,
    seed: int = 0,
    precision: str = "auto",
    device: str = "cpu",
    progress: bool = False,
    desc: str = "training",
) -> dict[str, Any]:
    """Train the trainable parameters of ``model`` on ``examples``.

    The loss is the mean over the batch of each example's token-averaged log-loss, the
    same loss the methods score and the evaluation reports.

    Args:
        model: the model; only parameters with ``requires_grad`` change.
        task: batches examples and computes label log-probs.
        examples: training examples.
        opts: learning rate, epochs, batch size, optimiser.
        lr: overrides ``opts.lr`` (e.g. a per-round learning rate).
        optimizer: continue with this optimiser (its state carries over); a new one
            is made otherwise. Its learning rate is set to ``lr`` (times a group's
            ``lr_scale``, times the warm-up / decay factor of ``opts``).
        param_groups: for a new optimiser: parameter groups (dicts with ``params`` and
            optionally ``lr_scale``) instead of one group of every trainable parameter.
        seed: seeds the shuffling.
    Returns:
        ``{"steps", "mean_loss", "optimizer"}``.
    """
    lr = opts.lr if lr is None else lr
    if optimizer is None and param_groups is not None:
        params = [p for g in param_groups for p in g["params"]]
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    if optimizer is None:
        optimizer = make_optimizer(list(param_groups) if param_groups is not None else params,
                                   opts, lr)
    rng = np.random.default_rng(seed)
    n = len(examples)
    steps_per_epoch = (n + opts.batch_size - 1) // opts.batch_size
    total = int(np.ceil(opts.epochs * steps_per_epoch))
    if opts.max_steps is not None:
        total = min(total, opts.max_steps)

    def set_lr(step: int) -> None:
        factor = lr_factor(step, total, opts)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0) * factor

    set_lr(0)
    model.train()
    losses: list[float] = []
    step = 0
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="step")
    try:
        while step < total:
            for idx in shuffled_batches(n, batch_size=opts.batch_size, rng=rng):
                if step >= total:
                    break
                batch = {k: v.to(device) for k, v in task.collate([examples[i] for i in idx]).items()}
                with autocast(precision, device):
                    logp, row = task.label_logprobs(model, batch)
                logp = logp.float()
                counts = torch.bincount(row, minlength=len(idx)).clamp_min(1).float()
                per_ex = -torch.zeros(len(idx), device=logp.device).index_add(0, row, logp) / counts
                loss = per_ex.mean()
                optimizer.zero_grad(set_to_none=True)
                set_lr(step)
                loss.backward()
                if opts.grad_clip and opts.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
                optimizer.step()
                losses.append(float(loss.detach()))
                step += 1
                bar.update(1)
    finally:
        bar.close()
        model.eval()
    return {
        "steps": step,
        "mean_loss": float(np.mean(losses)) if losses else float("nan"),
        "optimizer": optimizer,
    }
