"""IProX proxy cost: per-example LoRA gradients on the model and on its proxies, and the
proxy build split into its stages.

One process, one model (SmolLM2-135M by default). For the full model and for an IProX
proxy at each ``--rhos`` value (``less``'s proxy, :mod:`finesift.models.proxy`) the
script times:

* per-example LoRA gradients, as ``less`` takes them (``_gradients.per_example_grads``:
  one forward and one backward pass per batch, LoRA rank ``--lora-rank`` on every adapted
  linear, the per-example outer products), over ``--examples`` real demo examples
  (GSM8K problems and ShareGPT first turns, the shortest of each) in batches of
  ``--batch-size``, ``--repeats`` times after one untimed warm-up batch; and their
  projection to ``--proj-dim`` (``--projection``);
* the proxy build (``build_proxy`` into an empty cache folder): the probe pass
  (covariances), the copy of the model, IPSVD split into Cholesky factors, whitening, the
  rank-r SVD (``--svd``: randomized, exact, or both as separate rows) and the triangular
  solves, and the gradient alignment (the build's total includes the cache key and the
  save); then the load of the same proxy from that cache.

Gradient and projection times are those of the fastest of the ``--repeats`` repeats (wall;
the gradients' CPU time too), the least disturbed by other processes.

It prints a table with the ratios to the full model side by side (and a JSON copy to
``--out``/results.json). It asserts nothing. ``--tiny`` runs the same on the tiny random
Llama of the tests (a check that the script works; its figures mean little).

Usage::

    FINESIFT_CACHE=/tmp/fscache python benchmarks/proxy_cost.py --out /tmp/proxy_cost
    python benchmarks/proxy_cost.py --tiny --out /tmp/proxy_cost_tiny
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np


def load_examples(args, tokenizer) -> list[Any]:
    """The ``--examples`` shortest encoded demo examples, half GSM8K, half ShareGPT."""
    from finesift.api import encode
    from finesift.bundled import build_demo_data
    from finesift.data.readers import load_records

    n = args.examples
    files = build_demo_data(args.out / "data", n_target=4, n_gsm8k_pool=2 * n,
                            n_sharegpt=2 * n, seed=args.seed)
    out = []
    for key, take in (("pool_gsm8k", (n + 1) // 2), ("pool_sharegpt", n // 2)):
        recs = load_records([files[key]], None, role="pool")
        enc = encode(recs, tokenizer, "lm", max_length=args.max_length)
        order = np.argsort([len(e) for e in enc.examples], kind="stable")
        out += [enc.examples[i] for i in order[:take]]
    return out


def grad_cost(model, task, examples, args) -> dict[str, Any]:
    """Seconds per example of per-example LoRA gradients and of their projection, with the
    adapter's size (the adapter is removed again)."""
    import torch

    from finesift.engine.batching import sorted_batches
    from finesift.engine.projection import Projector
    from finesift.engine.train import LoraOptions, add_lora
    from finesift.methods import _gradients as G

    lora = add_lora(model, "lm", LoraOptions(rank=args.lora_rank, alpha=2 * args.lora_rank,
                                             dropout=0.0), seed=args.seed)
    try:
        params = G.trainable_linear_params(lora)
        P = sum(getattr(m, a).numel() for _, m, a in params)
        adapted = len({id(m) for _, m, _ in params}) // 2  # lora_A and lora_B per linear
        lengths = [task.length(e) for e in examples]
        batches = list(sorted_batches(examples, lengths, batch_size=args.batch_size,
                                      max_tokens=4096))
        G.per_example_grads(lora, task, [examples[i] for i in batches[0]], params)  # warm-up
        projector = Projector(P, args.proj_dim, args.projection, seed=args.seed,
                              sparsity=args.sparsity)
        # per repeat: wall and CPU seconds of all batches; the fastest repeat is kept
        # (the least disturbed by other processes on a shared machine)
        best = {"grad": np.inf, "grad_cpu": np.inf, "proj": np.inf}
        for _ in range(args.repeats):
            rep = dict.fromkeys(best, 0.0)
            for idx in batches:
                w0, c0 = time.perf_counter(), time.process_time()
                grads, _ = G.per_example_grads(lora, task, [examples[i] for i in idx], params)
                flat = torch.cat([grads[name] for name, _, _ in params], dim=1)
                w1, c1 = time.perf_counter(), time.process_time()
                projector(flat)
                rep["proj"] += time.perf_counter() - w1
                rep["grad"] += w1 - w0
                rep["grad_cpu"] += c1 - c0
            best = {k: min(v, rep[k]) for k, v in best.items()}
        n = len(examples)
        return {"lora_parameters": int(P), "adapted_linears": adapted,
                "grad_s_per_example": best["grad"] / n,
                "grad_cpu_s_per_example": best["grad_cpu"] / n,
                "proj_s_per_example": best["proj"] / n}
    finally:
        lora.unload()


BUILD_STAGES = ["probe", "copy", "ipsvd_cholesky", "ipsvd_whiten", "ipsvd_svd", "ipsvd_solve",
                "align"]


