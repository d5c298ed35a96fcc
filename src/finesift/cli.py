"""The ``finesift`` command. Thin: parses, calls the library, prints."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from finesift.errors import FinesiftError
from finesift.select.strategies import STRATEGIES


def _batch_size(value: str) -> int | str:
    """argparse type of --batch-size: digits become an int; anything else ('auto',
    'auto:4GiB', or a mistake) goes to select(), which checks it (exit 2, one clear line)."""
    value = value.strip()
    return int(value) if value.isdigit() else value.lower()


def _parse_options(pairs: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in pairs or []:
        if "=" not in item:
            raise FinesiftError(f"--option {item!r}: expected KEY=VALUE, e.g. --option mode=basic")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _eprint(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=["lm", "ner"], default="lm",
                   help="lm: causal LM on chat/prompt-completion/text records; ner: token tags")
    p.add_argument("--model", default=None,
                   help="built-in model (smollm2-135m, minilm-l6) or a local model folder")
    p.add_argument("--max-length", type=int, default=512, help="truncate examples (tokens)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--batch-size", type=_batch_size, default=8,
                   help="rows per scoring batch (default 8); 'auto' fills 1 GiB of activations "
                        "per batch (more rows for short examples), 'auto:4GiB' another limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", choices=["auto", "chat", "plain"], default="auto",
                   help="how chat and prompt/completion records are rendered")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _summary(sel, top: int = 5) -> str:
    lines = [f"selected {len(sel.selected)} of {len(sel.pool)} pool examples"]
    by_src = Counter(r.source for r in sel.selected)
    pool_src = Counter(r.source for r in sel.pool)
    for src, n in sorted(pool_src.items()):
        lines.append(f"  {src}: {by_src.get(src, 0)} selected of {n} "
                     f"({100.0 * by_src.get(src, 0) / max(1, len(sel.selected)):.0f}% of the selection)")
    score_of = dict(zip((r.id for r in sel.pool), sel.scores, strict=True))
    lines.append(f"top {min(top, len(sel.selected))}:")
    for r in sel.selected[:top]:
        lines.append(f"  {score_of[r.id]:+.5f}  {r.id}  {_preview(r)}")
    return "\n".join(lines)


def _preview(record, width: int = 70) -> str:
    if record.messages:
        text = next((m["content"] for m in record.messages if m.get("role") == "user"),
                    record.messages[0]["content"])
    elif record.prompt is not None:
        text = record.prompt
    elif record.text is not None:
        text = record.text
    elif record.tokens is not None:
        text = " ".join(record.tokens)
    else:
        text = ""
    text = " ".join(str(text).split())
    return text[:width] + ("..." if len(text) > width else "")


def _check_proxy(method: str, proxy: str, options: dict[str, Any]) -> None:
    """``--proxy`` is an option of the methods whose options have a ``proxy`` field."""
    from finesift.methods import available

    def takes_proxy(cls: Any) -> bool:
        opt = getattr(cls, "Options", None)
        return dataclasses.is_dataclass(opt) and "proxy" in {f.name for f in dataclasses.fields(opt)}

    methods = available()
    if method in methods and not takes_proxy(methods[method]):
        supported = ", ".join(n for n, c in methods.items() if takes_proxy(c))
        raise FinesiftError(f"--method {method} does not support --proxy (methods that do: {supported})")
    if options.get("proxy", proxy) != proxy:
        raise FinesiftError("--proxy and -o proxy=... disagree")


def cmd_select(args: argparse.Namespace) -> int:
    from finesift.api import select

    options = _parse_options(args.option)
    if args.envelope is not None:
        if args.method != "harp":
            raise FinesiftError(f"--envelope is an option of --method harp, not {args.method}")
        if options.get("envelope", args.envelope) != args.envelope:
            raise FinesiftError("--envelope and -o envelope=... disagree")
        options["envelope"] = args.envelope
    if args.proxy is not None:
        if args.method == "auto":
            raise FinesiftError("--proxy is not an option of --method auto; give it to a "
                                "candidate: -o less.proxy=iprox:0.7")
        _check_proxy(args.method, args.proxy, options)
        options["proxy"] = args.proxy
    sharded = args.shard_index is not None
    if args.budget is None and not sharded:
        raise FinesiftError("--budget is required (except in a shard run: --shard-index)")
    if args.budget is not None and sharded:
        _eprint("warning: a shard run selects nothing; --budget is ignored (give it to merge)")
    ray_options = {k: v for k, v in (
        ("num_cpus", args.ray_num_cpus), ("workers", args.ray_workers),
        ("cpus_per_worker", args.ray_cpus_per_worker),
        ("gpus_per_worker", args.ray_gpus_per_worker)) if v is not None}
    sel = select(
        args.pool,
        args.target,
        budget=args.budget,
        method=args.method,
        method_options=options,
        task=args.task,
        model=args.model,
        strategy=args.strategy,
        seed=args.seed,
        out=args.out,
        fmt=args.format,
        max_length=args.max_length,
        template=args.template,
        precision=args.precision,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        log=_eprint,
        device=args.device,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        executor=args.executor,
        ray_address=args.ray_address,
        ray_options=ray_options,
    )
    if sharded:
        if not sel.pool:
            _eprint(f"warning: shard {args.shard_index} got no examples: the pool has fewer "
                    f"chunks than shards (use fewer shards; tov: or a smaller -o chunk_size)")
        print(f"scored shard {args.shard_index} of {args.num_shards}: {len(sel.pool)} of "
              f"{sel.manifest['shard']['pool_size']} pool examples")
        print(f"wrote {args.out}/scores.parquet, manifest.json "
              f"({sel.manifest['wall_seconds']:.0f} s); combine the shards with finesift merge")
        return 0
    if "auto" in sel.manifest:  # --method auto: the trials that chose the method
        from finesift.evaluate.auto import format_trials

        print(format_trials(sel.manifest["auto"]))
    print(_summary(sel))
    print(f"wrote {args.out}/scores.parquet, selected.jsonl, manifest.json "
          f"({sel.manifest['wall_seconds']:.0f} s)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from finesift.shards import merge

    sel = merge(args.shards, args.out, budget=args.budget, strategy=args.strategy, log=_eprint)
    print(_summary(sel))
    print(f"wrote {args.out}/scores.parquet, selected.jsonl, manifest.json")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from finesift.api import select
    from finesift.bundled import build_demo_data

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="finesift-demo-"))
    files = build_demo_data(out / "data", n_target=args.n_target, n_gsm8k_pool=args.n_gsm8k,
                            n_sharegpt=args.n_sharegpt, seed=args.seed)
    print(f"demo data in {out / 'data'}: target = {args.n_target} GSM8K problems; pool = "
          f"{args.n_sharegpt} ShareGPT first turns + {args.n_gsm8k} other GSM8K problems")
    print(f"running tov ({args.mode}) with SmolLM2-135M-Instruct, budget {args.budget} ...",
          flush=True)
    t0 = time.perf_counter()
    options = {"mode": args.mode, "rounds": args.rounds, "val_epochs": args.val_epochs}
    sel = select(
        [files["pool_sharegpt"], files["pool_gsm8k"]],
        files["target"],
        budget=args.budget,
        method="tov",
        method_options=options,
        task="lm",
        model=None,
        strategy="top",
        seed=args.seed,
        out=out / "run",
        max_length=args.max_length,
        progress=not args.no_progress,
        log=_eprint,
    )
    print(_summary(sel))
    n_gsm = sum(1 for r in sel.selected if r.source.endswith("pool_gsm8k.jsonl"))
    share = args.n_gsm8k / (args.n_gsm8k + args.n_sharegpt)
    print(f"GSM8K share: {n_gsm / len(sel.selected):.0%} of the selection vs "
          f"{share:.0%} of the pool (random selection would give about {share:.0%})")
    print(f"outputs in {out / 'run'}; took {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from finesift.evaluate import auto
    from finesift.methods import available

    entries: dict[str, tuple[str, list[str]]] = {}
    for name, cls in available().items():
        lines = []
        if dataclasses.is_dataclass(cls.Options):
            for f in dataclasses.fields(cls.Options):
                default = f.default if f.default is not dataclasses.MISSING else "?"
                lines.append(f"    {f.name} = {default!r}")
        entries[name] = (cls.description, lines)
    entries[auto.NAME] = (auto.DESCRIPTION, [
        *(f"    {key} = {default}" for key, default in auto.describe_options()),
        "    METHOD.KEY: a candidate's own option, e.g. -o tov.mode=basic"])
    for name, (description, lines) in sorted(entries.items()):
        print(f"{name:14s} {description}")
        for line in lines:
            print(line)
    return 0


def cmd_data_build(args: argparse.Namespace) -> int:
    from finesift import bundled

    out = Path(args.out)
    if args.name == "demo":
        files = bundled.build_demo_data(out, seed=args.seed)
        for k, p in files.items():
            print(f"{k}: {p}")
        return 0
    if args.name == "gsm8k":
        rows = bundled.gsm8k_records()
    elif args.name == "sharegpt":
        rows = bundled.sharegpt_first_turns(args.limit or 1000)
    elif args.name == "wnut":
        rows = bundled.wnut_sentences()
    else:  # argparse restricts choices
        raise FinesiftError(f"unknown data set {args.name}")
    if args.limit:
        rows = rows[: args.limit]
    path = bundled.write_jsonl(out / f"{args.name}.jsonl", rows)
    print(f"wrote {len(rows)} records to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from finesift import __version__

    parser = argparse.ArgumentParser(
        prog="finesift", description="Select fine-tuning data that most reduces target loss."
    )
    parser.add_argument("--version", action="version", version=f"finesift {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("select", help="score a pool and select a subset")
    p.add_argument("--method", default="tov",
                   help="selection method (see `finesift methods`), or auto: try candidate "
                        "methods on folds of the target and select with the best")
    p.add_argument("--pool", nargs="+", required=True, help="pool file(s)")
    p.add_argument("--target", nargs="+", required=True, help="target example file(s)")
    p.add_argument("--budget", default=None,
                   help="count (500) or share of the pool (10%%); required unless --shard-index")
    p.add_argument("--strategy", default="top", choices=list(STRATEGIES))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-shards", type=int, default=1,
                   help="split the pool into N shards (with --shard-index; default 1)")
    p.add_argument("--shard-index", type=int, default=None,
                   help="score only shard I (0..N-1) and write its scores for finesift merge; "
                        "chunk c of the length-sorted chunk grid belongs to shard c %% N")
    p.add_argument("--device", default="cpu",
                   help="torch device of this process: cpu (default), cuda, cuda:1, ... "
                        "(Ray GPU workers always use their own GPU)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where the pool is scored: this process (default) or Ray workers (tov)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: start a local Ray instance)")
    p.add_argument("--ray-num-cpus", type=int, default=None,
                   help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--ray-workers", type=int, default=None,
                   help="Ray workers (default: cluster GPUs / gpus per worker, else CPUs)")
    p.add_argument("--ray-cpus-per-worker", type=float, default=None,
                   help="CPUs (and torch threads) per Ray worker (default 1)")
    p.add_argument("--ray-gpus-per-worker", type=float, default=None,
                   help="GPUs per Ray worker (default 0; 1 = one worker per GPU, on cuda)")
    p.add_argument("--format", default=None,
                   choices=["jsonl", "json", "csv", "parquet", "hf", "conll"],
                   help="input format (default: from the file extension)")
    p.add_argument("-o", "--option", action="append", metavar="KEY=VALUE",
                   help="method option, e.g. -o mode=basic -o rounds=2 (repeatable)")
    p.add_argument("--envelope", choices=["c", "e"], default=None,
                   help="harp: HARP-C (one best helpful leaf per domain counts, every harm "
                        "counts; default) or HARP-E (leaf effects add up)")
    p.add_argument("--proxy", default=None, metavar="iprox:RHO",
                   help="less/tracin: run on an IProX influence-preserving low-rank proxy of "
                        "the model with compression ratio RHO in [0, 1), e.g. iprox:0.7")
    _add_common(p)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("merge", help="combine shard runs (select --shard-index) and select")
    p.add_argument("shards", nargs="+", metavar="SHARD_DIR", help="the shard runs' --out folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--budget", required=True, help="count (500) or share of the pool (10%%)")
    p.add_argument("--strategy", default="top", choices=list(STRATEGIES))
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("demo", help="ToV on bundled GSM8K + ShareGPT with SmolLM2")
    p.add_argument("--out", default=None, help="output folder (default: a temp folder)")
    p.add_argument("--budget", default="50")
    p.add_argument("--mode", default="basic", choices=["basic", "interleaved", "parallel"],
                   help="ToV mode (basic keeps the demo under 10 minutes on 2 CPU cores)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--val-epochs", type=float, default=2.0)
    p.add_argument("--n-target", type=int, default=32)
    p.add_argument("--n-gsm8k", type=int, default=50)
    p.add_argument("--n-sharegpt", type=int, default=150)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("methods", help="list the selection methods and their options")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("data", help="bundled data sets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser("build", help="write a bundled data set as JSONL")
    b.add_argument("name", choices=["demo", "gsm8k", "sharegpt", "wnut"])
    b.add_argument("--out", required=True)
    b.add_argument("--limit", type=int, default=None)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=cmd_data_build)

    from finesift.evaluate.cli import register_eval_commands  # eval, bench (evaluate/cli.py)

    register_eval_commands(sub)
    return parser


_DASHED_VALUE = re.compile(r"-(\d|\.\d)")
_PLAIN_NEGATIVE = re.compile(r"-\d+|-\d*\.\d+")


def _join_dashed_values(argv: list[str]) -> list[str]:
    """``--budget -10%`` -> ``--budget=-10%``: argparse takes a value that starts with a
    dash and is not a plain negative number for an option, and fails with "expected one
    argument" instead of letting finesift say what is wrong with the value."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if (arg.startswith("--") and "=" not in arg and len(arg) > 2 and nxt is not None
                and _DASHED_VALUE.match(nxt) and not _PLAIN_NEGATIVE.fullmatch(nxt)):
            out.append(f"{arg}={nxt}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = build_parser()
    args = parser.parse_args(_join_dashed_values(sys.argv[1:] if argv is None else list(argv)))
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return int(args.func(args) or 0)
    except FinesiftError as exc:
        _eprint(f"finesift: error: {_one_line(str(exc))}")
        return 2
    except OSError as exc:  # the file system refused (permissions, a full disk, ...)
        where = f"{exc.filename}: " if exc.filename else ""
        _eprint(f"finesift: error: {where}{exc.strerror or exc}")
        return 2
    except KeyboardInterrupt:
        _eprint("finesift: interrupted; run the same command again to resume")
        return 130


def _one_line(message: str) -> str:
    """An error message on one line (a value quoted in it may hold line breaks)."""
    return " ".join(message.splitlines()) if "\n" in message or "\r" in message else message


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
