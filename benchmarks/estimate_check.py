"""How good is ``finesift select --estimate``? Its projection against the suites' real runs.

For a suite YAML (``benchmarks/*.yaml``) and its committed results
(``benchmarks/results/<suite>/results.jsonl``: each run's ``select_seconds`` and
``select_peak_rss_mb``), this runs the estimate of every method entry with the suite's
settings (its pool with the limits applied, its val set as the target, its model,
max_length, device, dtype, the largest budget, the first seed) and prints estimate
against measurement and their ratio. The measured figure of a method is the median over
its seeds of the run's selection cost (the largest over the budgets of one seed: HARP
scores per budget and its later budgets reuse the first one's train-evaluate runs).

The bench measured its selections inside one long process, where the libraries were
imported and the model files read long before: so the estimates run in this one process
too, after one untimed warm-up estimate (``--isolate``: a fresh process each, as
``finesift select --estimate`` runs, whose first model load also pays for importing
transformers and friends). The bench's peak memory includes whatever its process held at
the time; compare memory with that in mind.

Usage::

    python benchmarks/estimate_check.py benchmarks/instruct-gsm8k.yaml [--methods tov-tuned,dsir]
        [--write]                      # append JSON lines to benchmarks/results/estimate_check.jsonl
    python benchmarks/estimate_check.py benchmarks/ner-wnut.yaml --quick --methods random,dsir
                                       # a smoke run: the bench's tiny model and data

``--quick`` (the bench's ``--quick`` data and tiny random model), ``--limit N`` (the first
N records of each pool source and of the val set) and ``--model PATH`` make a cheap run;
their ratios then compare a smaller run with the suite's measurement and mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "estimate_check.jsonl"


def measured_rows(results: Path, spec: Any) -> dict[int, dict[str, float]]:
    """Per seed, the selection cost of ``spec``'s finished runs: ``{"seconds", "peak_rss_mb"}``
    (the largest over its budgets)."""
    out: dict[int, dict[str, float]] = {}
    if not results.exists():
        return out
    for line in results.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        same = str(row.get("key", "")).startswith(f"{spec.key}|") or (
            row.get("method") == spec.label and row.get("method_options")
            == json.dumps(spec.options, sort_keys=True))
        if not same or row.get("status") != "ok" or row.get("select_seconds") is None:
            continue
        seed = int(row.get("seed", 0))
        got = out.setdefault(seed, {"seconds": 0.0, "peak_rss_mb": 0.0})
        got["seconds"] = max(got["seconds"], float(row["select_seconds"]))
        got["peak_rss_mb"] = max(got["peak_rss_mb"], float(row.get("select_peak_rss_mb") or 0))
    return out


def estimate_one(kwargs: dict[str, Any], isolate: bool) -> dict[str, Any]:
    """The estimate's figures (``Estimate.to_dict()``), in this process or a fresh one."""
    if not isolate:
        import finesift

        return finesift.estimate(**kwargs).to_dict()
    code = ("import json, sys, finesift; kw = json.loads(sys.stdin.read()); "
            "print('\\x1e' + json.dumps(finesift.estimate(**kw).to_dict()))")
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(kwargs), text=True,
                          capture_output=True, check=False)
    marker = proc.stdout.rfind("\x1e")
    if proc.returncode != 0 or marker < 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError("estimate failed: " + " | ".join(tail))
    return json.loads(proc.stdout[marker + 1:])


