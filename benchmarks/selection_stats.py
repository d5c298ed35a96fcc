"""What each benchmark run selected, from the committed result rows and the suite's data.

For a token-tagging suite (records with ``tokens`` and ``tags``), prints per method and
budget: how many examples were selected, how many came from each pool source, the share of
selected sentences with at least one entity tag, and the entity mentions (``B-`` tags) per
selected sentence, next to the same figures for the whole pool and the run's entity F1.
For other suites it prints the source composition only.

It reads ``benchmarks/results/<suite>/results.jsonl`` (the ``selected_ids`` of each row)
and the pool files the suite's YAML names (build them with ``finesift bench-data``); it
loads no model.

Usage::

    python benchmarks/selection_stats.py benchmarks/ner-wnut.yaml [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import yaml


def read_pool(cfg_path: Path) -> dict[str, dict]:
    """The suite's pool records by id (each entry's first ``limit`` records, as the bench
    reads them), each with the source name of its pool entry."""
    cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    records: dict[str, dict] = {}
    for entry in cfg["pool"]:
        path = (cfg_path.parent / entry["path"]).resolve()
        if not path.exists():
            raise SystemExit(f"{path}: missing; build it with `finesift bench-data`")
        limit = entry.get("limit")  # the bench reads the first `limit` records
        n = 0
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                if limit is not None and n >= limit:
                    break
                r = json.loads(line)
                r["_source"] = entry.get("name", path.stem)
                records[str(r["id"])] = r
                n += 1
    return records


def tagged(r: dict) -> bool:
    return "tags" in r and "tokens" in r


def stats(ids: list[str], pool: dict[str, dict]) -> dict:
    rows = [pool[i] for i in ids if i in pool]
    out = {"n": len(ids), "found": len(rows),
           "sources": dict(sorted(Counter(r["_source"] for r in rows).items()))}
    tag_rows = [r for r in rows if tagged(r)]
    if tag_rows:
        with_entity = sum(any(t != "O" for t in r["tags"]) for r in tag_rows)
        mentions = sum(sum(t.startswith("B-") for t in r["tags"]) for r in tag_rows)
        out["with_entity"] = with_entity / len(tag_rows)
        out["mentions_per_sentence"] = mentions / len(tag_rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", type=Path, help="the suite's YAML, e.g. benchmarks/ner-wnut.yaml")
    ap.add_argument("--seed", type=int, default=None, help="only this seed's runs")
    args = ap.parse_args()
    cfg = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    results = args.config.parent / cfg.get("results", f"results/{cfg['name']}") / "results.jsonl"
    pool = read_pool(args.config)
    whole = stats(list(pool), pool)
    print(f"{cfg['name']}: pool of {whole['found']} records ({whole['sources']})"
          + (f"; with an entity: {100 * whole['with_entity']:.0f}%, "
             f"{whole['mentions_per_sentence']:.2f} mentions per sentence"
             if "with_entity" in whole else ""))
    header = "| method | budget | seed | selected | sources |"
    has_tags = "with_entity" in whole
    if has_tags:
        header += " with an entity | mentions / sentence | entity F1 |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    with results.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if args.seed is not None and row.get("seed") != args.seed:
                continue
            s = stats(row.get("selected_ids") or [], pool)
            if s["found"] != s["n"]:
                raise SystemExit(f"{results}: {row['key']}: {s['n'] - s['found']} selected "
                                 "id(s) not in the suite's pool files (rebuilt with other "
                                 "settings?)")
            cells = [row["method"], row["budget"], str(row["seed"]), str(s["n"]),
                     ", ".join(f"{k} {v}" for k, v in s["sources"].items())]
            if has_tags:
                f1 = row.get("test_f1")
                cells += ([f"{100 * s['with_entity']:.0f}%", f"{s['mentions_per_sentence']:.2f}"]
                          if "with_entity" in s else ["-", "-"])
                cells.append("-" if f1 is None else f"{f1:.2f}")
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
