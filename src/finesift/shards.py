"""Shard runs and ``finesift merge``.

``finesift select ... --num-shards N --shard-index I --out DIR`` reads and encodes the
whole pool (so methods that train on a sample of it, like ToV's base set, train exactly
as an unsharded run does), scores only shard I (the chunks ``c`` with ``c % N == I`` of
the length-sorted chunk grid of :mod:`finesift.store.chunks`) and writes to DIR:

* ``scores.parquet``: one row per scored example: ``pool_index`` (its position in the
  encoded pool), ``id``, ``source``, ``row``, ``score``, lengths and the method's columns;
* ``manifest.json``: the run's settings and a ``shard`` entry with N, I, the row count
  and the run fingerprint (method, options, seed, model, task, precision, batch size,
  max length, template, input format, the sha256 of every pool and target file, the
  encoded pool and target, N).

:func:`merge` checks that the folders hold every shard of one run exactly once, puts
the scores back in pool order (with ``--prefilter``, applying the cascade's score rule of
:mod:`finesift.select.prefilter` to the merged rows), applies the strategy and writes what an unsharded
``finesift select`` writes (``scores.parquet``, ``selected.jsonl`` with the records
exactly as read from the pool files, whose sha256 is checked first, ``manifest.json``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finesift.errors import InputError, OptionError
from finesift.pipeline import Selection
from finesift.store import Stopwatch, file_fingerprint
from finesift.store.chunks import ShardSpec
from finesift.store.run import (
    SETTING_KEYS,
    check_out_dir,
    run_manifest,
    selection_entries,
    write_run,
)

SHARD_KIND = "finesift-shard"
# Settings that must agree across the shards of one run (and enter the fingerprint).
RUN_KEYS = ("method", "method_options", "task", "seed", "max_length", "template",
            "precision", "batch_size", "format")


def _encoded_hash(examples: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(np.asarray(ex.input_ids, dtype=np.int64).tobytes())
        h.update(b"|")
        h.update(np.asarray(ex.labels, dtype=np.int64).tobytes())
        h.update(b"#")
    return h.hexdigest()


def run_identity(run: dict[str, Any], data: dict[str, Any], num_shards: int,
                 encoded: dict[str, str]) -> dict[str, Any]:
    """Everything two shards of one run must share (hashed into the fingerprint)."""
    model = run.get("model") or {}
    return {
        **{k: run.get(k) for k in RUN_KEYS},
        "model": {k: model.get(k) for k in ("name", "architecture", "n_parameters", "head")},
        "pool_sha256": [f["sha256"] for f in data["pool"]],
        "target_sha256": [f["sha256"] for f in data["target"]],
        "encoded": encoded,
        "num_shards": num_shards,
        # the weights' dtype when not fp32 (fp32 shards keep the fingerprint they had)
        **({"dtype": run["dtype"]} if run.get("dtype", "fp32") != "fp32" else {}),
        # --prefilter: its method, options, share and kept count (not its seconds)
        **({"prefilter": {k: run["prefilter"].get(k)
                          for k in ("method", "options", "share", "kept")}}
           if run.get("prefilter") else {}),
    }


def fingerprint(identity: dict[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def write_shard(
    out_dir: Path,
    shard: ShardSpec,
    enc_pool: Any,
    enc_target: Any,
    result: Any,
    *,
    run: dict[str, Any],
    data: dict[str, Any],
    watch: Stopwatch,
    t_start: float,
) -> Selection:
    """Write a shard run's ``scores.parquet`` and ``manifest.json`` (called by
    :func:`finesift.api.select`); returns a :class:`~finesift.pipeline.Selection` with no
    selected records."""
    n_pool = len(enc_pool.examples)
    rows = np.asarray(result.rows if result.rows is not None else np.arange(n_pool),
                      dtype=np.int64)
    scores = np.asarray(result.scores, dtype=np.float64)
    recs = [enc_pool.records[i] for i in rows]
    exs = [enc_pool.examples[i] for i in rows]
    columns: dict[str, Any] = {
        "pool_index": rows,
        "id": [r.id for r in recs],
        "source": [r.source for r in recs],
        "row": np.array([r.row for r in recs], dtype=np.int64),
        "score": scores,
        "n_label_tokens": np.array([e.n_label_tokens for e in exs], dtype=np.int64),
        "n_tokens": np.array([len(e) for e in exs], dtype=np.int64),
        "truncated": np.array([e.truncated for e in exs], dtype=bool),
    }
    if result.base_set is not None:
        columns["in_base_set"] = np.isin(rows, np.asarray(result.base_set))
    for name, col in result.columns.items():
        columns[name] = np.asarray(col)
    encoded = {"pool": _encoded_hash(enc_pool.examples),
               "target": _encoded_hash(enc_target.examples), "pool_size": str(n_pool)}
    identity = run_identity(run, data, shard.num_shards, encoded)
    shard_entry = {
        **shard.to_dict(),
        "fingerprint": fingerprint(identity),
        "rows": len(rows),
        "pool_size": n_pool,
        "assignment": "chunk c of the length-sorted chunk grid goes to shard c % N",
        "identity": identity,
    }
    manifest = run_manifest(run, data, {"kind": SHARD_KIND, "shard": shard_entry,
                                        "method_info": result.info},
                            watch=watch, t_start=t_start)
    # a rerun: no old manifest may vouch for the new scores (write_run removes it first);
    # the manifest, written last, names the scores file it belongs to
    write_run(out_dir, columns, manifest)
    return Selection(selected=[], scores=scores, pool=recs, columns=columns,
                     manifest=manifest, out=out_dir)


# -- merge -----------------------------------------------------------------------------


def _read_shard(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise InputError(str(folder), "not found (expected a shard run's --out folder)")
    man_path = folder / "manifest.json"
    if not man_path.exists():
        raise InputError(str(folder), "has no manifest.json: not a finished shard run "
                                      "(finesift select ... --shard-index I --out DIR)")
    try:
        man = json.loads(man_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(str(man_path), f"not valid JSON ({exc.msg})") from None
    if man.get("kind") != SHARD_KIND or "shard" not in man:
        raise InputError(str(folder), "is not a shard run's folder (its manifest.json has no "
                                      "shard entry; was it run with --shard-index?)")
    if not (folder / "scores.parquet").exists():
        raise InputError(str(folder), "has no scores.parquet")
    want = man["shard"].get("scores_sha256")
    if want and file_fingerprint(folder / "scores.parquet")["sha256"] != want:
        raise InputError(str(folder), "scores.parquet is not the file its manifest.json was "
                                      "written for (changed or replaced since)")
    return man


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def merge(
    shard_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    budget: str | int,
    strategy: str = "top",
    log: Callable[[str], None] | None = None,
) -> Selection:
    """Combine the shard folders of one run and select ``budget`` examples.

    Args:
        shard_dirs: the ``--out`` folders of the shard runs (any order).
        out: folder for ``scores.parquet``, ``selected.jsonl`` and ``manifest.json``,
            the same files an unsharded ``finesift select`` writes.
        budget: a count (``500``) or a share of the pool (``"10%"``).
        strategy: ``top`` (default), ``length-binned`` or ``score+random``.
        log: receives progress messages.

    Raises:
        InputError: a folder that is not a shard run, shards of different runs, a shard
            given twice or missing, rows that do not cover the pool exactly once, pool
            files that changed since the shards read them.
    """
    import pyarrow.parquet as pq

    from finesift.data.readers import load_records
    from finesift.select.strategies import STRATEGIES, parse_budget, score_table, select_indices

    log = log or (lambda msg: None)
    t_start = time.perf_counter()
    watch = Stopwatch()
    if strategy not in STRATEGIES:
        raise OptionError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    folders = [Path(d) for d in shard_dirs]
    if not folders:
        raise OptionError("merge needs at least one shard folder")
    out_dir = check_out_dir(out)

    with watch.stage("read_shards"):
        mans = [_read_shard(f) for f in folders]
        first, ref = folders[0], mans[0]["shard"]
        n_shards = ref["num_shards"]
        for f, m in zip(folders, mans, strict=True):
            sh = m["shard"]
            if sh["num_shards"] != n_shards:
                raise InputError(str(f), f"is shard {sh['index']} of {sh['num_shards']}, but "
                                         f"{first} is shard {ref['index']} of {n_shards}")
            if sh["fingerprint"] != ref["fingerprint"]:
                diff = _differences(sh.get("identity", {}), ref.get("identity", {}))
                raise InputError(str(f), f"belongs to another run than {first} (they differ in: "
                                         f"{', '.join(diff) or 'fingerprint'})")
        by_index: dict[int, Path] = {}
        for f, m in zip(folders, mans, strict=True):
            i = m["shard"]["index"]
            if i in by_index:
                raise InputError(str(f), f"is shard {i} of {n_shards}, which {by_index[i]} "
                                         "already is (a shard given twice)")
            by_index[i] = f
        missing = sorted(set(range(n_shards)) - set(by_index))
        if missing:
            raise InputError(", ".join(map(str, folders)),
                             f"shard(s) {', '.join(map(str, missing))} of {n_shards} missing "
                             f"(given: {', '.join(str(i) for i in sorted(by_index))})")
        tables = []
        for f, m in zip(folders, mans, strict=True):
            t = pq.read_table(f / "scores.parquet").to_pydict()
            if len(t.get("pool_index", [])) != m["shard"]["rows"]:
                raise InputError(str(f / "scores.parquet"),
                                 f"has {len(t.get('pool_index', []))} rows, its manifest says "
                                 f"{m['shard']['rows']}")
            tables.append(t)

    n_pool = int(ref["pool_size"])
    pool_index = np.concatenate([np.asarray(t["pool_index"], dtype=np.int64) for t in tables])
    owner = np.concatenate([np.full(len(t["pool_index"]), j) for j, t in enumerate(tables)])
    counts = np.bincount(pool_index, minlength=n_pool) if len(pool_index) else np.zeros(n_pool)
    if len(counts) > n_pool or (pool_index < 0).any():
        bad = int(owner[np.flatnonzero((pool_index < 0) | (pool_index >= n_pool))[0]])
        raise InputError(str(folders[bad]), f"has rows outside the pool of {n_pool} examples")
    if (counts > 1).any():
        dup = int(np.flatnonzero(counts > 1)[0])
        who = sorted({str(folders[j]) for j in owner[pool_index == dup]})
        raise InputError(str(who[-1]), f"pool example {dup} is scored in more than one shard "
                                       f"({', '.join(who)})")
    if (counts == 0).any():
        gone = np.flatnonzero(counts == 0)
        raise InputError(", ".join(map(str, folders)),
                         f"{len(gone)} pool example(s) are in no shard (first: {int(gone[0])})")
    order = np.argsort(pool_index, kind="stable")
    names = [c for c in tables[0] if c != "pool_index"]
    merged: dict[str, Any] = {}
    for c in names:
        if any(c not in t for t in tables):
            raise InputError(str(folders[[c in t for t in tables].index(False)]),
                             f"has no column {c!r} (other shards have it)")
        vals = list(itertools.chain.from_iterable(t[c] for t in tables))
        merged[c] = [vals[i] for i in order]

    run = {k: mans[0].get(k) for k in (*RUN_KEYS, "model")}
    data = mans[0]["data"]
    with watch.stage("read_pool"):
        paths = [f["path"] for f in data["pool"]]
        for rec in data["pool"]:
            if not Path(rec["path"]).exists():
                raise InputError(rec["path"], "not found: merge rereads the pool files the "
                                              "shard runs read, at the same paths")
            now = file_fingerprint(rec["path"])
            if now["sha256"] != rec["sha256"]:
                raise InputError(rec["path"], "changed since the shard runs read it (sha256 "
                                              f"{now['sha256'][:12]}, was {rec['sha256'][:12]})")
        records = load_records(paths, run.get("format"), role="pool",  # as the shards read
                               columns=mans[0].get("columns") or None)
        by_key = {(r.source, r.row): r for r in records}
        pool = []
        for src, row, rid in zip(merged["source"], merged["row"], merged["id"], strict=True):
            r = by_key.get((src, int(row)))
            if r is None or r.id != rid:
                raise InputError(src, f"record {rid!r} (row {row}) not found in the pool file")
            pool.append(r)

    scores = np.asarray(merged["score"], dtype=np.float64)
    n_label = np.asarray(merged["n_label_tokens"], dtype=np.int64)
    base_set = (np.flatnonzero(np.asarray(merged["in_base_set"], dtype=bool))
                if "in_base_set" in merged else None)
    k = parse_budget(budget, n_pool)
    prefilter = mans[0].get("prefilter")
    if "prefilter_kept" in merged:  # --prefilter: the cascade's rule over the whole pool
        from finesift.select.prefilter import cascade_scores, check_budget

        kept = np.asarray(merged["prefilter_kept"], dtype=bool)
        check_budget(f"{prefilter['method']}:{prefilter['share']}" if prefilter else "",
                     int(kept.sum()), k, n_pool)
        scores = cascade_scores(scores, np.asarray(merged["prefilter_score"]), kept)
    with watch.stage("select"):
        chosen = select_indices(scores, k, strategy=strategy, lengths=n_label,
                                base_set=base_set, seed=int(run["seed"]),
                                groups=np.asarray(merged["source"], dtype=str))
    selected = [pool[i] for i in chosen]
    # the column order of an unsharded run's scores.parquet
    columns: dict[str, Any] = score_table(
        merged["id"], merged["source"], merged["row"], scores, n_label, merged["n_tokens"],
        merged["truncated"], chosen)
    for c in names:
        if c not in columns:
            columns[c] = np.asarray(merged[c])

    shard_info = [
        {"folder": str(f), "index": m["shard"]["index"], "rows": m["shard"]["rows"],
         "device": m.get("device"), "wall_seconds": m.get("wall_seconds"),
         "peak_rss_mb": m.get("peak_rss_mb"), "method_info": m.get("method_info")}
        for f, m in sorted(zip(folders, mans, strict=True), key=lambda fm: fm[1]["shard"]["index"])
    ]
    manifest = run_manifest(
        {**{key: mans[0].get(key) for key in SETTING_KEYS}, "strategy": strategy,
         **({"columns": mans[0]["columns"]} if mans[0].get("columns") else {}),
         **({"prefilter": prefilter} if prefilter else {})}, data,
        {**selection_entries(budget, k, selected), "method_info": mans[0].get("method_info"),
         "merged_from": {"num_shards": n_shards, "fingerprint": ref["fingerprint"],
                         "shards": shard_info}},
        watch=watch, t_start=t_start)
    write_run(out_dir, columns, manifest, selected)
    log(f"merged {n_shards} shard(s): {n_pool} pool examples")
    return Selection(selected=selected, scores=scores, pool=pool, columns=columns,
                     manifest=manifest, out=out_dir)
