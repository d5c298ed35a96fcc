"""``finesift bench``: every method x budget x seed of one configuration, measured.

For each method and seed the pool is scored once with :func:`finesift.api.select` (at
the largest budget); since a method's scores do not depend on the budget, each budget's
subset is then taken from those scores with the same strategy
(:func:`finesift.select.strategies.select_indices`), which gives exactly the subset
``select`` would return for that budget without scoring the pool again. Each subset is
fine-tuned on with the config's fixed hyperparameters and measured on the test set
(:func:`finesift.evaluate.finetune.finetune_and_evaluate`).

Outputs in the results folder:

* ``results.jsonl``: one line per finished run, appended as runs finish; a rerun skips
  the runs recorded there with ``status: ok`` (and reuses finished selections from
  ``selections/``), so an interrupted benchmark resumes.
* ``results.csv`` / ``results.json``: the same rows plus ``improvement_over_random_pct``.
* ``report.md`` / ``report.html``: see :mod:`finesift.evaluate.report`.

Configuration (YAML; paths relative to the file)::

    name: instruct-gsm8k
    task: lm                 # lm | ner
    model: smollm2-135m      # built-in name or a local path
    max_length: 256
    pool:
      - {name: sharegpt, path: data/sharegpt.jsonl, limit: 1500}
      - {name: gsm8k, path: data/gsm8k_pool.jsonl}
    target: {val: data/gsm8k_val.jsonl, test: data/gsm8k_test.jsonl}
    methods: [random, tov]   # or {tov: {mode: interleaved}}; an entry may also carry
                             # label, seeds and prefilter ("embed:20%": a cascade row)
    budgets: [128, 256]      # counts or percentages of the pool
    seeds: [0, 1, 2]
    finetune: {epochs: 1, lr: 2.0e-4, lora_rank: 16, batch_size: 8}
    device: cuda             # optional: where selection and fine-tuning run (default cpu)
    dtype: bf16              # optional: the dtype models are loaded in (default fp32)
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finesift.data.records import Record
from finesift.errors import FinesiftError, OptionError
from finesift.evaluate.finetune import FinetuneOptions, finetune_and_evaluate, label_names
from finesift.evaluate.leaderboard import SuiteResults, load_finished
from finesift.evaluate.tuning import check_grid, finished_tuning, tune_for_random
from finesift.store import Stopwatch

CONFIG_KEYS = ("name", "task", "model", "max_length", "pool", "target", "methods", "budgets",
               "seeds", "finetune")
OPTIONAL_KEYS = ("strategy", "tune", "results", "leaderboard", "flags", "skipped", "device",
                 "dtype")
# the keys a method entry may carry beside its one {name: options} pair
METHOD_ENTRY_KEYS = ("seeds", "label", "prefilter")

# --quick: a tiny random model and this many records
QUICK_POOL_PER_SOURCE = 24
QUICK_VAL = 8
QUICK_TEST = 16
QUICK_SEEDS = 2
QUICK_MAX_LENGTH = 64
QUICK_VOCAB = 400


class ConfigError(FinesiftError):
    """A malformed benchmark configuration (names the file and the key)."""

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(f"{path}: {message}")


@dataclass
class PoolSource:
    """One pool source: a name (used in composition plots), a file, an optional limit."""

    name: str
    path: Path
    limit: int | None = None


@dataclass
class MethodSpec:
    """A method of the config, with its options and a unique display label.

    ``seeds``: the seeds this method runs on when not all of the config's (a method too
    costly to run on every seed says so in the reports instead of being left out).
    ``prefilter``: a cascade (``"embed:20%"``, as ``select``'s ``prefilter=`` takes it, as
    written in the config): a cheap method ranks the pool and this method scores only the
    kept share; ``None`` for the plain method."""

    name: str
    options: dict[str, Any]
    label: str
    seeds: list[int] | None = None
    prefilter: str | dict[str, Any] | None = None

    @property
    def key(self) -> str:
        """Label plus a hash of the options (and of the prefilter, when there is one):
        changed options never reuse old runs. Without a prefilter the hash is of the
        options alone, as before prefilters existed, so committed results keep their keys."""
        from finesift.store.work import fingerprint

        identity = (self.options if self.prefilter is None
                    else {"options": self.options, "prefilter": self.prefilter})
        return f"{self.label}#{fingerprint(identity, version='bench-v0')}"

    @property
    def dirname(self) -> str:
        """Folder name of this method's selections."""
        return _slug(self.key.replace("#", "-"))


@dataclass
class BenchConfig:
    """A parsed benchmark configuration (see the module docstring for the YAML)."""

    path: Path
    name: str
    task: str
    model: str | None
    max_length: int | None
    pool: list[PoolSource]
    val: Path
    test: Path
    methods: list[MethodSpec]
    budgets: list[str | int]
    seeds: list[int]
    finetune: FinetuneOptions
    strategy: str = "top"
    tune: dict[str, list[Any]] | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    results: Path | None = None
    leaderboard: Path | None = None
    test_limit: int | None = None
    flags: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"  # where selections and fine-tunes run (`device:`, --device)
    dtype: str = "fp32"  # the dtype models are loaded in (`dtype:`, --dtype)


