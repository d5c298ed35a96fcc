"""The ``finesift`` command. Thin: parses, calls the library, prints."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from finesift.config import RunConfig, add_arguments, describe
from finesift.errors import FinesiftError
from finesift.logs import cli_logging, emit
from finesift.methods import available
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


RAY_FLAGS = (
    ("num_cpus", int, "CPUs of the local Ray instance (default: all)"),
    ("workers", int, "Ray workers (default: cluster GPUs / gpus per worker, else CPUs)"),
    ("cpus_per_worker", float, "CPUs (and torch threads) per Ray worker (default 1)"),
    ("gpus_per_worker", float, "GPUs per Ray worker (default 0; 1 = one worker per GPU, on cuda)"),
)
"""``--ray-NAME`` flags: the keys of :class:`~finesift.config.RunConfig`'s ``ray_options``."""


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


def method_flags() -> dict[str, list[tuple[str, str]]]:
    """The ``finesift select`` flags the registered methods declare (``cli_flags``): flag
    name -> the (method, option) pairs it sets."""
    flags: dict[str, list[tuple[str, str]]] = {}
    for name, cls in available().items():
        for flag, option_name in cls.cli_flags.items():
            flags.setdefault(flag, []).append((name, option_name))
    return flags


def run_config(args: argparse.Namespace) -> RunConfig:
    """The run's configuration: ``--config``'s file (if given), with the flags given on
    the command line laid over it (``-o`` options over the file's method options; a
    ``--method`` other than the file's drops the file's method options)."""
    data: dict[str, Any] = {}
    if args.config:
        data = RunConfig.from_yaml(args.config).api_kwargs()
    given = {i.name: getattr(args, i.name) for i in describe(RunConfig) if hasattr(args, i.name)}
    if "method" in given and given["method"] != data.get("method", given["method"]):
        data.pop("method_options", None)
    data.update(given)
    if isinstance(data.get("batch_size"), str):
        data["batch_size"] = _batch_size(data["batch_size"])
    method = data.get("method", RunConfig.method)
    options = {**(data.get("method_options") or {}), **_parse_options(args.option)}
    from finesift.api import chooses_method

    for flag, owners in method_flags().items():
        value = getattr(args, f"method_flag_{flag}", None)
        if value is None:
            continue
        names = ", ".join(dict.fromkeys(m for m, _ in owners))
        mine = dict(owners).get(method)
        if chooses_method(method):
            first, opt = owners[0]
            raise FinesiftError(f"--{flag} is not an option of --method {method} (--{flag} is an "
                                f"option of --method {names}); give it to a candidate: "
                                f"-o {first}.{opt}={value}")
        if mine is None:
            raise FinesiftError(f"--method {method} does not support --{flag} (methods that "
                                f"do: {names})")
        if options.get(mine, value) != value:
            raise FinesiftError(f"--{flag} and -o {mine}=... disagree")
        options[mine] = value
    data["method_options"] = options
    ray = dict(data.get("ray_options") or {})
    ray.update({name: getattr(args, f"ray_{name}") for name, _, _ in RAY_FLAGS
                if getattr(args, f"ray_{name}") is not None})
    data["ray_options"] = ray
    needed = ("pool", "target") if getattr(args, "estimate", False) else ("pool", "target", "out")
    missing = [f"--{k}" for k in needed if data.get(k) in (None, [])]
    if missing:
        raise FinesiftError(f"the following arguments are required: {', '.join(missing)} "
                            "(on the command line or in the --config file)")
    return RunConfig.from_dict(data)