def build_cost(model, task, pool, rho: float, svd: str, args) -> tuple[Any, dict[str, Any]]:
    """``(proxy, figures)``: the build's stages (saving to a fresh cache folder at the
    end), then a load of the same proxy from that cache."""
    from finesift.models import proxy as ipx

    opts = ipx.IProxOptions(rho=rho, probe_examples=args.probe_examples,
                            align_epochs=args.align_epochs, svd=svd, block_size=args.block_size)
    cache = args.out / "proxy-cache" / f"{rho:g}-{svd}"
    t0 = time.perf_counter()
    proxy, info = ipx.build_proxy(model, task, pool, opts, seed=args.seed,
                                  batch_size=args.batch_size, cache=cache)
    total = time.perf_counter() - t0
    stages = {s: info.get(f"proxy_seconds_{s}", 0.0) for s in BUILD_STAGES}
    t1 = time.perf_counter()
    _, loaded = ipx.build_proxy(model, task, pool, opts, seed=args.seed,
                                batch_size=args.batch_size, cache=cache)
    load_s = time.perf_counter() - t1
    return proxy, {"build_s": total, **stages,
                   "cache_load_s": load_s if loaded["proxy_cached"] else float("nan"),
                   "factored": info["proxy_layers_factored"],
                   "parameters": info.get("proxy_parameters", 0),
                   "param_ratio": info.get("proxy_param_ratio", 1.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="work folder (emptied first)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tiny", action="store_true",
                    help="the tiny random Llama of the tests instead of --model")
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    ap.add_argument("--svd", choices=["randomized", "exact", "both"], default="randomized")
    ap.add_argument("--examples", type=int, default=16, help="examples whose gradients are timed")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--proj-dim", type=int, default=8192)
    ap.add_argument("--projection", default="sparse")
    ap.add_argument("--sparsity", type=int, default=8)
    ap.add_argument("--probe-examples", type=int, default=8,
                    help="probe set of the build (drawn from the timed examples' pool)")
    ap.add_argument("--align-epochs", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from finesift.engine.tasks import task_class, task_for
    from finesift.models.loader import load_model

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    t0 = time.perf_counter()
    if args.tiny:
        model, tokenizer = task_class("lm").tiny_model(["please", "continue"])
        name = "tiny random Llama (tests)"
    else:
        bundle = load_model(args.model, "lm", seed=args.seed)
        model, tokenizer, name = bundle.model, bundle.tokenizer, args.model
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    task = task_for("lm", tokenizer)
    examples = load_examples(args, tokenizer)
    n_tok = [len(e) for e in examples]
    print(f"model {name}; {len(examples)} examples ({sum(n_tok)} tokens, mean "
          f"{np.mean(n_tok):.0f}, max {max(n_tok)}), batch {args.batch_size}, x{args.repeats}; "
          f"LoRA r={args.lora_rank}; projection {args.projection} d={args.proj_dim}; "
          f"probe {args.probe_examples}, align_epochs {args.align_epochs}; torch threads "
          f"{args.threads}; setup {time.perf_counter() - t0:.1f} s", flush=True)

    rows: list[dict[str, Any]] = []
    full = {"label": "full", **grad_cost(model, task, examples, args),
            "parameters": sum(p.numel() for p in model.parameters()), "param_ratio": 1.0}
    rows.append(full)
    print(f"  full: {json.dumps({k: v for k, v in full.items() if k != 'label'})}", flush=True)
    modes = ["randomized", "exact"] if args.svd == "both" else [args.svd]
    for rho in args.rhos:
        for svd in modes:
            label = f"iprox:{rho:g}" + (f",svd={svd}" if len(modes) > 1 else "")
            proxy, build = build_cost(model, task, examples, rho, svd, args)
            row = {"label": label, **build, **grad_cost(proxy, task, examples, args)}
            del proxy
            rows.append(row)
            print(f"  {label}: {json.dumps({k: v for k, v in row.items() if k != 'label'})}",
                  flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))

    def ratio(row: dict[str, Any], key: str) -> str:
        return f"{row[key] / full[key]:.2f}" if full.get(key) else "-"

    print()
    print("| model | params (ratio) | adapted linears | LoRA params (ratio) | grads ms/ex (ratio) "
          "| grads CPU ms/ex (ratio) | projection ms/ex (ratio) | grads+proj ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        both = ((r["grad_s_per_example"] + r["proj_s_per_example"])
                / (full["grad_s_per_example"] + full["proj_s_per_example"]))
        print(f"| {r['label']} | {r['parameters'] / 1e6:.2f}M ({r['param_ratio']:.2f}) "
              f"| {r['adapted_linears']} | {r['lora_parameters']:,} ({ratio(r, 'lora_parameters')}) "
              f"| {1e3 * r['grad_s_per_example']:.1f} ({ratio(r, 'grad_s_per_example')}) "
              f"| {1e3 * r['grad_cpu_s_per_example']:.1f} ({ratio(r, 'grad_cpu_s_per_example')}) "
              f"| {1e3 * r['proj_s_per_example']:.2f} ({ratio(r, 'proj_s_per_example')}) "
              f"| {both:.2f} |")
    print()
    print("| proxy | layers factored | build s | " + " | ".join(BUILD_STAGES)
          + " | cache load s | build / full grads of the timed examples |")
    print("|---|---|---|" + "---|" * len(BUILD_STAGES) + "---|---|")
    for r in rows[1:]:
        per_full = full["grad_s_per_example"] * len(examples)
        print(f"| {r['label']} | {r['factored']} | {r['build_s']:.2f} | "
              + " | ".join(f"{r[s]:.2f}" for s in BUILD_STAGES)
              + f" | {r['cache_load_s']:.2f} | {r['build_s'] / per_full:.1f} |")


if __name__ == "__main__":
    main()
