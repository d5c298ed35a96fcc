"""Peak memory of a scoring pass at 1k, 10k and 100k pool examples.

    python benchmarks/memory_scale.py [--sizes 1000 10000 100000] [--model trunc|tiny|smollm2-135m]
                                      [--batch-size auto] [--out FILE.json]

Each pool size runs in its own subprocess, so the peaks are separate. The subprocess runs
``finesift select --method perplexity`` in-process (one forward pass over the pool on the
chunked path :func:`finesift.methods.uncertainty.forward_logprobs` ->
:func:`finesift.engine.scoring.token_logprobs`, the same engine call ToV's pool scoring
makes) on short synthetic prompt/completion records (``"Ann has 73 pears, buys 5. Over 76?"``
-> ``"yes"``, plain template, ~17 tokens of which 2 are labels) and reports:

* ``rss_before_scoring``: resident memory when the first scoring call starts (model,
  records, encoded examples all loaded);
* ``scoring_peak``: the highest resident memory seen (sampled every 5 ms) between the
  first scoring call's start and the last one's end, and ``scoring_growth`` = the two's
  difference (what the scoring pass itself adds);
* ``peak_rss``: the process's high-water mark (VmHWM) over the whole run, including
  reading, encoding, selecting and writing outputs.

Model ``trunc`` (default): SmolLM2-135M cut to its first decoder layer (the real
tokenizer, embedding, 49k-word LM head and their memory; a 30-layer pass over 100k
examples would take hours on a CPU). ``tiny``: the random test model (seconds).
``smollm2-135m``: the full model (use small sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NAMES = ["Ann", "Bob", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea",
         "Mo", "Nia", "Oto", "Pia", "Raj", "Sol", "Tess", "Uma", "Vic", "Wen", "Xia", "Yul"]
ITEMS = ["apples", "pears", "books", "coins", "cards", "stamps", "shells", "pens", "cups",
         "eggs", "plums", "nuts", "rocks", "beads", "kites", "socks"]
VERBS = [("buys", 1), ("finds", 1), ("gives away", -1), ("loses", -1), ("gets", 1), ("sells", -1)]


def records(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` short prompt/completion records: a yes/no question on a small sum."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        verb, sign = rng.choice(VERBS)
        a, b, c = rng.randint(10, 99), rng.randint(1, 9), rng.randint(1, 9)
        ask = a + rng.choice((-1, 1)) * c
        out.append({"id": f"m{i}",
                    "prompt": f"{name} has {a} {item}, {verb} {b}. Over {ask}?",
                    "completion": "yes" if a + sign * b > ask else "no"})
    return out


def _rss_kib() -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of this process in KiB."""
    rss = hwm = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return rss, hwm


def model_dir(kind: str, cache: Path) -> str:
    """A ``--model`` argument for ``kind`` (building the truncated or tiny model once)."""
    if kind == "smollm2-135m":
        return kind
    dest = cache / f"memscale-{kind}"
    if (dest / "config.json").exists():
        return str(dest)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if kind == "tiny":
        from finesift.testing import tiny_causal_lm, tiny_tokenizer

        words = sorted({w for r in records(200, 0) for w in
                        (r["prompt"] + " " + r["completion"]).replace("?", " ?").replace(",", " ,").split()})
        tok = tiny_tokenizer(words)
        model = tiny_causal_lm(len(tok), hidden=32, layers=2, seed=0)
    elif kind == "trunc":
        from finesift.models.loader import load_model

        b = load_model("smollm2-135m", "lm")
        model, tok = b.model, b.tokenizer
        model.model.layers = model.model.layers[:1]
        model.config.num_hidden_layers = 1
        if hasattr(model.config, "layer_types") and model.config.layer_types:
            model.config.layer_types = model.config.layer_types[:1]
    else:
        raise SystemExit(f"unknown --model {kind!r}")
    tmp = Path(tempfile.mkdtemp(dir=cache))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, dest)
    return str(dest)