def _resolve(base: Path, value: Any, key: str, cfg_path: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(cfg_path, f"{key}: expected a file path, got {value!r}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _method_specs(value: Any, cfg_path: Path) -> list[MethodSpec]:
    if not isinstance(value, list) or not value:
        raise ConfigError(cfg_path, "methods: expected a non-empty list, e.g. [random, tov]")
    specs = []
    named = set()
    for item in value:
        if isinstance(item, str):
            specs.append(MethodSpec(item, {}, item))
            continue
        extra = {k: item[k] for k in METHOD_ENTRY_KEYS if isinstance(item, dict) and k in item}
        rest = {k: v for k, v in item.items() if k not in extra} if isinstance(item, dict) else {}
        if not isinstance(item, dict) or len(rest) != 1:
            raise ConfigError(cfg_path, f"methods: expected a name or {{name: {{options}}}} "
                                        f"(optionally with {', '.join(METHOD_ENTRY_KEYS)}), "
                                        f"got {item!r}")
        (name, opts), = rest.items()
        if opts is not None and not isinstance(opts, dict):
            raise ConfigError(cfg_path, f"methods: options of {name} must be a mapping")
        seeds = extra.get("seeds")
        if seeds is not None and (not isinstance(seeds, list) or not seeds or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
            raise ConfigError(cfg_path, f"methods: {name}.seeds: expected a non-empty list "
                                        f"of integers, got {seeds!r}")
        label = extra.get("label")
        if label is not None and (not isinstance(label, str) or not label.strip()
                                  or "|" in label or "#" in label):
            raise ConfigError(cfg_path, f"methods: {name}.label: expected a short name "
                                        f"without '|' or '#', got {label!r}")
        prefilter = _method_prefilter(extra.get("prefilter"), label or str(name), cfg_path)
        specs.append(MethodSpec(str(name), dict(opts or {}), label or str(name), seeds,
                                prefilter))
        if label:
            named.add(id(specs[-1]))
    counts = Counter(s.label for s in specs)
    for s in specs:
        if counts[s.label] > 1 and id(s) not in named:
            parts = [f"{k}={v}" for k, v in sorted(s.options.items())]
            if s.prefilter is not None:
                parts.append(f"prefilter={s.prefilter}")
            s.label = s.name + "[" + ",".join(parts) + "]"
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ConfigError(cfg_path, f"methods: listed twice with the same options: {labels}")
    return specs


def _method_prefilter(value: Any, who: str, cfg_path: Path) -> str | dict[str, Any] | None:
    """A method entry's ``prefilter`` checked with ``select``'s own parser
    (:func:`finesift.select.prefilter.parse_prefilter`) and returned as written (a string
    stripped of surrounding spaces), or ``None`` without one.

    Raises:
        ConfigError: a malformed spec, an unknown prefilter method, a bad share or an
            option the prefilter method rejects, naming the file, the method and the value.
    """
    from finesift.select.prefilter import EXAMPLES, parse_prefilter

    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
    elif not isinstance(value, dict):
        raise ConfigError(cfg_path, f"methods: {who}.prefilter: expected METHOD:SHARE "
                                    f"({EXAMPLES}), got {value!r}")
    try:
        parse_prefilter(value)
    except OptionError as exc:
        detail = str(exc).removeprefix("--prefilter ")
        # the parser names the spec first ("embed:abc: the share 'abc' must be ...")
        raise ConfigError(cfg_path, f"methods: {who}.prefilter: {detail}") from None
    return value


def load_config(path: str | Path) -> BenchConfig:
    """Read and validate a benchmark YAML; every error names the file and the key."""
    import yaml

    from finesift.api import check_method
    from finesift.select.strategies import STRATEGIES

    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "benchmark config not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(path, f"not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(path, "expected a mapping of keys (name, task, pool, target, ...)")
    unknown = sorted(set(raw) - set(CONFIG_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise ConfigError(path, f"unknown key(s) {', '.join(unknown)}; "
                                f"expected: {', '.join(CONFIG_KEYS)}")
    for key in ("name", "task", "pool", "target", "methods", "budgets"):
        if key not in raw:
            raise ConfigError(path, f"missing key '{key}'")
    base = path.resolve().parent
    task = raw["task"]
    from finesift.engine.tasks import TASKS

    if task not in TASKS:
        raise ConfigError(path, f"task: expected {' or '.join(TASKS)}, got {task!r}")
    if not isinstance(raw["pool"], list) or not raw["pool"]:
        raise ConfigError(path, "pool: expected a list of {name, path[, limit]}")
    pool = []
    for i, src in enumerate(raw["pool"]):
        if not isinstance(src, dict) or "path" not in src or "name" not in src:
            raise ConfigError(path, f"pool[{i}]: expected {{name, path[, limit]}}, got {src!r}")
        extra = sorted(set(src) - {"name", "path", "limit"})
        if extra:
            raise ConfigError(path, f"pool[{i}]: unknown key(s) {', '.join(extra)}")
        limit = src.get("limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise ConfigError(path, f"pool[{i}].limit: expected a positive count, got {limit!r}")
        pool.append(PoolSource(str(src["name"]), _resolve(base, src["path"], f"pool[{i}].path",
                                                          path), limit))
    names = [s.name for s in pool]
    if len(set(names)) != len(names):
        raise ConfigError(path, f"pool: source names must be unique, got {names}")
    target = raw["target"]
    if not isinstance(target, dict) or not {"val", "test"} <= set(target) <= {
            "val", "test", "test_limit"}:
        raise ConfigError(path, "target: expected {val: FILE, test: FILE[, test_limit: N]}")
    test_limit = target.get("test_limit")
    if test_limit is not None and (isinstance(test_limit, bool) or not isinstance(test_limit, int)
                                   or test_limit < 1):
        raise ConfigError(path, f"target.test_limit: expected a positive count, got "
                                f"{test_limit!r}")
    budgets = raw["budgets"]
    if not isinstance(budgets, list) or not budgets:
        raise ConfigError(path, "budgets: expected a non-empty list of counts or percentages")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in seeds
    ):
        raise ConfigError(path, "seeds: expected a non-empty list of integers")
    max_length = raw.get("max_length", 256)
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ConfigError(path, f"max_length: expected a positive integer, got {max_length!r}")
    strategy = raw.get("strategy", "top")
    if strategy not in STRATEGIES:
        raise ConfigError(path, f"strategy: expected one of {', '.join(STRATEGIES)}")
    ft_raw = raw.get("finetune") or {}
    if not isinstance(ft_raw, dict):
        raise ConfigError(path, "finetune: expected a mapping, e.g. {epochs: 1, lr: 2.0e-4}")
    device = raw.get("device", "cpu")
    if not isinstance(device, str) or not device.strip():
        raise ConfigError(path, f"device: expected a torch device (cpu, cuda, cuda:1), got "
                                f"{device!r}")
    dtype = raw.get("dtype", ft_raw.get("dtype", "fp32"))
    if "dtype" in raw and ft_raw.get("dtype", dtype) != dtype:
        raise ConfigError(path, f"dtype: {dtype} and finetune.dtype: {ft_raw['dtype']} "
                                "disagree (one dtype loads every model of the benchmark)")
    if dtype not in ("fp32", "bf16", "auto"):
        raise ConfigError(path, f"dtype: expected fp32, bf16 or auto, got {dtype!r} (fp16 "
                                "cannot fine-tune: it needs loss scaling)")
    ft_raw = {**ft_raw, "dtype": dtype}
    if "seed" in ft_raw:
        raise ConfigError(path, "finetune.seed: the run's seed is used; list seeds under 'seeds'")
    try:
        finetune = FinetuneOptions.from_dict({"max_length": max_length, **ft_raw})
        methods = _method_specs(raw["methods"], path)
        for m in methods:  # unknown method or option: fail before any work
            check_method(m.name, m.options)
        tune = check_grid(raw["tune"]) if raw.get("tune") is not None else None
    except OptionError as exc:
        raise ConfigError(path, str(exc)) from None
    for m in methods:
        if m.seeds is not None and not set(m.seeds) <= set(seeds):
            raise ConfigError(path, f"methods: {m.label}.seeds {m.seeds} must be among the "
                                    f"config's seeds {seeds}, so its runs pair with random's")
    flags = raw.get("flags") or []
    if not isinstance(flags, list) or not all(isinstance(f, str) and f for f in flags):
        raise ConfigError(path, "flags: expected a list of record field names, e.g. [corrupted]")
    skipped = raw.get("skipped") or {}
    if not isinstance(skipped, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in skipped.items()):
        raise ConfigError(path, "skipped: expected a mapping {method label: reason}")
    return BenchConfig(
        path=path, name=str(raw["name"]), task=task, model=raw.get("model"),
        max_length=max_length, pool=pool,
        val=_resolve(base, target["val"], "target.val", path),
        test=_resolve(base, target["test"], "target.test", path), test_limit=test_limit,
        methods=methods, budgets=list(budgets), seeds=list(seeds), finetune=finetune,
        strategy=strategy, tune=tune, raw=raw,
        results=_resolve(base, raw["results"], "results", path) if raw.get("results") else None,
        leaderboard=(_resolve(base, raw["leaderboard"], "leaderboard", path)
                     if raw.get("leaderboard") else None),
        flags=[str(f) for f in flags], skipped={str(k): str(v) for k, v in skipped.items()},
        device=device.strip(), dtype=dtype,
    )


# --------------------------------------------------------------------------- data


@dataclass
class BenchData:
    """The materialised inputs of a benchmark run (files under ``OUT/data``)."""

    pool_files: list[Path]
    source_of: dict[str, str]  # pool file (as given to select) -> source name
    val_file: Path
    test_file: Path
    pool: list[Record]
    val: list[Record]
    test: list[Record]
    full_pool_size: int


def _read(path: Path, role: str) -> list[Record]:
    from finesift.data.readers import load_records

    return load_records([str(path)], role=role)


def _raw_with_id(rec: Record) -> dict[str, Any]:
    raw = dict(rec.raw)
    raw.setdefault("id", rec.id)
    return raw


def prepare_data(cfg: BenchConfig, out: Path, *, quick: bool = False) -> BenchData:
    """Read the config's files, check the test set is unseen, write the pool (limits
    applied) and target as JSONL under ``out/data``.

    Raises:
        OverlapError: a test record duplicates a pool or val record.
    """
    from finesift.evaluate.overlap import check_no_overlap
    from finesift.store import write_jsonl

    data_dir = out / "data"
    sources = []
    for src in cfg.pool:
        recs = _read(src.path, f"pool source {src.name}")
        if src.limit is not None:
            recs = recs[: src.limit]
        sources.append((src, recs))
    val = _read(cfg.val, "val")
    test = _read(cfg.test, "test")
    if cfg.test_limit is not None:
        test = test[: cfg.test_limit]
    others: dict[str, list[Record]] = {f"pool source '{s.name}'": r for s, r in sources}
    others["val set"] = val
    check_no_overlap(test, others)

    full_pool_size = sum(len(r) for _, r in sources)
    if quick:
        sources = [(s, r[:QUICK_POOL_PER_SOURCE]) for s, r in sources]
        val, test = val[:QUICK_VAL], test[:QUICK_TEST]
    pool_files, source_of = [], {}
    for src, recs in sources:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", src.name)
        f = data_dir / f"pool-{safe}.jsonl"
        write_jsonl(f, (_raw_with_id(r) for r in recs))
        pool_files.append(f)
        source_of[str(f)] = src.name
    val_file, test_file = data_dir / "val.jsonl", data_dir / "test.jsonl"
    write_jsonl(val_file, (_raw_with_id(r) for r in val))
    write_jsonl(test_file, (_raw_with_id(r) for r in test))
    pool = [r for f in pool_files for r in _read(f, "pool")]
    return BenchData(pool_files, source_of, val_file, test_file, pool,
                     _read(val_file, "val"), _read(test_file, "test"), full_pool_size)


def quick_budgets(budgets: list[str | int], full_size: int, quick_size: int) -> list[str | int]:
    """Budgets for ``--quick``: the same share of the (smaller) pool, at least 2."""
    out: list[str | int] = []
    for b in budgets:
        text = str(b).strip()
        if text.endswith("%"):
            share = float(text[:-1]) / 100.0
        else:
            share = int(text) / max(1, full_size)
        k = int(min(quick_size - 1, max(2, round(share * quick_size))))
        if k not in out:
            out.append(k)
    return out


def build_quick_model(task: str, records: list[Record], folder: Path) -> Path:
    """Save a tiny random model whose vocabulary covers the data's most common words."""
    from finesift.data.records import record_text

    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    words: Counter[str] = Counter()
    for r in records:
        words.update(re.findall(r"\w+|[^\w\s]", record_text(r, normalise=True).replace("\x1f", " ")))
    common = [w for w, _ in words.most_common(QUICK_VOCAB)]
    from finesift.engine.tasks import task_class

    model, tok = task_class(task).tiny_model(common)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- runs


@dataclass
class BenchResult:
    """What :func:`run_bench` did."""

    out: Path
    rows: list[dict[str, Any]]
    n_done: int
    n_skipped: int
    n_failed: int
    seconds: float
    results: Path | None = None


LOSS_DIGITS = 5  # per-example test losses are stored rounded to this many decimals


def per_example(losses: Any) -> list[float | None]:
    """Per-example test losses as stored in ``results.jsonl`` (rounded; NaN as null)."""
    return [round(float(x), LOSS_DIGITS) if np.isfinite(x) else None
            for x in np.asarray(losses, dtype=np.float64)]


def run_key(label: str, budget: Any, seed: int) -> str:
    """The identity of one run in ``results.jsonl``."""
    return f"{label}|{budget}|{seed}"


def _append(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            torn = fh.read(1) != b"\n"  # a run killed mid-write: start a fresh line
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(("\n" if torn else "") + json.dumps(row, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")


def _selection(cfg: BenchConfig, data: BenchData, spec: MethodSpec, seed: int, budget: Any,
               model: str | None, out: Path, progress: bool,
               log: Callable[[str], None], *, per_budget: bool = False
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score the pool with ``spec`` at ``seed`` (or reuse a finished selection).

    ``per_budget``: the method's choice depends on the budget (HARP), so this selection
    is for ``budget`` alone and gets its own folder. Each method entry has its own work
    folder ``OUT/work/<method>``, where it keeps fingerprinted state (HARP's
    train-evaluate runs are reused across its budgets), so a method's selection cost is
    what it costs alone: no method reuses another's cached passes (perplexity and
    uncertainty would otherwise share one forward pass over the pool). A cascade entry
    (``spec.prefilter``) selects with ``select``'s ``prefilter=``; its key, hence its
    folders, differ from the plain method's, and a finished selection is reused only when
    it was made with the same prefilter (or, for the plain method, with none).

    Returns ``(columns, cost)``: the score table and the scoring stage's cost, with the
    method's scalar figures (``method_info``) from the manifest.
    """
    import pyarrow.parquet as pq

    from finesift.api import select

    tag = f"-b{_slug(str(budget))}" if per_budget else ""
    sel_dir = out / "selections" / f"{spec.dirname}-seed{seed}{tag}"
    done = sel_dir / "DONE.json"
    current = resolved_options(spec)
    if done.exists() and (sel_dir / "scores.parquet").exists():
        cost = {**json.loads(done.read_text()), "dir": sel_dir.name}
        if is_current(cost, current) and cost.get("prefilter") == spec.prefilter:
            return pq.read_table(sel_dir / "scores.parquet").to_pydict(), cost
        log(f"[{cfg.name}] {spec.label}, seed {seed}: the options or prefilter of the "
            f"selection in {sel_dir} differ from this run's: scoring again")
        done.unlink()
    costs = Stopwatch()
    log(f"[{cfg.name}] scoring the pool with {spec.label}, seed {seed} ...")
    with costs.stage("select"):
        sel = select(
            [str(p) for p in data.pool_files], str(data.val_file), budget=budget,
            method=spec.name, method_options=spec.options, task=cfg.task, model=model,
            strategy=cfg.strategy, seed=seed, out=sel_dir, max_length=cfg.max_length,
            progress=progress, log=log, workdir=out / "work" / spec.dirname,
            device=cfg.device, dtype=cfg.dtype, prefilter=spec.prefilter,
        )
    info = dict(sel.manifest.get("method_info") or {})
    cost = {**add_resumed_trials(costs.stages["select"], sel.manifest), "dir": sel_dir.name,
            "method_info": {k: v for k, v in info.items()
                            if isinstance(v, (int, float, str, bool)) or v is None},
            "resolved_options": current,
            **({"prefilter": spec.prefilter} if spec.prefilter is not None else {})}
    from finesift.store import write_json

    write_json(done, cost)
    return sel.columns, cost


def add_resumed_trials(cost: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """``cost`` (a selection's ``seconds``, ``cpu_seconds``, ...) with, for an ``auto``
    selection that resumed trials an earlier process ran, their recorded cost added:
    wall seconds always, CPU seconds where recorded (else ``cpu_partial``: the CPU figure
    is this process's only), so the row's selection cost is the whole of auto's,
    wherever its parts ran. Other selections' cost is returned as it is."""
    got = manifest.get("auto") or {}
    wall = float(got.get("resumed_trial_seconds") or 0.0)
    if wall <= 0:
        return cost
    out = {**cost, "seconds": round(float(cost.get("seconds") or 0.0) + wall, 3),
           "resumed_trial_seconds": wall}
    cpu = got.get("resumed_trial_cpu_seconds")
    if cpu is None:
        out["cpu_partial"] = True
    else:
        out["cpu_seconds"] = round(float(cost.get("cpu_seconds") or 0.0) + float(cpu), 3)
    return out


def _subset(columns: dict[str, Any], k: int, strategy: str, seed: int, *,
            as_selected: bool = False) -> list[int]:
    """The pool indices of a budget-``k`` subset cut from a score table; with
    ``as_selected``, the selection the table was written with (in selection order)."""
    from finesift.select.strategies import select_indices

    if as_selected:
        rank = np.asarray(columns["selection_rank"], dtype=np.int64)
        idx = np.flatnonzero(rank >= 0)
        return idx[np.argsort(rank[idx])].tolist()

    scores = np.asarray(columns["score"], dtype=np.float64)
    base = None
    if "in_base_set" in columns:
        base = np.flatnonzero(np.asarray(columns["in_base_set"], dtype=bool))
    return select_indices(scores, k, strategy=strategy,
                          lengths=np.asarray(columns["n_label_tokens"]),
                          base_set=base, seed=seed,
                          groups=np.asarray(columns["source"], dtype=str)).tolist()


def _base_figures(cfg: BenchConfig, data: BenchData, model: str | None, seed: int,
                  labels: list[str] | None, out: Path, log: Callable[[str], None]
                  ) -> dict[str, Any]:
    """The untouched model's test figures (cached; an NER head depends on the seed)."""
    from finesift.engine.tasks import task_class

    # a new classification head is drawn per seed, so the untouched model is too
    key = f"seed{seed}" if task_class(cfg.task).trains_head else "all"
    path = out / "base.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    if key in cache and "base_test_losses" in cache[key]:
        return cache[key]
    from finesift.store import write_json

    log(f"[{cfg.name}] measuring the untouched model on the test set ...")
    opts = FinetuneOptions(**{**cfg.finetune.__dict__, "seed": seed})
    res = finetune_and_evaluate(None, data.test, task=cfg.task, model=model, options=opts,
                                labels=labels, measure_base=True, device=cfg.device)
    cache[key] = {"base_test_loss": res.base_test_loss, "base_test_f1": res.base_f1,
                  "base_test_em": res.base_em,
                  "base_eval_seconds": res.costs.get("eval_base", {}).get("seconds"),
                  "base_test_losses": per_example(res.base_test_losses),
                  "test_ids": list(res.test_ids)}
    write_json(path, cache)
    return cache[key]


def run_bench(
    config: str | Path,
    *,
    out: str | Path | None = None,
    quick: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    report_only: bool = False,
    seeds_first: bool = False,
    only: Sequence[str] | None = None,
    only_seeds: Sequence[int] | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> BenchResult:
    """Run every method x budget x seed of a config (skipping finished runs) and report.

    Args:
        config: the benchmark YAML.
        out: the results folder (default ``runs/bench-<name>``, or ``...-quick``).
        quick: a tiny random model and a handful of records (a smoke run).
        progress: show progress bars on stderr.
        log: receives progress messages.
        report_only: run nothing; write the tables and reports from the finished runs
            (e.g. while another invocation is still running).
        seeds_first: run every method on the first seed before any method on the next
            (a whole leaderboard on fewer seeds early), instead of method by method.
        only: run only the methods with these labels (the others' finished runs still
            count in the report).
        only_seeds: run only these of the config's seeds.
        device: where selections and fine-tunes run (overrides the config's ``device``;
            default cpu). Not part of the setup: results resume on another device.
        dtype: the dtype every model is loaded in (overrides the config's ``dtype``):
            ``fp32`` (default), ``bf16`` or ``auto``; part of the setup when not fp32.
    """
    from finesift.evaluate.report import write_report
    from finesift.select.strategies import parse_budget

    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    cfg = load_config(config)
    if device is not None:
        cfg.device = device
    if dtype is not None:
        cfg.dtype = dtype
        try:
            cfg.finetune = FinetuneOptions.from_dict({**cfg.finetune.__dict__, "dtype": dtype})
        except OptionError as exc:
            raise ConfigError(cfg.path, f"--dtype: {exc}") from None
    from finesift.evaluate.finetune import resolve_finetune_dtype
    from finesift.pipeline import check_device

    check_device(cfg.device)
    # the fine-tunes' dtype as this machine resolves it (auto: bf16 where fast), so the
    # setup records what was used
    cfg.finetune = FinetuneOptions(**{**cfg.finetune.__dict__,
                                      "dtype": resolve_finetune_dtype(cfg.finetune, cfg.device)})
    out_dir = Path(out) if out else Path("runs") / f"bench-{cfg.name}{'-quick' if quick else ''}"
    out_dir.mkdir(parents=True, exist_ok=True)
    # the small files a suite's figures are rebuilt from (results.jsonl, setup, tuning,
    # the untouched model's losses, report.md) go to the config's `results` folder, which
    # a suite commits; selections, work state and the HTML report stay in out_dir
    res_dir = cfg.results if (cfg.results is not None and not quick) else out_dir
    res_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, out_dir, quick=quick)
    model = cfg.model
    budgets = list(cfg.budgets)
    seeds = list(cfg.seeds)
    finetune = cfg.finetune
    if quick:
        model = str(build_quick_model(cfg.task, data.pool + data.val + data.test,
                                      out_dir / "quick-model"))
        budgets = quick_budgets(budgets, data.full_pool_size, len(data.pool))
        seeds = seeds[:QUICK_SEEDS]
        finetune = FinetuneOptions(**{**finetune.__dict__, "max_length": QUICK_MAX_LENGTH,
                                      "epochs": 1.0, "lr": max(finetune.lr, 3e-3),
                                      "batch_size": 4, "em_samples": 0})
        cfg.max_length = QUICK_MAX_LENGTH
    counts = {}
    for b in budgets:
        try:
            counts[b] = parse_budget(b, len(data.pool))
        except OptionError as exc:
            raise ConfigError(cfg.path, f"budgets: {exc}") from None
    order = [] if report_only else run_order(cfg.methods, seeds, seeds_first)
    order = restrict_order(order, cfg, only, only_seeds)
    # before any tuning or run: a cascade that keeps fewer examples than the budget
    check_cascades(cfg, [spec for spec, _ in order], max(counts.values()), len(data.pool))
    labels = label_names(cfg.task, model, [data.pool, data.val, data.test])
    largest = max(budgets, key=lambda b: counts[b])
    tuning = None
    if report_only:
        setup_path = res_dir / "setup.json"
        if not setup_path.exists():
            raise ConfigError(cfg.path, f"--report-only: {res_dir} holds no benchmark results")
        finetune = FinetuneOptions(**{**finetune.__dict__,
                                      **json.loads(setup_path.read_text())["finetune"]})
        if cfg.tune:
            tuning = finished_tuning(res_dir, cfg.tune, finetune)
    elif cfg.tune:
        finetune, tuning = tune_for_random(
            cfg.tune, data.pool, data.val, task=cfg.task, model=model, base=finetune,
            k=counts[largest], seed=seeds[0], labels=labels, out=res_dir, progress=progress,
            log=lambda m: log(f"[{cfg.name}] {m}"), device=cfg.device)
        log(f"[{cfg.name}] fine-tuning hyperparameters tuned for random: {tuning['chosen']}")
    check_same_setup(res_dir, cfg, model, finetune, data, quick, runs=not report_only)
    write_suite_record(res_dir, cfg, model, budgets, seeds, quick)
    by_id = {r.id: r for r in data.pool}
    results_path = res_dir / "results.jsonl"
    finished = load_finished(results_path)
    # runs already fine-tuned, by (seed, training ids in order): an identical subset at the
    # same seed trains the identical model (same hyperparameters, checked above), so its
    # figures are reused instead of fine-tuning again (HARP often picks the same leaves
    # for several budgets)
    trained = {_train_key(r): r for r in finished.values() if _train_key(r) is not None}
    n_done = n_skipped = n_failed = 0

    from finesift.methods.base import available

    for spec, seed in order:
        per_budget = bool(getattr(available().get(spec.name), "uses_budget", False))
        current = resolved_options(spec)
        todo = []
        for b in budgets:
            row = finished.get(run_key(spec.key, b, seed), {})
            if row.get("status") == "ok" and not is_current(row, current):
                log(f"[{cfg.name}] {spec.label}, budget {b}, seed {seed}: its options "
                    "changed since it ran (a default?): running it again")
            elif row.get("status") == "ok":
                continue
            todo.append(b)
        n_skipped += len(budgets) - len(todo)
        if not todo:
            continue
        # one scoring per seed at the largest budget, or one per budget (HARP)
        groups = [[b] for b in todo] if per_budget else [todo]
        for group in groups:
            try:
                columns, sel_cost = _selection(
                    cfg, data, spec, seed, group[0] if per_budget else largest, model,
                    out_dir, progress, log, per_budget=per_budget)
                base = _base_figures(cfg, data, model, seed, labels, res_dir, log)
            except FinesiftError:
                raise
            except Exception as exc:  # noqa: BLE001 - a method crashed: record it, go on
                for b in group:
                    _append(results_path, _failed_row(cfg, spec, b, counts[b], seed, exc))
                    n_failed += 1
                continue
            for b in group:
                row = _one_run(cfg, data, spec, b, counts[b], seed, columns, sel_cost,
                               base, by_id, model, finetune, labels, progress, log,
                               as_selected=per_budget, trained=trained)
                _append(results_path, row)
                if (done_key := _train_key(row)) is not None:
                    trained.setdefault(done_key, row)
                if row["status"] == "ok":
                    n_done += 1
                else:
                    n_failed += 1

    rows = _ordered_rows(load_finished(results_path), cfg, budgets, seeds)
    add_improvements(rows)
    seconds = time.perf_counter() - t0
    write_tables(out_dir, rows)
    base_all = json.loads((res_dir / "base.json").read_text()) if (res_dir / "base.json").exists() else {}
    write_report(out_dir, cfg, rows, budgets=budgets, seeds=seeds, finetune=finetune,
                 model=model, quick=quick, data=data, seconds=seconds, tuning=tuning,
                 base=base_all, md_copy=res_dir if res_dir != out_dir else None,
                 methods=suite_methods(cfg, seeds))
    if cfg.leaderboard is not None and cfg.results is not None and not quick:
        from finesift.evaluate.leaderboard import write_leaderboard

        write_leaderboard(cfg.results.parent, cfg.leaderboard,
                          pending=pending_suites(cfg.path.parent, cfg.results.parent))
    return BenchResult(out_dir, rows, n_done, n_skipped, n_failed, seconds, res_dir)


def run_order(methods: list[MethodSpec], seeds: list[int],
              seeds_first: bool = False) -> list[tuple[MethodSpec, int]]:
    """The (method, seed) pairs in the order they run: method by method, or with
    ``seeds_first`` seed by seed (every method on seed 0, then every method on seed 1...)."""
    pairs = [(spec, seed) for spec in methods for seed in method_seeds(spec, seeds)]
    if seeds_first:
        pairs.sort(key=lambda p: seeds.index(p[1]))  # stable: methods keep config order
    return pairs


def restrict_order(order: list[tuple[MethodSpec, int]], cfg: BenchConfig,
                   only: Sequence[str] | None, only_seeds: Sequence[int] | None,
                   ) -> list[tuple[MethodSpec, int]]:
    """``order`` cut to the method labels in ``only`` and the seeds in ``only_seeds``
    (None: all); a label or seed the config does not have is an error naming the choices."""
    if only:
        labels = [spec.label for spec in cfg.methods]
        unknown = [lab for lab in only if lab not in labels]
        if unknown:
            raise ConfigError(cfg.path, f"--only: no method labelled {', '.join(unknown)}; "
                                        f"the config's methods: {', '.join(labels)}")
        order = [(spec, seed) for spec, seed in order if spec.label in only]
    if only_seeds:
        unknown_seeds = [s for s in only_seeds if s not in cfg.seeds]
        if unknown_seeds:
            raise ConfigError(cfg.path, f"--seeds: {', '.join(map(str, unknown_seeds))} not "
                                        f"among the config's seeds {list(cfg.seeds)}")
        order = [(spec, seed) for spec, seed in order if seed in only_seeds]
    return order


def check_cascades(cfg: BenchConfig, specs: Sequence[MethodSpec], k: int, n_pool: int) -> None:
    """Stop before any run when a cascade entry's prefilter keeps fewer than ``k`` (the
    largest budget) of the ``n_pool`` pool examples: ``select`` would stop that entry's
    selection only after the entries before it had run. (``select`` checks again on the
    usable pool, which ``--dedup`` may make smaller.)"""
    from finesift.select.prefilter import parse_prefilter

    for spec in {id(s): s for s in specs if s.prefilter is not None}.values():
        n_keep = parse_prefilter(spec.prefilter).count(n_pool)
        if n_keep < k:
            raise ConfigError(cfg.path, f"methods: {spec.label}.prefilter: {spec.prefilter} "
                                        f"keeps {n_keep} of the {n_pool} pool examples, "
                                        f"fewer than the largest budget {k}: keep at least "
                                        f"{k} (a larger share) or lower the budget")


def resolved_options(spec: MethodSpec) -> dict[str, Any] | None:
    """Every option of ``spec``'s method with its value in this run, defaults included
    (None for a method without an options dataclass, such as ``auto``). Recorded in each
    row and selection: a run whose recorded options differ (a default changed since) is
    run again instead of being reused. An option the method added later and leaves out
    of its keys while unset (:func:`~finesift.methods.base.option_identity`) is left out
    here too, so rows recorded before it existed stay current."""
    from finesift.methods.base import resolved_identity

    return resolved_identity(spec.name, spec.options)


def is_current(record: dict[str, Any], current: dict[str, Any] | None) -> bool:
    """Whether a finished row or selection was made with the options of this run (a
    record from before options were recorded counts as current)."""
    done = record.get("resolved_options")
    return current is None or done is None or done == current


def method_seeds(spec: MethodSpec, seeds: list[int]) -> list[int]:
    """The seeds ``spec`` runs on: the config's, or its own subset of them (with
    ``--quick``, the first of the quick seeds when its own are not among them)."""
    if spec.seeds is None:
        return list(seeds)
    own = [s for s in seeds if s in spec.seeds]
    return own or list(seeds[:1])


def pending_suites(config_dir: Path, results_root: Path) -> list[SuiteResults]:
    """The suites configured in ``config_dir`` (YAMLs whose ``results`` folder is under
    ``results_root``), as empty result sets: the leaderboard shows a column for each one
    that has no results yet, every cell marked, instead of leaving the suite out."""
    out = []
    for path in sorted(Path(config_dir).glob("*.yaml")):
        try:
            cfg = load_config(path)
        except ConfigError:
            continue
        if cfg.results is None or cfg.results.resolve().parent != Path(results_root).resolve():
            continue
        meta = {"name": cfg.name, "seeds": cfg.seeds, "skipped": cfg.skipped,
                "budgets": [str(b) for b in cfg.budgets], "flags": cfg.flags,
                "methods": suite_methods(cfg, cfg.seeds)}
        out.append(SuiteResults(cfg.name, cfg.results, meta, []))
    return out


def suite_methods(cfg: BenchConfig, seeds: list[int]) -> list[dict[str, Any]]:
    """The config's methods as the reports and the leaderboard see them."""
    return [{"label": m.label, "name": m.name, "options": m.options, "key": m.key,
             "seeds": method_seeds(m, seeds),
             **({"prefilter": m.prefilter} if m.prefilter is not None else {})}
            for m in cfg.methods]


def write_suite_record(res_dir: Path, cfg: BenchConfig, model: str | None, budgets: list,
                       seeds: list[int], quick: bool) -> None:
    """``suite.json``: what the leaderboard needs besides the runs (the methods in order,
    their seeds, the methods left out and why), so it is rebuilt from result files alone."""
    from finesift.store import write_json

    write_json(res_dir / "suite.json", {
        "name": cfg.name, "task": cfg.task, "model": "tiny random (--quick)" if quick else model,
        "budgets": [str(b) for b in budgets], "seeds": list(seeds), "flags": cfg.flags,
        "methods": suite_methods(cfg, seeds),
        "skipped": cfg.skipped, "config": cfg.path.name,
    })


def check_same_setup(out: Path, cfg: BenchConfig, model: str | None,
                     finetune: FinetuneOptions, data: BenchData, quick: bool, *,
                     runs: bool = True) -> None:
    """Refuse to resume into a results folder made with other data or hyperparameters.

    Everything a run's figures depend on except the method, budget and seed (those are in
    each run's key) is recorded in ``OUT/setup.json`` on the first invocation. That
    includes ``auto_precision: bf16`` where ``auto`` precision means bf16 on this device
    (a CPU with fast bf16, a GPU with bf16): fine-tunes and selections there autocast to
    bf16, so their figures do not mix with fp32 ones (left out where ``auto`` is fp32, so
    folders from before the key match). ``runs=False`` (``--report-only``, which runs
    nothing) does not compare it.
    """
    from finesift.engine.precision import resolve
    from finesift.store import file_fingerprint, write_json

    setup = {
        "task": cfg.task, "model": "tiny random (--quick)" if quick else str(model),
        "max_length": cfg.max_length,
        "strategy": cfg.strategy, "quick": quick,
        "finetune": finetune.setup_fields(),
        "data": {p.name: file_fingerprint(p)["sha256"]
                 for p in [*data.pool_files, data.val_file, data.test_file]},
        # the selections' dtype as given (fp32 left out: setups from before dtypes match)
        **({"dtype": cfg.dtype} if cfg.dtype != "fp32" else {}),
        **({"auto_precision": "bf16"} if resolve("auto", cfg.device) == "bf16" else {}),
    }
    setup = json.loads(json.dumps(setup, default=str))
    path = out / "setup.json"
    if path.exists():
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(setup) if old.get(k) != setup.get(k)
                         and (runs or k != "auto_precision"))
        if changed:
            hint = ""
            if "auto_precision" in changed:
                hint = (" (auto precision is bf16 on this device and fp32 where those results "
                        "were measured, or the other way round: FINESIFT_FAST_BF16=0 or =1 "
                        "makes this CPU match them)")
            raise ConfigError(cfg.path, f"{out} holds results of another setup (changed: "
                                        f"{', '.join(changed)}){hint}; use another --out "
                                        "or delete it")
        return
    write_json(path, setup)


def _failed_row(cfg: BenchConfig, spec: MethodSpec, budget: Any, k: int, seed: int,
                exc: BaseException) -> dict[str, Any]:
    return {"key": run_key(spec.key, budget, seed), "config": cfg.name, "method": spec.label,
            "method_name": spec.name,
            **({"prefilter": spec.prefilter} if spec.prefilter is not None else {}),
            "budget": str(budget), "budget_count": k, "seed": seed,
            "status": "failed", "error": f"{type(exc).__name__}: {exc}",
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _train_key(row: dict[str, Any]) -> tuple[int, tuple[str, ...]] | None:
    """What decides a finished run's fine-tuned model besides the (fixed) setup: its seed
    and its training ids in order; ``None`` for a failed run or an empty selection."""
    if row.get("status") != "ok" or not row.get("selected_ids"):
        return None
    return int(row["seed"]), tuple(row["selected_ids"])


# the figures a reused run takes over from the run that trained the same subset
_REUSED_FIGURES = ("test_loss", "improvement_over_base_pct", "test_f1", "test_em",
                   "em_samples", "n_train", "n_test", "train_loss", "test_losses",
                   "worse_than_untouched")


def _one_run(cfg, data, spec, budget, k, seed, columns, sel_cost, base, by_id, model, finetune,
             labels, progress, log, as_selected: bool = False,
             trained: dict[tuple[int, tuple[str, ...]], dict[str, Any]] | None = None
             ) -> dict[str, Any]:
    chosen = _subset(columns, k, cfg.strategy, seed, as_selected=as_selected)
    ids = [columns["id"][i] for i in chosen]
    train = [by_id[i] for i in ids]
    comp = Counter(data.source_of.get(r.source, r.source) for r in train)
    opts = FinetuneOptions(**{**finetune.__dict__, "seed": seed})
    row: dict[str, Any] = {
        "key": run_key(spec.key, budget, seed), "config": cfg.name, "method": spec.label,
        "method_name": spec.name, "method_options": json.dumps(spec.options, sort_keys=True),
        "resolved_options": resolved_options(spec),
        "budget": str(budget), "budget_count": k, "seed": seed,
    }
    if spec.prefilter is not None:  # a cascade row (rows of plain methods stay as they were)
        row["prefilter"] = spec.prefilter
    info = sel_cost.get("method_info") or {}
    row["method_info"] = info
    from finesift.methods.base import report_columns

    # what each method says to report, and auto's winner (set by _select above)
    for key in (*report_columns(), "auto_winner"):
        if key in info:
            row[key] = info[key]
    base_loss = base.get("base_test_loss")
    for flag in cfg.flags:  # e.g. the share of corrupted examples in the selection
        row[f"share_{flag}"] = (float(np.mean([bool(r.raw.get(flag)) for r in train]))
                                if train else None)
    if not train:  # the method chose nothing: the model stays untouched
        log(f"[{cfg.name}] {spec.label}, budget {budget}, seed {seed}: empty selection, "
            "the untouched model's figures")
        row.update({
            "status": "ok", "test_loss": base_loss, "base_test_loss": base_loss,
            "improvement_over_base_pct": 0.0, "test_f1": base.get("base_test_f1"),
            "base_test_f1": base.get("base_test_f1"), "test_em": base.get("base_test_em"),
            "base_test_em": base.get("base_test_em"), "n_train": 0, "composition": {},
            "test_losses": base.get("base_test_losses"), "worse_than_untouched": False,
            **{f"n_from_{name}": 0 for name in sorted(set(data.source_of.values()))},
            "select_seconds": sel_cost.get("seconds"),
            "select_peak_rss_mb": sel_cost.get("peak_rss_mb"), "finetune_seconds": 0.0,
            "eval_seconds": 0.0, "selected_ids": [],
            "selection_dir": str(Path("selections") / Path(sel_cost.get("dir", "")).name),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        return row
    common = {
        "base_test_loss": base_loss, "base_test_f1": base.get("base_test_f1"),
        "base_test_em": base.get("base_test_em"),
        "composition": dict(sorted(comp.items())),
        **{f"n_from_{name}": comp.get(name, 0) for name in sorted(set(data.source_of.values()))},
        "select_seconds": sel_cost.get("seconds"),
        "select_peak_rss_mb": sel_cost.get("peak_rss_mb"),
        "select_cpu_seconds": sel_cost.get("cpu_seconds"),
        **({"select_cpu_partial": True} if sel_cost.get("cpu_partial") else {}),
        **({"resumed_trial_seconds": sel_cost["resumed_trial_seconds"]}
           if sel_cost.get("resumed_trial_seconds") else {}),
        "selected_ids": ids,
        "selection_dir": str(Path("selections") / Path(sel_cost.get("dir", "")).name),
    }
    same = (trained or {}).get((seed, tuple(ids)))
    if same is not None:
        log(f"[{cfg.name}] {spec.label}, budget {budget}, seed {seed}: the same {len(ids)} "
            f"examples in the same order as {same['key']}: its figures are reused, not "
            "fine-tuned again")
        row.update({**common, **{key: same.get(key) for key in _REUSED_FIGURES},
                    "status": "ok", "reused_from": same.get("reused_from") or same["key"],
                    "finetune_seconds": 0.0, "eval_seconds": 0.0,
                    "finetune_cpu_seconds": 0.0, "eval_cpu_seconds": 0.0,
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    # where this row's selection ran (its fine-tune's row has its own)
                    "machine": machine()})
        return row
    log(f"[{cfg.name}] {spec.label}, budget {budget}, seed {seed}: fine-tuning on {len(train)} "
        f"({dict(comp)}) ...")
    try:
        res = finetune_and_evaluate(train, data.test, task=cfg.task, model=model, options=opts,
                                    labels=labels, measure_base=False, progress=progress,
                                    device=cfg.device)
    except Exception as exc:  # noqa: BLE001 - recorded; the next run goes on
        return {**_failed_row(cfg, spec, budget, k, seed, exc), **row, "status": "failed"}
    ft, ev = res.costs.get("finetune", {}), res.costs.get("eval", {})
    row.update({
        **common,
        "status": "ok",
        "test_loss": res.test_loss,
        "improvement_over_base_pct": (100.0 * (base_loss - res.test_loss) / base_loss
                                      if base_loss else None),
        "worse_than_untouched": bool(base_loss is not None and res.test_loss > base_loss),
        "test_losses": per_example(res.test_losses),
        "test_f1": res.f1, "test_em": res.em, "em_samples": res.em_n,
        "n_train": res.n_train, "n_test": res.n_test, "train_loss": res.train_loss,
        "finetune_seconds": ft.get("seconds"), "finetune_peak_rss_mb": ft.get("peak_rss_mb"),
        "eval_seconds": ev.get("seconds"), "eval_peak_rss_mb": ev.get("peak_rss_mb"),
        "finetune_cpu_seconds": ft.get("cpu_seconds"), "eval_cpu_seconds": ev.get("cpu_seconds"),
        "load_seconds": res.costs.get("load_model", {}).get("seconds"),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
    })
    # GPU memory beside resident memory, on runs that used CUDA (absent on a CPU)
    for name, stage in (("select", sel_cost), ("finetune", ft), ("eval", ev)):
        if stage.get("peak_gpu_mb") is not None:
            row[f"{name}_peak_gpu_mb"] = stage["peak_gpu_mb"]
    return row


def machine() -> str:
    """The CPU model, its fast-bf16 support and torch's threads: seconds measured on
    different machines do not compare, so every row says where it ran."""
    import platform

    import torch

    from finesift.engine.precision import _cpu_flags_have_bf16, cpu_has_fast_bf16

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # this run used CUDA
        gpu = f", GPU {torch.cuda.get_device_name()}"
    return (f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
            f"{', fast bf16' if cpu_has_fast_bf16() else ''}"
            f"{', fast bf16 off (FINESIFT_FAST_BF16=0)' if _cpu_flags_have_bf16() and not cpu_has_fast_bf16() else ''}"
            f"{gpu}")


def _ordered_rows(finished: dict[str, dict[str, Any]], cfg: BenchConfig, budgets: list,
                  seeds: list[int]) -> list[dict[str, Any]]:
    rows = []
    for spec in cfg.methods:
        for b in budgets:
            for s in method_seeds(spec, seeds):
                row = finished.get(run_key(spec.key, b, s))
                if row is not None:
                    rows.append(row)
    return rows


def add_improvements(rows: list[dict[str, Any]]) -> None:
    """Add ``improvement_over_random_pct``: 100 (L_random - L) / L_random, paired by budget
    and seed (``None`` without a finished random run for that budget and seed)."""
    rand = {(r["budget"], r["seed"]): r["test_loss"] for r in rows
            if r.get("method") == "random" and r.get("status") == "ok"}
    for r in rows:
        ref = rand.get((r.get("budget"), r.get("seed")))
        ok = r.get("status") == "ok" and ref
        r["improvement_over_random_pct"] = 100.0 * (ref - r["test_loss"]) / ref if ok else None


TABLE_COLUMNS = (
    "method", "budget", "budget_count", "seed", "status", "test_loss", "base_test_loss",
    "improvement_over_random_pct", "improvement_over_base_pct", "test_f1", "base_test_f1",
    "test_em", "base_test_em", "em_samples", "n_train", "n_test", "train_loss",
    "select_seconds", "select_peak_rss_mb", "finetune_seconds", "finetune_peak_rss_mb",
    "eval_seconds", "eval_peak_rss_mb", "load_seconds", "select_cpu_seconds",
    "finetune_cpu_seconds", "eval_cpu_seconds", "method_options", "selection_dir",
    "finished_at", "error",
)


def write_tables(out: Path, rows: list[dict[str, Any]]) -> None:
    """``results.csv`` (flat columns, composition as ``n_from_<source>``) and
    ``results.json`` (full rows), both written atomically."""
    import csv

    from finesift.store import atomic_path, write_json

    extra = sorted({k for r in rows for k in r if k.startswith(("n_from_", "share_"))})
    extra.append("worse_than_untouched")
    from finesift.methods.base import report_columns

    cols = list(TABLE_COLUMNS[:17]) + extra + list(report_columns()) + list(TABLE_COLUMNS[17:])
    if any(r.get("prefilter") is not None for r in rows):  # a suite with a cascade row
        cols.insert(cols.index("method_options") + 1, "prefilter")
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="",
                                                       encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    write_json(out / "results.json", rows)
