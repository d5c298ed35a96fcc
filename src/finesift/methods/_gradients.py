"""Per-example LoRA gradients, Adam preconditioning and seeded random projections.

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

import hashlib
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from finesift.engine.batching import sorted_batches
from finesift.engine.tasks import Task
from finesift.errors import OptionError


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
    if formula != "paper":
        raise ValueError(f"adam formula must be one of {', '.join(ADAM_FORMULAS)}, got {formula!r}")
    t = step + 1
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    return m_hat / (v_hat.sqrt() + eps)


_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _block_seed(seed: int, block: int) -> int:
    h = hashlib.sha256(f"finesift-projection|{seed}|{block}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


PROJECTIONS = ("rademacher", "gaussian", "sparse")


class Projector:
    """A seeded random projection R (P x d) applied block by block.

    ``rademacher``: entries +-1/sqrt(d); ``gaussian``: N(0, 1/d). Both are dense, so
    projecting one example costs 2 P d FLOPs and the entries of R are generated again for
    every chunk of examples unless R is small. ``sparse``: a block sparse JL transform
    (Kane and Nelson 2014; TRAK's CUDA projector on GPUs plays the same role): the d
    outputs are cut into ``sparsity`` = s blocks of d / s, and every input coordinate
    lands in one random position of each block with a random sign, scaled 1/sqrt(s); a
    projection then costs s additions per input coordinate instead of d multiply-adds.
    All three satisfy E[<R^T x, R^T y>] = <x, y>.

    R is never materialised whole unless it is small: rows are cut into blocks of at
    most ``block_elems`` entries (dense) or ``block_elems // s`` rows (sparse), each
    generated from its own seeded generator (so any block can be regenerated
    independently). Blocks are kept in memory when the whole matrix has at most
    ``cache_elems`` stored entries (P d dense, P s sparse).
    """

    def __init__(
        self,
        n_in: int,
        dim: int,
        kind: str = "rademacher",
        seed: int = 0,
        *,
        block_elems: int = 1 << 22,
        cache_elems: int = 1 << 26,
        sparsity: int = 8,
    ) -> None:
        if kind not in PROJECTIONS:
            raise OptionError(f"projection must be one of {', '.join(PROJECTIONS)}, got {kind!r}")
        self.n_in, self.dim, self.kind, self.seed = int(n_in), int(dim), kind, int(seed)
        self.sparsity = int(sparsity)
        if kind == "sparse":
            if self.sparsity < 1 or self.dim % self.sparsity:
                raise OptionError(f"sparse projection: proj_dim {self.dim} must be a multiple of "
                                  f"sparsity {self.sparsity}")
            self.rows = max(1, block_elems // self.sparsity)
            stored = self.n_in * self.sparsity
        else:
            self.rows = max(1, block_elems // self.dim)
            stored = self.n_in * self.dim
        self.n_blocks = math.ceil(self.n_in / self.rows)
        self.cache: dict[int, Any] | None = {} if stored <= cache_elems else None

    def sparse_block(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``j * rows ...`` of a ``sparse`` R: output positions (rows, s) and the
        signed values (rows, s)."""
        r0 = j * self.rows
        rows = min(self.rows, self.n_in - r0)
        s = self.sparsity
        width = self.dim // s
        gen = torch.Generator().manual_seed(_block_seed(self.seed, j))
        pos = torch.randint(0, width, (rows, s), generator=gen, dtype=torch.int64)
        pos += torch.arange(s, dtype=torch.int64) * width
        sign = torch.randint(0, 2, (rows, s), generator=gen, dtype=torch.int64)
        val = sign.float().mul_(2.0 / math.sqrt(s)).sub_(1.0 / math.sqrt(s))
        return pos, val

    def sparse_block_t(self, j: int) -> torch.Tensor:
        """The transpose of rows ``j * rows ...`` of a ``sparse`` R as a CSR matrix
        (d, rows), built directly (sorted by output position, no coalescing)."""
        if self.cache is not None and j in self.cache:
            return self.cache[j]
        pos, val = self.sparse_block(j)
        rows = pos.shape[0]
        flat = pos.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.dim)
        crow = torch.zeros(self.dim + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=crow[1:])
        col = torch.div(order, self.sparsity, rounding_mode="floor")
        with warnings.catch_warnings():  # "sparse CSR support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            mat = torch.sparse_csr_tensor(crow, col, val.reshape(-1)[order], (self.dim, rows),
                                          check_invariants=False)
        if self.cache is not None:
            self.cache[j] = mat
        return mat

    def block(self, j: int) -> torch.Tensor:
        if self.cache is not None and j in self.cache:
            return self.cache[j]
        r0 = j * self.rows
        rows = min(self.rows, self.n_in - r0)
        gen = torch.Generator().manual_seed(_block_seed(self.seed, j))
        if self.kind == "rademacher":
            # 8 random signs per draw: unpack the bits of uniform random bytes, in uint8
            # (6x faster than unpacking 32-bit draws in int64, which moved 8 bytes per sign)
            count = rows * self.dim
            r = torch.randint(0, 256, ((count + 7) // 8,), generator=gen, dtype=torch.uint8)
            bits = ((r[:, None] >> _SHIFTS) & 1).reshape(-1)[:count].reshape(rows, self.dim)
            scale = 1.0 / math.sqrt(self.dim)
            R = bits.float().mul_(2 * scale).sub_(scale)
        else:
            R = torch.randn(rows, self.dim, generator=gen) / math.sqrt(self.dim)
        if self.cache is not None:
            self.cache[j] = R
        return R

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Project rows of ``x`` (n, P) to (n, d)."""
        if x.shape[1] != self.n_in:
            raise ValueError(f"expected {self.n_in} columns, got {x.shape[1]}")
        x = x.float()
        if self.kind == "sparse":  # (d, rows) CSR @ (rows, n) dense, block by block
            out_t = torch.zeros(self.dim, x.shape[0], dtype=torch.float32)
            for j in range(self.n_blocks):
                r0 = j * self.rows
                out_t += self.sparse_block_t(j) @ x[:, r0 : r0 + self.rows].T.contiguous()
            return out_t.T.contiguous()
        out = torch.zeros(x.shape[0], self.dim, dtype=torch.float32)
        for j in range(self.n_blocks):
            r0 = j * self.rows
            out += x[:, r0 : r0 + self.rows] @ self.block(j)
        return out


def jl_dim(n_points: int, eps: float, delta: float = 0.01) -> int:
    """A d for which a Rademacher/Gaussian projection preserves all pairwise inner
    products of ``n_points`` unit vectors within ``eps`` with probability 1 - delta
    (d >= 8 ln(n^2 / delta) / eps^2; Achlioptas 2003 constants, rounded up)."""
    return math.ceil(8 * math.log(n_points**2 / delta) / eps**2)


def jl_eps(n_points: int, dim: int, delta: float = 0.01) -> float:
    """The inverse of :func:`jl_dim`: the distortion bound eps for this d."""
    return math.sqrt(8 * math.log(n_points**2 / delta) / dim)


def as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy().astype(np.float32, copy=False)