def child(n: int, model: str, batch_size: str, work: Path) -> dict[str, Any]:
    """One pool size, in this process: write the files, run select, watch memory."""
    from finesift.cli import main as cli_main
    from finesift.engine import scoring
    from finesift.methods import uncertainty

    pool = work / "pool.jsonl"
    target = work / "target.jsonl"
    with pool.open("w", encoding="utf-8") as f:
        for r in records(n, seed=1):
            f.write(json.dumps(r) + "\n")
    with target.open("w", encoding="utf-8") as f:
        for r in records(8, seed=2):
            f.write(json.dumps(r) + "\n")

    state: dict[str, Any] = {"calls": 0, "t0": None, "t1": None, "before": None,
                             "peak": 0, "active": False, "tokens": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            if state["active"]:
                state["peak"] = max(state["peak"], _rss_kib()[0])
            time.sleep(0.005)

    real = scoring.token_logprobs

    def watched(model_, task, examples, **kw):
        if state["before"] is None:
            state["before"] = _rss_kib()[0]
            state["t0"] = time.perf_counter()
        state["active"] = True
        state["calls"] += 1
        state["tokens"] += sum(len(e) for e in examples)
        try:
            return real(model_, task, examples, **kw)
        finally:
            state["peak"] = max(state["peak"], _rss_kib()[0])
            state["t1"] = time.perf_counter()

    uncertainty.token_logprobs = watched
    scoring.token_logprobs = watched
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t = time.perf_counter()
    rc = cli_main(["select", "--method", "perplexity", "--pool", str(pool), "--target", str(target),
                   "--out", str(work / "out"), "--model", model, "--template", "plain",
                   "--budget", "10", "--batch-size", batch_size, "--no-progress"])
    wall = time.perf_counter() - t
    stop.set()
    th.join()
    if rc != 0:
        raise SystemExit(f"select failed with exit code {rc}")
    from finesift.store import peak_rss_mb

    # finesift's stages reset the OS's mark (VmHWM) per stage; peak_rss_mb keeps the
    # process's peak across those resets
    hwm = max(_rss_kib()[1], peak_rss_mb() * 1024.0)
    mib = 1024.0
    return {
        "pool_examples": n, "model": model, "batch_size": batch_size,
        "scored_tokens": state["tokens"], "scoring_calls": state["calls"],
        "seconds_total": round(wall, 2),
        "seconds_scoring": round((state["t1"] or 0) - (state["t0"] or 0), 2),
        "rss_before_scoring_mib": round(state["before"] / mib, 1),
        "scoring_peak_mib": round(state["peak"] / mib, 1),
        "scoring_growth_mib": round((state["peak"] - state["before"]) / mib, 1),
        "peak_rss_mib": round(hwm / mib, 1),
        "pool_file_mib": round(pool.stat().st_size / 2**20, 1),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [("| pool examples | scored tokens | total s | scoring s | RSS before scoring MiB "
             "| scoring peak MiB | scoring growth MiB | whole-run peak RSS MiB |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['pool_examples']} | {r['scored_tokens']} | {r['seconds_total']:.0f} "
            f"| {r['seconds_scoring']:.0f} | {r['rss_before_scoring_mib']:.0f} "
            f"| {r['scoring_peak_mib']:.0f} | {r['scoring_growth_mib']:.0f} "
            f"| {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--model", default="trunc", choices=["trunc", "tiny", "smollm2-135m"])
    ap.add_argument("--batch-size", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each child")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(child(args.child, args.model_dir, args.batch_size, args.work)))
        return 0
    os.environ.setdefault("FINESIFT_CACHE", "/tmp/fscache")
    cache = Path(os.environ["FINESIFT_CACHE"])
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    mdir = model_dir(args.model, cache)
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as work:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(n),
                   "--model-dir", mdir, "--batch-size", args.batch_size, "--work", work]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                return proc.returncode
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["model_kind"] = args.model
            rows.append(row)
            print(f"{n} examples: {row['seconds_total']:.0f} s, scoring growth "
                  f"{row['scoring_growth_mib']:.0f} MiB, peak {row['peak_rss_mib']:.0f} MiB",
                  flush=True)
    print(format_table(rows))
    total = time.perf_counter() - t0
    print(f"total {total:.0f} s (model {args.model}, batch size {args.batch_size})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "seconds_total": total}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