def ratio(est: float | None, real: float | None) -> float | None:
    return None if not est or not real else est / real


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="a suite YAML (benchmarks/*.yaml)")
    ap.add_argument("--results", default=None,
                    help="results.jsonl to compare with (default: the suite's results folder)")
    ap.add_argument("--methods", default=None,
                    help="comma-separated method labels (default: every entry but auto)")
    ap.add_argument("--limit", type=int, default=None,
                    help="keep the first N records of each pool source and of the val set")
    ap.add_argument("--quick", action="store_true",
                    help="the bench's --quick data and tiny random model (a smoke run)")
    ap.add_argument("--model", default=None, help="another model than the suite's")
    ap.add_argument("--calibration-batches", type=int, default=2)
    ap.add_argument("--isolate", action="store_true",
                    help="run every estimate in a fresh process (default: this one, warmed up)")
    ap.add_argument("--write", nargs="?", const=str(DEFAULT_OUT), default=None, metavar="JSONL",
                    help=f"append one JSON line per method (default file: {DEFAULT_OUT})")
    ap.add_argument("--work", default=None, help="folder for the prepared data (default: temp)")
    args = ap.parse_args(argv)

    from finesift.evaluate import bench

    cfg = bench.load_config(args.config)
    if args.limit is not None:
        for src in cfg.pool:
            src.limit = args.limit if src.limit is None else min(src.limit, args.limit)
    results = Path(args.results) if args.results else (cfg.results or Path()) / "results.jsonl"
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="estimate-check-"))
    data = bench.prepare_data(cfg, work, quick=args.quick)
    val = data.val_file
    if args.limit is not None:
        from finesift.store import write_jsonl

        val = work / "data" / "val-limited.jsonl"
        write_jsonl(val, (bench._raw_with_id(r) for r in data.val[: args.limit]))
    model = args.model or cfg.model
    max_length = cfg.max_length
    if args.quick and args.model is None:
        model = str(bench.build_quick_model(cfg.task, data.pool + data.val + data.test,
                                           work / "quick-model"))
        max_length = bench.QUICK_MAX_LENGTH
    from finesift.select.strategies import parse_budget

    given = (bench.quick_budgets(list(cfg.budgets), data.full_pool_size, len(data.pool))
             if args.quick else list(cfg.budgets))
    try:
        budgets = {b: parse_budget(b, len(data.pool)) for b in given}
    except Exception as exc:  # noqa: BLE001 - e.g. --limit below a budget
        ap.error(f"the suite's budgets {given} do not fit {len(data.pool)} pool examples: {exc}")
    budget = max(budgets, key=lambda b: budgets[b])
    wanted = None if args.methods is None else [m.strip() for m in args.methods.split(",")]
    specs = [s for s in cfg.methods if wanted is None or s.label in wanted]
    if wanted is not None and len(specs) != len(set(wanted)):
        known = ", ".join(s.label for s in cfg.methods)
        ap.error(f"--methods: unknown label(s) in {args.methods!r}; the suite has: {known}")
    from finesift.api import chooses_method
    from finesift.evaluate.bench import machine

    common = {"pool": [str(p) for p in data.pool_files], "target": str(val), "budget": budget,
              "task": cfg.task, "model": model, "strategy": cfg.strategy,
              "max_length": max_length, "device": cfg.device, "dtype": cfg.dtype}
    if not args.isolate:  # import and read what the bench's process had long done
        estimate_one({**common, "method": "perplexity", "rates": {"forward": 0.0}}, False)
    rows = []
    print(f"{cfg.name}: {len(data.pool)} pool examples, budget {budget}, model {model}"
          + (" (quick)" if args.quick else "") + (f" (limit {args.limit})" if args.limit else ""))
    head = (f"{'method':18s} {'estimate':>9s} {'measured':>9s} {'ratio':>6s}   "
            f"{'est. peak':>9s} {'measured':>9s} {'ratio':>6s}   {'est. disk':>9s}")
    print(head)
    for spec in specs:
        if chooses_method(spec.name):
            print(f"{spec.label:18s} skipped: --estimate does not project --method {spec.name}")
            continue
        seeds = bench.method_seeds(spec, cfg.seeds)
        kwargs = {**common, "method": spec.name, "method_options": spec.options,
                  "seed": seeds[0], "out": str(work / "not-written" / spec.dirname),
                  "workdir": str(work / "not-written" / "work"),
                  "calibration_batches": args.calibration_batches,
                  **({"prefilter": spec.prefilter} if spec.prefilter is not None else {})}
        t0 = time.perf_counter()
        try:
            est = estimate_one(kwargs, args.isolate)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other methods
            print(f"{spec.label:18s} failed: {exc}")
            continue
        took = time.perf_counter() - t0
        real = measured_rows(results, spec)
        secs = statistics.median(r["seconds"] for r in real.values()) if real else None
        rss = statistics.median(r["peak_rss_mb"] for r in real.values()) if real else None
        est_rss = est["peak_memory_bytes"] / 2**20
        r_wall, r_mem = ratio(est["wall_seconds"], secs), ratio(est_rss, rss)
        print(f"{spec.label:18s} {_s(est['wall_seconds']):>9s} {_s(secs):>9s} {_r(r_wall):>6s}   "
              f"{est_rss:8.0f}M {_m(rss):>9s} {_r(r_mem):>6s}   "
              f"{est['disk_bytes'] / 2**20:8.1f}M")
        rows.append({
            "suite": cfg.name, "label": spec.label, "method": spec.name,
            "method_options": spec.options, "budget": budget, "seed": seeds[0],
            "quick": bool(args.quick), "limit": args.limit, "model": model,
            "isolated": bool(args.isolate),
            "n_pool": est["n_pool"], "pool_tokens": est["pool_tokens"],
            "estimate_wall_seconds": round(est["wall_seconds"], 3),
            "measured_select_seconds": {str(k): v["seconds"] for k, v in sorted(real.items())},
            "measured_median_seconds": secs, "ratio_wall": r_wall,
            "estimate_peak_rss_mb": round(est_rss, 1),
            "measured_peak_rss_mb": {str(k): v["peak_rss_mb"] for k, v in sorted(real.items())},
            "ratio_peak_memory": r_mem,
            "estimate_disk_bytes": est["disk_bytes"],
            "estimate_seconds_taken": round(took, 1),
            "calibration_seconds": round(est["calibration_seconds"], 1),
            "passes": [{k: p[k] for k in ("what", "units", "seconds_per_unit", "seconds")}
                       for p in est["passes"]],
            "stages": est["stages"], "fixed_seconds": est["fixed_seconds"],
            "machine": machine(), "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
    ratios = [r["ratio_wall"] for r in rows if r["ratio_wall"]]
    if ratios:
        inside = sum(0.5 <= x <= 2 for x in ratios)
        print(f"wall time: {inside} of {len(ratios)} estimates within 2x of the measurement "
              f"(ratios {min(ratios):.2f} to {max(ratios):.2f})")
    if args.write and rows:
        out = Path(args.write)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row, default=str) + "\n" for row in rows)
        print(f"appended {len(rows)} line(s) to {out}")
    return 0


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f} s" if x < 600 else f"{x / 60:.1f} min"


def _m(x: float | None) -> str:
    return "-" if not x else f"{x:.0f}M"


def _r(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    sys.exit(main())
