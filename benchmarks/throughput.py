"""Scoring throughput against this machine's measured matmul peak.

    python benchmarks/throughput.py [--quick] [--out FILE.json] [--threads N] [--sweep]
                                    [--lengths 128 256] [--batch-size auto]
                                    [--processes N]

In one run, for each precision (bf16, then fp32), back to back:

1. the machine's matmul peak: ``torch.mm`` and ``F.linear`` of square matrices (2048 and
   4096; best of several runs) on torch's threads, in that precision (bf16 inputs for
   bf16);
2. the scoring pass ToV runs on the pool (:func:`finesift.engine.scoring.token_logprobs`,
   the same call :func:`finesift.methods.tov.score_examples` makes) of the default model
   SmolLM2-135M on examples of 128 and 256 tokens of GSM8K text whose second half is
   label tokens (a prompt and its answer): examples/s, tokens/s, achieved FLOP/s and the
   ratio to the peak of the same precision. ``bf16`` is the engine's autocast (weights in
   fp32, matmuls in bf16), as ``--precision bf16`` runs it; ``bf16-weights`` is the model
   loaded in bf16 (``--dtype bf16``, or ``--dtype auto`` on a CPU with fast bf16): every
   op in bf16, no autocast and no casts, the log-softmax still in fp32;
3. how far each bf16 path's scores are from fp32's on the same examples: per example,
   the mean label-token log-prob (what ``perplexity`` ranks by), its mean and largest
   absolute difference from fp32 and the Spearman correlation of the rankings.

Forward FLOPs counted (printed with the table)::

    2 * P * T                          P = non-embedding weight matrices, T = tokens
  + 2 * n_layers * d_attn * sum_t t    attention QK^T and AV, causal (query t sees t keys)
  + 2 * d_model * vocab * T_label      the LM head, only at label positions

Element-wise work (norms, rotary, SiLU, softmax) is not counted: it is the overhead the
ratio measures. ``--sweep`` also times batch size 8 (the CLI's default) against ``auto``
with ``eager`` and ``sdpa`` attention (``--threads`` sets the thread count).
``--processes N`` instead scores in N concurrent processes of ``--threads`` (default 1)
threads each, started together, as N Ray workers or shard runs would, and compares their
summed throughput (the slowest process sets the time) with the matmul peak of all N x
threads threads in one process. ``--quick`` runs everything on a tiny random model in
seconds (a smoke test). The CPU may be shared with other processes: peaks and throughput are each the best
of several repeats, measured back to back, so both see the same machine state.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "gsm8k_pool.jsonl"

FORMULA = (
    "FLOPs = 2*P*T + 2*n_layers*d_attn*sum_t(t) + 2*d_model*vocab*T_label "
    "(P: non-embedding weight-matrix params, T: tokens, causal attention, LM head only at label positions)"
)


# ------------------------------------------------------------------------------ peak
def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (2048, 4096),
                repeats: int = 5, min_seconds: float = 0.0) -> dict[str, Any]:
    """Best FLOP/s over ``repeats`` runs, for each size n in ``sizes``, of ``a @ b``
    (``torch.mm``, n x n) and of ``F.linear(a, w)`` (n x n by an n x n weight: the call
    a model's layers make, which oneDNN may run faster than ``torch.mm`` in bf16); the
    peak is the best of all of them."""
    best: dict[str, float] = {}
    for n in sizes:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        for kind, fn in (("mm", torch.mm), ("linear", torch.nn.functional.linear)):
            fn(a, b)  # warm-up (oneDNN/MKL kernel selection, page faults)
            t_best = float("inf")
            t_end = time.perf_counter() + min_seconds
            r = 0
            while r < repeats or time.perf_counter() < t_end:
                t = time.perf_counter()
                fn(a, b)
                t_best = min(t_best, time.perf_counter() - t)
                r += 1
            best[str(n) if kind == "mm" else f"linear {n}"] = 2 * n**3 / t_best
    return {"flops": max(best.values()), "by_size": best}


# ------------------------------------------------------------------------------ FLOPs
def model_dims(model: Any) -> dict[str, int]:
    """Dimensions used by :func:`forward_flops`."""
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    nonemb = sum(p.numel() for n, p in model.named_parameters()  # matmul weights only
                 if p.dim() == 2 and "embed_tokens" not in n and "lm_head" not in n)
    return {"params_non_embedding": int(nonemb), "n_layers": int(cfg.num_hidden_layers),
            "d_attn": int(heads * head_dim), "d_model": int(cfg.hidden_size),
            "vocab": int(cfg.vocab_size)}


def forward_flops(dims: dict[str, int], lengths: list[int], n_labels: list[int],
                  *, causal: bool = True) -> float:
    """Forward FLOPs of scoring sequences of ``lengths`` with ``n_labels`` label positions.

    ``causal=False`` counts full ``L x L`` attention (what ``torch.utils.flop_counter``
    counts for attention kernels).
    """
    T = sum(lengths)
    if causal:
        att_pairs = sum(L * (L + 1) // 2 for L in lengths)
    else:
        att_pairs = sum(L * L for L in lengths)
    return float(2 * dims["params_non_embedding"] * T
                 + 2 * 2 * dims["n_layers"] * dims["d_attn"] * att_pairs
                 + 2 * dims["d_model"] * dims["vocab"] * sum(n_labels))


# ------------------------------------------------------------------------------ data
def make_examples(tokenizer: Any, n: int, length: int) -> list[Any]:
    """``n`` examples of exactly ``length`` tokens of GSM8K text (questions and answers
    run together), the second half label tokens."""
    from finesift.data.records import Example

    texts = []
    if DATA.exists():
        for line in DATA.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                texts.append(f"{row.get('question', '')}\n{row.get('answer', '')}\n")
    if not texts:
        texts = ["The quick brown fox jumps over the lazy dog. "]
    ids: list[int] = []
    need = n * length
    i = 0
    while len(ids) < need:
        ids.extend(tokenizer(texts[i % len(texts)], add_special_tokens=False)["input_ids"])
        i += 1
    arr = np.asarray(ids[:need], dtype=np.int64).reshape(n, length)
    out = []
    for k in range(n):
        labels = np.full(length, -100, dtype=np.int64)
        labels[length // 2:] = arr[k, length // 2:]
        out.append(Example(index=k, input_ids=arr[k].copy(), labels=labels,
                           n_label_tokens=length - length // 2))
    return out


# ------------------------------------------------------------------------------ scoring
def measure_scoring(model: Any, task: Any, examples: list[Any], *, precision: str,
                    batch_size: int | str, repeats: int = 3) -> dict[str, Any]:
    """Best-of-``repeats`` wall time of one scoring pass over ``examples``."""
    from finesift.engine.scoring import token_logprobs

    token_logprobs(model, task, examples[: max(1, len(examples) // 4)],
                   batch_size=batch_size, precision=precision)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        token_logprobs(model, task, examples, batch_size=batch_size, precision=precision)
        best = min(best, time.perf_counter() - t)
    return {"seconds": best, "examples": len(examples)}


def scoring_row(model, task, dims, examples, *, precision, batch_size, peak, repeats,
                length) -> dict[str, Any]:
    """One table row: throughput, achieved FLOP/s and its ratio to ``peak``."""
    m = measure_scoring(model, task, examples, precision=precision, batch_size=batch_size,
                        repeats=repeats)
    lengths = [len(e) for e in examples]
    labels = [int(e.n_label_tokens) for e in examples]
    flops = forward_flops(dims, lengths, labels)
    achieved = flops / m["seconds"]
    return {
        "precision": precision, "tokens_per_example": length, "batch_size": batch_size,
        "examples": len(examples), "seconds": round(m["seconds"], 4),
        "examples_per_s": len(examples) / m["seconds"],
        "tokens_per_s": sum(lengths) / m["seconds"],
        "flops_per_example": flops / len(examples),
        "achieved_flops": achieved, "peak_flops": peak, "ratio_to_peak": achieved / peak,
    }


def load(quick: bool, dtype: str = "fp32"):
    """``(model, tokenizer, name)``: the tiny random model or SmolLM2-135M, its weights in
    ``dtype`` (``fp32`` or ``bf16``, loaded as ``--dtype`` loads them)."""
    if quick:
        from finesift.testing import tiny_causal_lm, tiny_tokenizer

        tok = tiny_tokenizer()
        model = tiny_causal_lm(len(tok), hidden=64, layers=2, seed=0)
        if dtype == "bf16":
            model = model.to(torch.bfloat16)
        return model.eval(), tok, "tiny (finesift.testing, random)"
    os.environ.setdefault("FINESIFT_CACHE", "/tmp/fscache")
    from finesift.models.loader import load_model

    b = load_model("smollm2-135m", "lm", dtype=dtype)
    return b.model.eval(), b.tokenizer, "smollm2-135m"


def mean_logprobs(model: Any, task: Any, examples: list[Any], *, precision: str,
                  batch_size: int | str) -> np.ndarray:
    """Per example, the mean log-prob of its label tokens (float64)."""
    from finesift.engine.scoring import token_logprobs

    lp = token_logprobs(model, task, examples, batch_size=batch_size, precision=precision)
    return np.array([float(np.mean(x, dtype=np.float64)) for x in lp])


def agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """How far ``other``'s per-example scores are from ``reference``'s: mean and largest
    absolute difference and the Spearman correlation of the two rankings."""
    from scipy.stats import spearmanr

    diff = np.abs(other - reference)
    rho = spearmanr(reference, other).statistic if len(reference) > 1 else float("nan")
    return {"mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
            "spearman": float(rho), "examples": len(reference)}


@contextlib.contextmanager
def attn_impl(model: Any, impl: str | None):
    """Temporarily switch the model's attention implementation (``eager``/``sdpa``)."""
    if impl is None:
        yield
        return
    old = model.config._attn_implementation
    model.set_attn_implementation(impl)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def run(*, quick: bool = False, threads: int | None = None, sweep: bool = False,
        batch_size: int | str = "auto", lengths: tuple[int, ...] | None = None,
        log=print) -> dict[str, Any]:
    """Measure everything; return the JSON-able results (``log`` gets table lines)."""
    from finesift.engine.tasks import task_for

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, tok, name = load(quick)
    model_bf16, _, _ = load(quick, dtype="bf16")
    task = task_for("lm", tok)
    dims = model_dims(model)
    sizes = (128, 256) if quick else (2048, 4096)
    lengths = tuple(lengths or ((16, 32) if quick else (128, 256)))
    n_ex = {L: max(1, (512 if quick else 4096) // L) for L in lengths}  # same tokens per pass
    repeats = 2
    examples = {L: make_examples(tok, n_ex[L], L) for L in lengths}
    res: dict[str, Any] = {
        "model": name, "dims": dims, "formula": FORMULA, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "attn_implementation": model.config._attn_implementation,
        "batch_size": batch_size, "peaks": {}, "rows": [], "sweep": [], "agreement": [],
        "load_average_start": list(os.getloadavg()),
    }
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        peak = matmul_peak(dtype, sizes, repeats=repeats + 2)
        res["peaks"][precision] = peak
        for L in lengths:
            row = scoring_row(model, task, dims, examples[L], precision=precision,
                              batch_size=batch_size, peak=peak["flops"], repeats=repeats,
                              length=L)
            res["rows"].append(row)
            if precision == "bf16":  # the bf16 model right after autocast, same peak
                row = scoring_row(model_bf16, task, dims, examples[L], precision="fp32",
                                  batch_size=batch_size, peak=peak["flops"],
                                  repeats=repeats, length=L)
                row["precision"] = "bf16-weights"
                res["rows"].append(row)
        if sweep:
            for L in lengths:
                for bs in (8, "auto"):
                    for impl in ("sdpa", "eager"):
                        with attn_impl(model, impl):
                            row = scoring_row(model, task, dims, examples[L],
                                              precision=precision, batch_size=bs,
                                              peak=peak["flops"], repeats=repeats, length=L)
                        row["attn_implementation"] = impl
                        res["sweep"].append(row)
    for L in lengths:
        ref = mean_logprobs(model, task, examples[L], precision="fp32", batch_size=batch_size)
        for label, m, prec in (("bf16", model, "bf16"), ("bf16-weights", model_bf16, "fp32")):
            got = mean_logprobs(m, task, examples[L], precision=prec, batch_size=batch_size)
            res["agreement"].append({"precision": label, "tokens_per_example": L,
                                     **agreement(ref, got)})
    res["seconds_total"] = time.perf_counter() - t0
    res["load_average_end"] = list(os.getloadavg())
    return res


# ------------------------------------------------------------------------------ processes
def _process_worker(rank: int, threads: int, quick: bool, precision: str, length: int,
                    n_ex: int, batch_size: int | str, repeats: int, barrier, out) -> None:
    """One scoring process (what a Ray worker or a shard run is): ``repeats`` passes,
    each started together with the other processes at ``barrier``."""
    torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    from finesift.engine.scoring import token_logprobs
    from finesift.engine.tasks import task_for

    hf_logging.disable_progress_bar()
    model, tok, _ = load(quick)
    task = task_for("lm", tok)
    examples = make_examples(tok, n_ex, length)
    token_logprobs(model, task, examples[: max(1, n_ex // 4)], batch_size=batch_size,
                   precision=precision)  # warm-up
    times = []
    for _ in range(repeats):
        barrier.wait()
        t = time.perf_counter()
        token_logprobs(model, task, examples, batch_size=batch_size, precision=precision)
        times.append(time.perf_counter() - t)
    out.put((rank, times))


def run_processes(*, processes: int, threads: int = 1, quick: bool = False,
                  batch_size: int | str = "auto", lengths: tuple[int, ...] | None = None,
                  ) -> dict[str, Any]:
    """Aggregate scoring throughput of ``processes`` concurrent processes of ``threads``
    torch threads each, against the matmul peak of ``processes * threads`` threads in one
    process (the machine's peak for that many cores)."""
    import multiprocessing as mp

    t0 = time.perf_counter()
    torch.set_num_threads(processes * threads)
    model, tok, name = load(quick)
    dims = model_dims(model)
    del model
    sizes = (128, 256) if quick else (2048, 4096)
    lengths = tuple(lengths or ((16, 32) if quick else (128, 256)))
    repeats = 2
    res: dict[str, Any] = {
        "model": name, "dims": dims, "formula": FORMULA, "processes": processes,
        "threads_per_process": threads, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "batch_size": batch_size, "peaks": {}, "rows": [],
        "load_average_start": list(os.getloadavg()),
    }
    ctx = mp.get_context("spawn")
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        peak = matmul_peak(dtype, sizes, repeats=repeats + 2)
        res["peaks"][precision] = peak
        for L in lengths:
            n_ex = max(1, (512 if quick else 4096) // L)
            barrier, out = ctx.Barrier(processes), ctx.Queue()
            procs = [ctx.Process(target=_process_worker,
                                 args=(r, threads, quick, precision, L, n_ex, batch_size,
                                       repeats, barrier, out)) for r in range(processes)]
            for p in procs:
                p.start()
            times = dict(out.get() for _ in procs)
            for p in procs:
                p.join()
            # each repeat: every process scored n_ex examples; the slowest sets the time
            wall = min(max(times[r][i] for r in times) for i in range(repeats))
            examples = make_examples(tok, n_ex, L)
            flops = forward_flops(dims, [len(e) for e in examples],
                                  [int(e.n_label_tokens) for e in examples]) * processes
            res["rows"].append({
                "precision": precision, "tokens_per_example": L, "batch_size": batch_size,
                "examples": n_ex * processes, "seconds": wall,
                "examples_per_s": n_ex * processes / wall,
                "tokens_per_s": n_ex * processes * L / wall,
                "flops_per_example": flops / (n_ex * processes),
                "achieved_flops": flops / wall, "peak_flops": peak["flops"],
                "ratio_to_peak": flops / wall / peak["flops"],
            })
    res["threads"] = f"{processes} processes x {threads}"
    res["attn_implementation"] = "sdpa"
    res["sweep"] = []
    res["seconds_total"] = time.perf_counter() - t0
    res["load_average_end"] = list(os.getloadavg())
    return res


def format_table(res: dict[str, Any]) -> str:
    lines = [
        (f"model {res['model']}, torch {res['torch']}, {res['threads']} threads, "
        f"attention {res['attn_implementation']}, batch size {res['batch_size']}"),
        FORMULA,
        "matmul peak: " + ", ".join(
            f"{p} {v['flops'] / 1e9:.1f} GFLOP/s ("
            + ", ".join(f"{n}^3 {f / 1e9:.1f}" for n, f in v['by_size'].items()) + ")"
            for p, v in res["peaks"].items()),
        "",
        ("| precision | tokens | examples/s | tokens/s | GFLOP/example | achieved GFLOP/s "
        "| peak GFLOP/s | ratio |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['precision']} | {r['tokens_per_example']} | {r['examples_per_s']:.1f} "
            f"| {r['tokens_per_s']:.0f} | {r['flops_per_example'] / 1e9:.2f} "
            f"| {r['achieved_flops'] / 1e9:.1f} | {r['peak_flops'] / 1e9:.1f} "
            f"| {r['ratio_to_peak']:.0%} |")
    if res["sweep"]:
        lines += ["", "sweep:", "| precision | tokens | batch | attention | examples/s | ratio |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in res["sweep"]:
            lines.append(
                f"| {r['precision']} | {r['tokens_per_example']} | {r['batch_size']} "
                f"| {r['attn_implementation']} | {r['examples_per_s']:.1f} "
                f"| {r['ratio_to_peak']:.0%} |")
    if res.get("agreement"):
        lines += ["", "scores against fp32 (per example: mean label-token log-prob, nats):",
                  "| precision | tokens | examples | mean abs diff | max abs diff | Spearman |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in res["agreement"]:
            lines.append(
                f"| {r['precision']} | {r['tokens_per_example']} | {r['examples']} "
                f"| {r['mean_abs_diff']:.4f} | {r['max_abs_diff']:.4f} | {r['spearman']:.4f} |")
    lines.append(f"\ntotal {res['seconds_total']:.0f} s; load average (1/5/15 min) at start "
                 + "/".join(f"{x:.1f}" for x in res["load_average_start"]) + ", at end "
                 + "/".join(f"{x:.1f}" for x in res["load_average_end"])
                 + f" on {os.cpu_count()} CPUs (shared with other processes)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model (smoke test)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--batch-size", default="auto", help="scoring batch size (default auto)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="tokens per example (default 128 256; --quick 16 32)")
    ap.add_argument("--sweep", action="store_true",
                    help="also time batch sizes and eager vs sdpa attention")
    ap.add_argument("--processes", type=int, default=None,
                    help="score in this many concurrent processes of --threads (default 1) "
                         "threads each, as Ray workers or shard runs would, against the "
                         "peak of all their threads")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    bs: int | str = int(args.batch_size) if str(args.batch_size).isdigit() else args.batch_size
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.processes:
        res = run_processes(processes=args.processes, threads=args.threads or 1,
                            quick=args.quick, batch_size=bs, lengths=args.lengths)
    else:
        res = run(quick=args.quick, threads=args.threads, sweep=args.sweep, batch_size=bs,
                  lengths=args.lengths)
    print(format_table(res))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
