"""Cost of LESS's random projection on CPU: dense Rademacher blocks versus the sparse JL
transform (``-o projection=sparse``), side by side in one run, plus how well each keeps
inner products.

    python benchmarks/projection.py                # P = 1M gradient entries, d = 8192
    python benchmarks/projection.py --params 4900000   # SmolLM2-135M's rank-16 LoRA

A dense projection regenerates its P x d matrix for every chunk of examples when the
matrix is too large to keep (P d = 8.2G entries at P = 1M); its time is measured on a
slice of ``--dense-fraction`` of the columns and scaled up linearly (generation and the
matmul are both linear in P). The sparse transform keeps its P s nonzeros and costs one
CSR matmul per chunk.
"""

from __future__ import annotations

import argparse
import time

import torch

from finesift.engine.projection import Projector, jl_eps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=int, default=1_000_000, help="P, gradient entries")
    ap.add_argument("--dim", type=int, default=8192, help="d, projected dimension")
    ap.add_argument("--chunk", type=int, default=32, help="examples per projected chunk")
    ap.add_argument("--sparsity", type=int, default=8)
    ap.add_argument("--dense-fraction", type=float, default=0.02)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    P, d, n = args.params, args.dim, args.chunk
    torch.manual_seed(0)
    x = torch.randn(n, P)
    print(f"P = {P:,}, d = {d}, chunk = {n} examples, torch threads = {torch.get_num_threads()}")

    sparse = Projector(P, d, "sparse", seed=0, sparsity=args.sparsity)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        sparse(x)
        times.append(time.perf_counter() - t)
    first, rest = times[0], min(times[1:]) if len(times) > 1 else times[0]

    cols = max(1, int(P * args.dense_fraction))
    dense = Projector(cols, d, "rademacher", seed=0, cache_elems=0)
    t = time.perf_counter()
    dense(x[:, :cols])
    dense_s = (time.perf_counter() - t) * P / cols

    # inner products of the chunk's (normalised) rows, exact vs sparse-projected
    xn = torch.nn.functional.normalize(x.double(), dim=1)
    yn = sparse(xn.float()).double()
    err = (yn @ yn.T - xn @ xn.T).abs().max().item()
    print(f"{'projection':<28}{'s per chunk':>14}{'s per example':>16}")
    print(f"{'sparse, first chunk':<28}{first:>14.2f}{first / n:>16.3f}   (builds the CSR blocks)")
    print(f"{'sparse, later chunks':<28}{rest:>14.2f}{rest / n:>16.3f}")
    print(f"{'dense rademacher (scaled)':<28}{dense_s:>14.1f}{dense_s / n:>16.2f}   "
          f"(measured on {cols:,} columns)")
    print(f"speed-up of sparse over dense: {dense_s / rest:.0f}x")
    print(f"max inner-product error of sparse on {n} unit vectors: {err:.4f} "
          f"(JL bound at d={d}: {jl_eps(n, d):.4f})")


if __name__ == "__main__":
    main()
