"""Seeded random projections of gradients (TRAK's projector role), shared by ``less`` and
``tracin``: :class:`Projector` (dense Rademacher or Gaussian, or a block sparse JL
transform) applied block by block, each block regenerated from its own seed, and the
Johnson-Lindenstrauss dimension rule (:func:`jl_dim`, :func:`jl_eps`)."""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import Any

import torch

from finesift.errors import OptionError, check_choice

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
        check_choice(kind, PROJECTIONS, "projection")
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