def cmd_select(args: argparse.Namespace) -> int:
    from finesift.api import method_report, select

    run = run_config(args)
    sharded = run.shard_index is not None
    if run.budget is None and not sharded:
        raise FinesiftError("--budget is required (except in a shard run: --shard-index)")
    if run.budget is not None and sharded:
        emit("warning: a shard run selects nothing; --budget is ignored (give it to merge)")
    if getattr(args, "estimate", False):  # project the run's cost, do none of its work
        from finesift.estimator import estimate

        print(estimate(**run.api_kwargs(), progress=False, log=emit).text())
        return 0
    sel = select(**run.api_kwargs(), progress=not args.no_progress, log=emit)
    if sharded:
        if not sel.pool:
            emit(f"warning: shard {run.shard_index} got no examples: the pool has fewer "
                    f"chunks than shards (use fewer shards; tov: or a smaller -o chunk_size)")
        print(f"scored shard {run.shard_index} of {run.num_shards}: {len(sel.pool)} of "
              f"{sel.manifest['shard']['pool_size']} pool examples")
        print(f"wrote {run.out}/scores.parquet, manifest.json "
              f"({sel.manifest['wall_seconds']:.0f} s); combine the shards with finesift merge")
        return 0
    extra = method_report(sel.manifest)  # --method auto: the trials that chose the method
    if extra:
        print(extra)
    print(_summary(sel))
    print(f"wrote {run.out}/scores.parquet, selected.jsonl, manifest.json "
          f"({sel.manifest['wall_seconds']:.0f} s)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from finesift.shards import merge

    sel = merge(args.shards, args.out, budget=args.budget, strategy=args.strategy, log=emit)
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
        log=emit,
    )
    print(_summary(sel))
    n_gsm = sum(1 for r in sel.selected if r.source.endswith("pool_gsm8k.jsonl"))
    share = args.n_gsm8k / (args.n_gsm8k + args.n_sharegpt)
    print(f"GSM8K share: {n_gsm / len(sel.selected):.0%} of the selection vs "
          f"{share:.0%} of the pool (random selection would give about {share:.0%})")
    print(f"outputs in {out / 'run'}; took {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """``finesift methods``: every method with its options and defaults; ``finesift
    methods NAME``: one method with the help of each option."""
    import textwrap

    from finesift.config import describe
    from finesift.evaluate import auto
    from finesift.methods import available

    methods = available()
    entries: dict[str, tuple[str, list[Any]]] = {
        name: (cls.description, describe(cls.Options)) for name, cls in methods.items()}
    entries[auto.NAME] = (auto.DESCRIPTION, describe(auto.AutoOptions))
    shown = {(auto.NAME, key): default for key, default in auto.describe_options()}
    names = getattr(args, "name", None) or []
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise FinesiftError(f"unknown method {', '.join(unknown)}; available methods: "
                            f"{', '.join(sorted(entries))}")
    for name, (description, infos) in sorted(entries.items()):
        if names and name not in names:
            continue
        print(f"{name:14s} {description}")
        width = max((len(i.name) for i in infos), default=0)
        for info in infos:
            default = shown.get((name, info.name), repr(info.default))
            if not names:
                print(f"    {info.name} = {default}")
                continue
            kind = (f"one of {', '.join(map(str, info.choices))}" if info.choices
                    else info.type)
            print(f"    {info.name:{width}s} = {default}  ({kind})")
            for line in textwrap.wrap(info.help, width=88):
                print(f"    {'':{width}s}   {line}")
        if name == auto.NAME:
            print("    METHOD.KEY: a candidate's own option, e.g. -o tov.mode=basic")
        if names and not infos:
            print("    (no options)")
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
    p.add_argument("--config", default=None, metavar="RUN.YAML",
                   help="read the run's options from this file (a run folder's config.yaml "
                        "runs that run again); flags given here override it")
    add_arguments(p, RunConfig)  # one flag per field of the run's configuration
    p.add_argument("-o", "--option", action="append", metavar="KEY=VALUE",
                   help="method option, e.g. -o mode=basic -o rounds=2 (repeatable; "
                        "`finesift methods NAME` lists a method's options)")
    for flag, owners in method_flags().items():  # flags the methods declare (--envelope)
        first, option_name = owners[0]
        info = next(i for i in describe(available()[first].Options) if i.name == option_name)
        p.add_argument(f"--{flag}", default=None, dest=f"method_flag_{flag}", metavar=flag.upper(),
                       choices=list(info.choices) if info.choices else None,
                       help=f"{', '.join(dict.fromkeys(m for m, _ in owners))}: "
                            + info.help.replace("%", "%%"))
    for name, kind, text in RAY_FLAGS:
        p.add_argument(f"--ray-{name.replace('_', '-')}", type=kind, default=None, dest=f"ray_{name}",
                       help=text)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--estimate", action="store_true",
                   help="print the run's projected wall time, peak memory and disk (from the "
                        "inputs' token counts, the model, the method's passes and a few "
                        "batches timed on this machine) and exit; writes nothing")
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
    p.add_argument("name", nargs="*", metavar="NAME",
                   help="print these methods' options with the help of each")
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
    _add_verbosity(parser)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """``-q``/``-v`` on ``parser`` and every subcommand (before or after its name); a
    subcommand's flags default to "not given", so they do not undo the main parser's."""
    group = parser.add_mutually_exclusive_group()
    default = 0 if top else argparse.SUPPRESS
    group.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbosity",
                       default=default, help="show warnings only (no progress messages or bars)")
    group.add_argument("-v", "--verbose", action="store_const", const=1, dest="verbosity",
                       default=default, help="show debug messages too")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share a parser
                _add_verbosity(sub, top=False)


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
    if getattr(args, "verbosity", 0) < 0 and hasattr(args, "no_progress"):
        args.no_progress = True  # -q: no progress bars either
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        with cli_logging(getattr(args, "verbosity", 0)):  # finesift's messages to stderr
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
