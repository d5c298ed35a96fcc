"""GPU check: the demo selection on the GPU and on the CPU, compared.

    python benchmarks/gpu_check.py [--pool 100] [--methods tov,less,embed]
                                   [--model smollm2-135m] [--dtype fp32|bf16|auto]
                                   [--precision fp32|auto] [--out FILE.json]

On a machine with a CUDA GPU, for each method (``tov``, ``less``, ``embed`` by default):

1. ``finesift.select`` runs the README's demo selection (bundled GSM8K target, a pool of
   ShareGPT first turns plus other GSM8K problems, the default model SmolLM2-135M-
   Instruct) on a subsample of ``--pool`` examples, once with ``--device cuda`` and once
   on the CPU, with the same seed and options;
2. the two score vectors are compared: Spearman correlation (scipy), the largest absolute
   difference, and the share of the budget both runs selected.

Then the scoring pass itself (:func:`finesift.engine.scoring.token_logprobs`, what ToV runs
over the pool) is timed on the GPU with the model loaded in bf16 and in fp32, and its
achieved FLOP/s (``benchmarks/throughput.py``'s count) set against the GPU's measured bf16
matmul peak (``torch.mm`` of large square bf16 matrices, best of several runs).

One table is printed (and with ``--out`` written as JSON). On a machine without CUDA the
script says so and exits 0. ``--dtype`` and ``--precision`` apply to the GPU run (default
fp32 and no autocast on both devices, so any difference is the device's own rounding;
``--dtype auto`` checks bf16 weights where the methods allow them). ``--devices A,B``
compares two other devices and ``--quick`` swaps in a tiny random model and a small pool
(both for testing the script itself on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# per method: options that keep the CPU run short without changing what is computed
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "tov": {"mode": "basic", "val_epochs": 1.0},
    "less": {"projection": "sparse", "proj_dim": 2048, "warmup_epochs": 2},
    "embed": {},
}
BUDGET = 25
N_TARGET = 16


# ------------------------------------------------------------------------------ data
def demo_files(folder: Path, pool: int, seed: int = 0) -> dict[str, Path]:
    """The demo's files with a pool of ``pool`` examples (a quarter GSM8K, the rest
    ShareGPT first turns) and ``N_TARGET`` target problems."""
    from finesift.bundled import build_demo_data

    n_gsm8k = max(1, pool // 4)
    return build_demo_data(folder, n_target=N_TARGET, n_gsm8k_pool=n_gsm8k,
                           n_sharegpt=max(1, pool - n_gsm8k), seed=seed)


def quick_model(folder: Path) -> str:
    """A tiny random causal LM saved to ``folder`` (``--quick``)."""
    from finesift.bundled import gsm8k_records
    from finesift.testing import tiny_causal_lm, tiny_tokenizer

    if not (folder / "config.json").exists():
        words = sorted({w.strip(".,?!:;()$").lower() for r in gsm8k_records()[:50]
                        for w in str(r.get("question", "")).split()} - {""})
        tok = tiny_tokenizer(words[:300])
        tiny_causal_lm(len(tok), hidden=32, layers=2).save_pretrained(folder)
        tok.save_pretrained(folder)
    return str(folder)


# ------------------------------------------------------------------------------ runs
def run_method(method: str, device: str, files: dict[str, Path], out: Path, *,
               model: str | None, dtype: str, precision: str, max_length: int,
               budget: int) -> dict[str, Any]:
    """One ``finesift.select`` run: its scores by pool id, what it selected and its cost."""
    import finesift

    t0 = time.perf_counter()
    sel = finesift.select(
        [files["pool_sharegpt"], files["pool_gsm8k"]], files["target"], budget=budget,
        method=method, method_options=METHOD_OPTIONS.get(method, {}), model=model,
        device=device, dtype=dtype, precision=precision, max_length=max_length, out=out)
    man = sel.manifest
    return {
        "method": method, "device": device, "dtype": man.get("dtype"),
        "seconds": round(time.perf_counter() - t0, 2),
        "score_seconds": man["stages"]["score"]["seconds"],
        "peak_rss_mb": man.get("peak_rss_mb"), "peak_gpu_mb": man.get("peak_gpu_mb"),
        "scores": dict(zip((r.id for r in sel.pool), map(float, sel.scores), strict=True)),
        "selected": sel.selected_ids,
    }


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Spearman correlation and largest absolute difference of two runs' scores (over
    the pool ids both scored), and the share of the selection they agree on."""
    from scipy.stats import spearmanr

    ids = sorted(set(a["scores"]) & set(b["scores"]))
    x = np.array([a["scores"][i] for i in ids])
    y = np.array([b["scores"][i] for i in ids])
    if len(ids) > 1 and np.ptp(x) > 0 and np.ptp(y) > 0:
        rho = float(spearmanr(x, y).statistic)
    else:
        rho = 1.0 if np.array_equal(x, y) else float("nan")
    k = max(1, len(a["selected"]))
    return {"n": len(ids), "spearman": rho,
            "max_abs_diff": float(np.max(np.abs(x - y))) if ids else float("nan"),
            "selection_overlap": len(set(a["selected"]) & set(b["selected"])) / k}


