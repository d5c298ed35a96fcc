"""Gradient influence cost: less, less on IProX proxies, tracin and tov side by side.

One process, one pool, one model (SmolLM2-135M by default): every method scores the same
encoded pool against the same target with its own work folder. For each method the
script prints wall and CPU seconds per stage, the peak RSS while it ran (sampled from
/proc every 20 ms; the model and data already loaded count too), the bytes left in its
work folder, the proxy's parameter count, and for each proxy run the overlap of its
top-10% / top-5% with full ``less`` and the Spearman correlation of the scores.

The pool is the bundled demo data (GSM8K problems + ShareGPT first turns, as
``finesift data build demo``), cut to the ``--pool-size`` shortest encoded examples (half
from each source) and the ``--n-target`` shortest GSM8K targets. The defaults are small
(40 pool examples, 4 targets, one warm-up checkpoint, proj_dim 512, an 8-example probe set,
one alignment epoch) because on a 2-core CPU one forward + backward pass of SmolLM2 over a
128-token example takes seconds; at this size the proxy's construction costs about as much
as the gradients it saves, which only pays off on larger pools.

Usage::

    FINESIFT_CACHE=/tmp/fscache python benchmarks/influence_cost.py --out /tmp/influence
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


class PeakRSS:
    """Peak resident memory of this process while the ``with`` block runs."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def top_overlap(a: np.ndarray, b: np.ndarray, share: float) -> float:
    """|top-k(a) & top-k(b)| / k with k = ceil(share * n)."""
    k = max(1, int(np.ceil(share * len(a))))
    ta = set(np.argsort(-a, kind="stable")[:k].tolist())
    tb = set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(ta & tb) / k


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def load_data(args, tokenizer):
    from finesift.api import encode
    from finesift.bundled import build_demo_data
    from finesift.data.readers import load_records

    files = build_demo_data(args.out / "data", n_target=4 * args.n_target,
                            n_gsm8k_pool=2 * args.pool_size, n_sharegpt=2 * args.pool_size,
                            seed=args.seed)
    parts = []
    for key in ("pool_gsm8k", "pool_sharegpt"):
        recs = load_records([files[key]], None, role="pool")
        enc = encode(recs, tokenizer, "lm", max_length=args.max_length)
        order = np.argsort([len(e) for e in enc.examples], kind="stable")
        parts.append([enc.records[i] for i in order[: args.pool_size // 2]])
    pool = encode(parts[0] + parts[1], tokenizer, "lm", max_length=args.max_length)
    trecs = load_records([files["target"]], None, role="target")
    tenc = encode(trecs, tokenizer, "lm", max_length=args.max_length)
    order = np.argsort([len(e) for e in tenc.examples], kind="stable")[: args.n_target]
    target = encode([tenc.records[i] for i in order], tokenizer, "lm", max_length=args.max_length)
    return pool, target


STAGES = {
    "less": ["proxy_seconds_probe", "proxy_seconds_ipsvd", "proxy_seconds_align",
             "seconds_warmup", "seconds_per_example_grads", "seconds_projection"],
    "tov": ["seconds_training", "seconds_scoring"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="work folder (emptied first)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pool-size", type=int, default=40)
    ap.add_argument("--n-target", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--warmup-epochs", type=int, default=1)
    ap.add_argument("--proj-dim", type=int, default=512)
    ap.add_argument("--projection", default="rademacher",
                    help="less/tracin projection: rademacher (the LESS default), gaussian or "
                         "sparse")
    ap.add_argument("--chunk-size", type=int, default=64,
                    help="examples projected together (the projection matrix is generated "
                         "once per chunk)")
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.5, 0.8])
    ap.add_argument("--probe-examples", type=int, default=8)
    ap.add_argument("--align-epochs", type=int, default=1)
    ap.add_argument("--tov-val-epochs", type=float, default=2.0)
    ap.add_argument("--methods", nargs="+", default=["less", "iprox", "tracin", "tov"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 PID prints where it is

    import torch

    torch.set_num_threads(args.threads)
    from finesift.engine.tasks import task_for
    from finesift.methods import MethodContext, get_method
    from finesift.models.loader import load_model

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    t0 = time.perf_counter()
    bundle = load_model(args.model, "lm", seed=args.seed)
    pool, target = load_data(args, bundle.tokenizer)
    n_tok = [len(e) for e in pool.examples]
    print(f"model {args.model}; pool {len(pool.examples)} examples "
          f"({sum(n_tok)} tokens, mean {np.mean(n_tok):.0f}, max {max(n_tok)}), target "
          f"{len(target.examples)} ({sum(len(e) for e in target.examples)} tokens); "
          f"max_length {args.max_length}; torch threads {args.threads}; "
          f"setup {time.perf_counter() - t0:.1f} s", flush=True)
    grad_opts = {"warmup_epochs": args.warmup_epochs, "proj_dim": args.proj_dim,
                 "chunk_size": args.chunk_size, "projection": args.projection}
    proxy_tail = f",probe_examples={args.probe_examples},align_epochs={args.align_epochs}"
    runs: list[tuple[str, str, dict[str, Any]]] = []
    if "less" in args.methods:
        runs.append(("less", "less", grad_opts))
    if "iprox" in args.methods:
        for rho in args.rhos:
            runs.append((f"less+iprox:{rho:g}", "less",
                         {**grad_opts, "proxy": f"iprox:{rho:g}{proxy_tail}"}))
    if "tracin" in args.methods:
        runs.append(("tracin", "tracin", grad_opts))
    if "tov" in args.methods:
        runs.append(("tov (basic)", "tov", {"mode": "basic", "val_epochs": args.tov_val_epochs}))
    print("options:", json.dumps({label: opts for label, _, opts in runs}), flush=True)

    rows = []
    scores: dict[str, np.ndarray] = {}
    for label, method, opts in runs:
        work = args.out / "work" / label.replace(":", "-").replace(" ", "")
        ctx = MethodContext(
            pool=pool.examples, target=target.examples, pool_records=pool.records,
            target_records=target.records, task=task_for("lm", bundle.tokenizer),
            model=bundle.model, model_task="lm", seed=args.seed, precision="fp32",
            batch_size=args.batch_size, workdir=work,
            log=lambda m, label=label: print(f"  [{label}] {m}", flush=True),
        )
        print(f"{label} ...", flush=True)
        meth = get_method(method, opts)
        c0, w0 = time.process_time(), time.perf_counter()
        with PeakRSS() as rss:
            res = meth.score(ctx)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        scores[label] = np.asarray(res.scores, dtype=np.float64)
        info = res.info
        row = {"method": label, "wall_s": wall, "cpu_s": cpu, "peak_rss_mib": rss.peak / 2**20,
               "store_bytes": folder_bytes(work),
               "stages": {k: info[k] for k in STAGES["tov" if method == "tov" else "less"]
                          if k in info},
               "proxy_parameters": info.get("proxy_parameters"),
               "full_parameters": info.get("full_parameters"),
               "proxy_param_ratio": info.get("proxy_param_ratio"),
               "trainable_parameters": info.get("trainable_parameters"),
               "align_epoch_losses": info.get("proxy_align_epoch_losses")}
        rows.append(row)
        (args.out / "results.partial.json").write_text(json.dumps(rows, indent=2))
        print(f"  {label}: {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS "
              f"{row['peak_rss_mib']:.0f} MiB, stages {row['stages']}", flush=True)

    ref = scores.get("less")
    for row in rows:
        s = scores[row["method"]]
        if ref is not None and row["method"] != "less":
            row["top10_overlap"] = top_overlap(s, ref, 0.10)
            row["top5_overlap"] = top_overlap(s, ref, 0.05)
            row["spearman_vs_less"] = spearman(s, ref)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))

    def fmt(v, spec="{:.1f}"):
        return "-" if v is None else spec.format(v)

    print()
    print("| method | wall s | CPU s | stages (wall s) | peak RSS MiB | store MiB | "
          "params (proxy / full) | top-10% overlap | top-5% overlap | Spearman vs less |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        stages = ", ".join(f"{k.replace('proxy_seconds_', 'proxy ').replace('seconds_', '')} "
                           f"{v:.1f}" for k, v in r["stages"].items())
        params = (f"{r['proxy_parameters'] / 1e6:.1f}M / {r['full_parameters'] / 1e6:.1f}M "
                  f"({r['proxy_param_ratio']:.2f})" if r["proxy_parameters"] else "-")
        print(f"| {r['method']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {stages} | "
              f"{r['peak_rss_mib']:.0f} | {r['store_bytes'] / 2**20:.1f} | {params} | "
              f"{fmt(r.get('top10_overlap'), '{:.2f}')} | {fmt(r.get('top5_overlap'), '{:.2f}')} | "
              f"{fmt(r.get('spearman_vs_less'), '{:+.3f}')} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; results in {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
