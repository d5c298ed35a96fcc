"""The ``finesift eval``, ``finesift bench`` and ``finesift bench-data`` subcommands.

``finesift.cli.build_parser`` calls :func:`register_eval_commands`; everything else about
these commands lives here. Thin: parses, calls :mod:`finesift.evaluate`, prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from finesift.errors import OptionError
from finesift.logs import emit


def _eprint(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    """One flag per field of :class:`~finesift.evaluate.finetune.FinetuneOptions` (its
    help, type and choices; generated as ``finesift select``'s are from ``RunConfig``),
    and ``--device``."""
    from finesift.config import add_arguments
    from finesift.evaluate.finetune import FinetuneOptions

    add_arguments(p, FinetuneOptions)
    _add_device_args(p, default_dtype=None, default_device="cpu", dtype=False)


def _add_device_args(p: argparse.ArgumentParser, *, default_dtype: str | None,
                     default_device: str | None, dtype: bool = True) -> None:
    """``--device`` and (``dtype``) ``--dtype`` (``None`` defaults: the benchmark
    config's)."""
    p.add_argument("--device", default=default_device,
                   help="torch device: cpu, cuda, cuda:1, ... (the model and its batches go "
                        "there)" + (f"; default {default_device}" if default_device
                                    else "; default: the config's device:, else cpu"))
    if not dtype:
        return
    p.add_argument("--dtype", choices=["fp32", "bf16", "auto"], default=default_dtype,
                   help="the dtype the model is loaded in: fp32, bf16 (half the memory; "
                        "LoRA adapters stay fp32) or auto (bf16 where the device computes it "
                        "natively, else fp32); --precision only autocasts fp32 weights. "
                        "fp16 is not offered: fine-tuning in fp16 needs loss scaling"
                        + (f"; default {default_dtype}" if default_dtype
                           else "; default: the config's dtype:, else fp32"))


def register_eval_commands(sub: Any) -> None:
    """Add ``eval``, ``bench`` and ``bench-data`` to the ``finesift`` subparsers ``sub``."""
    from finesift.evaluate.suites import SUITES

    p = sub.add_parser("eval", help="fine-tune a fresh model on a subset, measure the test set")
    p.add_argument("--train", nargs="+", required=True, help="training file(s), e.g. selected.jsonl")
    p.add_argument("--test", nargs="+", required=True, help="test file(s)")
    p.add_argument("--task", choices=["lm", "ner"], default="lm")
    p.add_argument("--model", default=None,
                   help="built-in model (smollm2-135m, minilm-l6) or a local model folder")
    _add_finetune_args(p)
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    p.add_argument("--allow-overlap", action="store_true",
                   help="do not stop when a test record duplicates a training record")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="run a benchmark config: methods x budgets x seeds")
    p.add_argument("--config", required=True, help="benchmark YAML (see benchmarks/)")
    p.add_argument("--out", default=None,
                   help="results folder (default: runs/bench-<config name> in the current folder)")
    p.add_argument("--quick", action="store_true",
                   help="tiny random model and a handful of records (a CI smoke run)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: write the tables and reports from the finished runs")
    p.add_argument("--seeds-first", action="store_true",
                   help="run every method on the first seed before any on the next: a whole "
                        "leaderboard on fewer seeds early (default: method by method)")
    p.add_argument("--only", default=None, metavar="LABEL[,LABEL...]",
                   help="run only these methods (labels as in the config; random is the "
                        "reference every row is compared with)")
    p.add_argument("--seeds", default=None, metavar="SEED[,SEED...]",
                   help="run only these of the config's seeds")
    _add_device_args(p, default_dtype=None, default_device=None)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("bench-data", help="build the data files of a shipped benchmark suite")
    p.add_argument("name", choices=sorted(SUITES))
    p.add_argument("--out", default="benchmarks/data",
                   help="folder the suite configs point at (default benchmarks/data)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_bench_data)


def cmd_eval(args: argparse.Namespace) -> int:
    """``finesift eval``: print (and with --out write) the figures as JSON."""
    from finesift.config import describe
    from finesift.evaluate.finetune import FinetuneOptions, finetune_and_evaluate, read_records
    from finesift.evaluate.overlap import check_no_overlap
    from finesift.store import write_json

    given = {i.name: getattr(args, i.name) for i in describe(FinetuneOptions)
             if hasattr(args, i.name)}  # the flags given; the others keep their defaults
    opts = FinetuneOptions.from_dict(given, where="finesift eval")
    train = read_records(args.train, "train")
    test = read_records(args.test, "test")
    if not args.allow_overlap:
        check_no_overlap(test, {"training set": train})
    res = finetune_and_evaluate(train, test, task=args.task, model=args.model, options=opts,
                                progress=not args.no_progress, log=emit, device=args.device)
    out = {"train": args.train, "test": args.test, **res.to_dict()}
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.out:
        write_json(Path(args.out), out)
        _eprint(f"wrote {args.out}")
    return 0


def _split_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _seed_list(text: str | None) -> list[int] | None:
    items = _split_list(text)
    if items is None:
        return None
    try:
        return [int(t) for t in items]
    except ValueError:
        raise OptionError(f"--seeds takes whole numbers separated by commas, got {text!r}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    """``finesift bench``: run (or resume) every method x budget x seed, then report."""
    from finesift.evaluate.bench import run_bench

    result = run_bench(args.config, out=args.out, quick=args.quick,
                       progress=not args.no_progress, log=emit,
                       report_only=args.report_only, seeds_first=args.seeds_first,
                       only=_split_list(args.only), only_seeds=_seed_list(args.seeds),
                       device=args.device, dtype=args.dtype)
    print(f"{result.n_done} run(s) done ({result.n_skipped} already finished, "
          f"{result.n_failed} failed) in {result.seconds:.0f} s")
    for name in ("results.csv", "results.json", "report.md", "report.html"):
        print(f"wrote {result.out / name}")
    if result.results is not None and result.results != result.out:
        print(f"results kept in {result.results} (results.jsonl, report.md: commit them)")
    return 1 if result.n_failed else 0


def cmd_bench_data(args: argparse.Namespace) -> int:
    """``finesift bench-data``: write a suite's val/test/pool files."""
    from finesift.evaluate.suites import build_suite_data

    files = build_suite_data(args.name, Path(args.out), seed=args.seed, log=emit)
    for role, (path, n) in files.items():
        print(f"{role}: {path} ({n} records)")
    return 0