# ------------------------------------------------------------------------------ throughput
def matmul_peak(device: str, *, sizes: tuple[int, ...] = (4096, 8192),
                repeats: int = 10) -> float:
    """Best bf16 FLOP/s of ``a @ b`` (n x n) on ``device``."""
    import torch

    if not device.startswith("cuda"):
        import throughput

        return throughput.matmul_peak(torch.bfloat16, sizes=sizes, repeats=repeats)["flops"]
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        torch.mm(a, b)
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            torch.cuda.synchronize(device)
            best = max(best, 2 * n**3 / (start.elapsed_time(end) / 1000.0))
        del a, b
    return best


def scoring_throughput(model: str | None, device: str, dtype: str, peak: float, *,
                       n: int, length: int, batch_size: int | str) -> dict[str, Any]:
    """Examples/s and FLOP/s of one scoring pass over ``n`` examples of ``length`` tokens
    with the model loaded in ``dtype`` on ``device`` (best of 3), against ``peak``."""
    import throughput
    import torch

    from finesift.engine.scoring import token_logprobs
    from finesift.engine.tasks import task_for
    from finesift.models.loader import load_model

    bundle = load_model(model, "lm", dtype=dtype, device=device)
    task = task_for("lm", bundle.tokenizer)
    examples = throughput.make_examples(bundle.tokenizer, n, length)
    dims = throughput.model_dims(bundle.model)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    token_logprobs(bundle.model, task, examples[: max(1, n // 4)], batch_size=batch_size,
                   precision="fp32", device=device)  # warm-up
    best = float("inf")
    for _ in range(3):
        sync()
        t = time.perf_counter()
        token_logprobs(bundle.model, task, examples, batch_size=batch_size, precision="fp32",
                       device=device)
        sync()
        best = min(best, time.perf_counter() - t)
    flops = throughput.forward_flops(dims, [len(e) for e in examples],
                                     [int(e.n_label_tokens) for e in examples])
    del bundle
    return {"dtype": dtype, "examples": n, "tokens_per_example": length,
            "seconds": round(best, 4), "examples_per_s": n / best,
            "achieved_flops": flops / best, "peak_bf16_flops": peak,
            "ratio_to_peak": flops / best / peak}


# ------------------------------------------------------------------------------ table
def _flops(x: float) -> str:
    return f"{x / 1e12:.2f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.1f} GFLOP/s"


def table(rows: list[dict[str, Any]], speed: list[dict[str, Any]], devices: list[str]) -> str:
    """One table: per method the two devices' seconds and memory and their agreement,
    then the scoring pass's throughput rows."""
    a, b = devices
    head = (f"{'method':8s} {'dtype':5s} {a + ' s':>9s} {b + ' s':>9s} {'GPU MB':>8s} "
            f"{'RSS MB':>8s} {'spearman':>9s} {'max|diff|':>10s} {'same sel':>9s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        c = r["compare"]
        gpu = r["a"]["peak_gpu_mb"]
        lines.append(
            f"{r['method']:8s} {r['a']['dtype']!s:5s} {r['a']['score_seconds']:9.1f} "
            f"{r['b']['score_seconds']:9.1f} {('-' if gpu is None else f'{gpu:.0f}'):>8s} "
            f"{r['a']['peak_rss_mb'] or 0:8.0f} {c['spearman']:9.4f} {c['max_abs_diff']:10.2e} "
            f"{c['selection_overlap']:9.0%}")
    for s in speed:
        lines.append(
            f"{'scoring':8s} {s['dtype']:5s} {s['examples_per_s']:9.1f} ex/s on {a}, "
            f"{_flops(s['achieved_flops'])} = {s['ratio_to_peak']:.1%} of the bf16 matmul "
            f"peak ({_flops(s['peak_bf16_flops'])})")
    lines.append(f"(score seconds: the scoring stage of each run; GPU MB / RSS MB: peaks of "
                 f"the {a} run; same sel: share of the budget both runs selected)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", type=int, default=100, help="pool examples (default 100)")
    p.add_argument("--methods", default="tov,less,embed")
    p.add_argument("--model", default=None, help="default: the task's (smollm2-135m)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="dtype of the first device's run (default fp32)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="autocast of both runs (default fp32: none)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--devices", default="cuda,cpu",
                   help="the two devices compared (default cuda,cpu)")
    p.add_argument("--throughput-examples", type=int, default=256)
    p.add_argument("--quick", action="store_true",
                   help="tiny random model and a small pool (tests the script)")
    p.add_argument("--out", default=None, help="also write the figures as JSON")
    args = p.parse_args(argv)

    import torch

    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if len(devices) != 2:
        p.error("--devices takes two devices, e.g. cuda,cpu")
    if any(d.startswith("cuda") for d in devices) and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU present (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda or 'none'}); nothing to check")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    pool = min(args.pool, 40) if args.quick else args.pool
    budget = min(BUDGET, max(1, pool // 4))
    with tempfile.TemporaryDirectory(prefix="finesift-gpu-check-") as tmp:
        work = Path(tmp)
        files = demo_files(work / "data", pool)
        model = quick_model(work / "tiny") if args.quick else args.model
        max_length = 64 if args.quick else args.max_length
        if devices[0].startswith("cuda"):
            name = torch.cuda.get_device_name(devices[0])
            print(f"gpu_check: {name}; pool {pool}, budget {budget}, methods "
                  f"{', '.join(methods)}", flush=True)
        rows = []
        for method in methods:
            runs = []
            for j, device in enumerate(devices):
                print(f"  {method} on {device} ...", flush=True)
                runs.append(run_method(
                    method, device, files, work / f"{method}-{j}", model=model,
                    dtype=args.dtype if j == 0 else "fp32", precision=args.precision,
                    max_length=max_length, budget=budget))
            rows.append({"method": method, "a": runs[0], "b": runs[1],
                         "compare": compare(runs[0], runs[1])})
        peak = matmul_peak(devices[0], sizes=(256,) if args.quick else (4096, 8192))
        n = 16 if args.quick else args.throughput_examples
        length = 32 if args.quick else 256
        speed = [scoring_throughput(model, devices[0], dt, peak, n=n, length=length,
                                    batch_size="auto:4GiB")
                 for dt in ("bf16", "fp32")]
    print(table(rows, speed, devices))
    if args.out:
        for r in rows:
            for side in ("a", "b"):
                r[side] = {k: v for k, v in r[side].items() if k not in ("scores", "selected")}
        Path(args.out).write_text(json.dumps({"devices": devices, "methods": rows,
                                              "throughput": speed}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
