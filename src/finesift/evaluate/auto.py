"""``--method auto``: pick the selection method on the user's own target examples.

The target examples are split into ``folds`` seeded folds. For each fold, every
candidate method selects from (a seeded, per-source-stratified subsample of) the pool
with the *other* folds as its target; a freshly loaded model is LoRA fine-tuned briefly
on each selection (:func:`finesift.evaluate.finetune.finetune_and_evaluate`, a fixed
number of steps, so every candidate gets the same training) and its loss is measured on
the held-out fold, which that candidate never saw. The candidate with the lowest mean
held-out loss wins (ties: the cheaper method, then the earlier candidate) and selects
from the whole pool with every target example, through the normal
:func:`finesift.api.select` path. The trial table, the winner and the settings go into
the final manifest's ``auto`` section.

``random`` is always a candidate: it is the floor every other candidate is compared to
(``improvement_over_random_pct``, paired by fold and seed).

Resume: everything lives under ``WORK/auto`` (``WORK`` is the run's work folder,
``OUT/.work`` by default): the trial data (subsampled pool files, one target file per
fold), each trial's selection (``trials/<method>-f<fold>-s<seed>-<hash>/``, finished
once its ``trial.json`` exists), each fine-tune's figures (``finetunes/<hash>.json``) and
the methods' own resumable state (``work/``). A killed run started again redoes only
what had not finished; two candidates that chose the same subset share one fine-tune.

This module orchestrates selection and evaluation, so it sits above both:
``finesift.api.select`` imports it lazily (only when ``method == "auto"``) and hands it
the plain select as ``select_with``; it imports the shared pieces from
:mod:`finesift.pipeline`, never :mod:`finesift.api` (which imports it: no cycle).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finesift import pipeline
from finesift.config import FinetuneFields, from_mapping, option
from finesift.data.records import Record
from finesift.errors import FinesiftError, OptionError
from finesift.evaluate.finetune import (
    FinetuneOptions,
    finetune_and_evaluate,
    finetune_key_fields,
    label_names,
)
from finesift.methods.base import available, get_method, model_identity
from finesift.store import write_json

NAME = "auto"
DESCRIPTION = ("picks the method on your own target examples: k-fold trials (each candidate "
               "selects with the other folds, a short fine-tune, loss on the held-out fold)")
FLOOR = "random"
DEFAULT_LR = {"lm": 2e-4, "ner": 5e-4}
# Tie-break between candidates with the same mean held-out loss (e.g. the same subset):
# the cheaper method first (rough cost per pool example, see the README's method table).
COST_RANK = {"random": 0, "dsir": 1, "embed": 2, "perplexity": 3, "uncertainty": 3, "tov": 4,
             "less": 5, "tracin": 5, "harp": 6, "harp-c": 6, "harp-e": 6}
_UNKNOWN_COST = 5
_DATA_VERSION = "auto-data-v1"
_TRIAL_VERSION = "auto-trial-v1"
_FINETUNE_VERSION = "auto-ft-v1"


@dataclass
class _Trials:
    """auto's own options (the first in listings; :class:`AutoOptions` documents them)."""

    candidates: str = "embed,dsir,tov,random"
    folds: int = option(2, minimum=2)
    trial_pool: int = option(2000, minimum=1)
    seeds: int = option(1, minimum=1)


@dataclass
class AutoOptions(FinetuneFields, _Trials):
    """Options of ``--method auto`` (``-o KEY=VALUE``): its own, then the trial
    fine-tunes' :class:`~finesift.config.FinetuneFields` (``steps`` and ``lr`` with other
    defaults; a LoRA adapter always, ``lora_rank`` >= 1).

    Attributes:
        candidates: comma-separated methods to try (``random`` is always added: it is the
            floor). Default ``embed,dsir,tov,random``.
        folds: target folds (>= 2); each candidate selects once per fold with the other
            folds as its target and is measured on the held-out fold (default 2).
        trial_pool: the trials select from a seeded subsample of this many pool examples,
            stratified by pool file (default 2000; the whole pool if it is smaller).
        steps: optimiser steps of each trial fine-tune (default 20).
        lr: learning rate of the trial fine-tunes (default 2e-4 for lm, 5e-4 for ner).
        seeds: seeds per fold (the run's seed, seed + 1, ...); each seed reselects and
            fine-tunes again (default 1).
        batch_size: examples per trial fine-tune step (default 8).
        lora_rank: LoRA rank of the trial fine-tunes (default 16).
        max_length: trial fine-tunes truncate examples to this many tokens (default 256,
            at most the run's ``max_length``).
    """

    steps: int = option(20, minimum=1)
    lr: float | None = None

    def validate(self) -> None:
        """What :func:`parse_options` checks beyond the declared types and minimums."""
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise OptionError(f"method 'auto': option lr must be a positive number, "
                              f"got {self.lr!r}")
        if self.lora_rank < 1:  # the trials train an adapter (no full fine-tuning)
            raise OptionError(_below("lora_rank", self.lora_rank, 1))
        if self.max_length is None:
            raise OptionError(_not_integer("max_length", None))


@dataclass
class AutoPlan:
    """Parsed and validated ``auto`` options.

    Attributes:
        options: the auto options proper.
        candidates: the candidate method names in trial order (``random`` included).
        candidate_options: per candidate, its own options (``-o METHOD.KEY=VALUE``).
    """

    options: AutoOptions
    candidates: list[str]
    candidate_options: dict[str, dict[str, Any]]


def _not_integer(key: str, value: Any) -> str:
    return f"method 'auto': option {key}={value!r} is not an integer"


def _below(key: str, value: Any, low: float) -> str:
    return f"method 'auto': option {key} must be at least {low:g}, got {value}"


def _candidate_list(value: Any) -> list[str]:
    if isinstance(value, str):
        names = value.split(",")
    elif isinstance(value, (list, tuple)):
        names = [str(v) for v in value]
    else:
        raise OptionError(f"method 'auto': candidates must be a comma-separated list of "
                          f"methods, got {value!r}")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise OptionError("method 'auto': candidates is empty; e.g. -o candidates=embed,dsir,tov")
    return names


def parse_options(values: dict[str, Any] | None) -> AutoPlan:
    """Validate ``auto``'s options (``METHOD.KEY`` keys are a candidate's own options).

    Raises:
        OptionError: an unknown or out-of-range option, an unknown candidate (the message
            lists the registered methods), ``auto`` as a candidate, an option of a method
            that is not a candidate, or a candidate option its method rejects.
    """
    values = dict(values or {})
    plain = {k: v for k, v in values.items() if "." not in k}
    dotted = {k: v for k, v in values.items() if "." in k}

    def unknown(bad: list[str], known: list[str]) -> str:
        hint = ""
        if any(k in ("mode", "proxy", "envelope", "rounds", "embedder") for k in bad):
            k = next(k for k in bad if k in ("mode", "proxy", "envelope", "rounds", "embedder"))
            hint = f"; a candidate's own option goes as METHOD.KEY, e.g. METHOD.{k}=..."
        return (f"method 'auto' has no option(s) {', '.join(bad)}; its options are: "
                f"{', '.join(known)}, and METHOD.KEY for a candidate's own option "
                f"(e.g. tov.mode=basic){hint}")

    opts = from_mapping(AutoOptions, plain, shown=lambda k, v: f"method 'auto': option {k}={v!r}",
                        unknown=unknown, not_integer=_not_integer, below=_below)

    registered = available()
    names = list(dict.fromkeys(_candidate_list(opts.candidates)))  # a list (YAML) or text
    if NAME in names:
        raise OptionError("method 'auto' cannot be one of its own candidates; "
                          f"choose from: {', '.join(registered)}")
    bad = [n for n in names if n not in registered]
    if bad:
        raise OptionError(f"method 'auto': unknown candidate method(s) {', '.join(map(repr, bad))}; "
                          f"registered methods: {', '.join(registered)}")
    if FLOOR not in names:
        names.append(FLOOR)  # the floor every candidate is measured against
    opts.candidates = ",".join(names)

    per: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in dotted.items():
        method, _, sub = key.partition(".")
        method, sub = method.strip(), sub.strip()
        if not sub:
            raise OptionError(f"method 'auto': option {key!r}: expected METHOD.KEY=VALUE, "
                              "e.g. tov.mode=basic")
        if method not in per:
            raise OptionError(f"method 'auto': option {key}: {method!r} is not a candidate "
                              f"(candidates: {', '.join(names)})")
        per[method][sub] = value
    for name in names:
        get_method(name, per[name])  # the method's own validation (unknown keys, ranges)
    return AutoPlan(opts, names, per)


def describe_options() -> list[tuple[str, str]]:
    """``(name, default as shown)`` of every option, for ``finesift methods``."""
    defaults = AutoOptions()
    shown = {"lr": "None (2e-4 for lm, 5e-4 for ner)"}
    return [(f.name, shown.get(f.name, repr(getattr(defaults, f.name))))
            for f in dataclasses.fields(AutoOptions)]


# --------------------------------------------------------------------------- helpers


def _hash(obj: Any, n: int = 12) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def _raw_with_id(rec: Record) -> dict[str, Any]:
    """The record as read, with its id made explicit (a default id names the original file
    and line, which a copy in another file would not keep)."""
    raw = dict(rec.raw)
    if raw.get("id") is None or raw.get("id") == "":
        raw["id"] = rec.id
    return raw


def _write_once(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    from finesift.store import write_jsonl

    if not path.exists():  # deterministic content: a resumed run finds the same file
        write_jsonl(path, rows)


def stratified_sample(sources: Sequence[str], n: int, seed: int) -> np.ndarray:
    """Indices of ``n`` of ``len(sources)`` items, seeded, each source getting its share
    of ``n`` in proportion to its size (largest remainders); sorted."""
    total = len(sources)
    if n >= total:
        return np.arange(total)
    names = list(dict.fromkeys(sources))
    src = np.asarray([names.index(s) for s in sources]) if len(names) > 1 else np.zeros(
        total, dtype=int)
    sizes = np.bincount(src, minlength=len(names))
    exact = sizes * n / total
    quota = np.floor(exact).astype(int)
    order = np.argsort(-(exact - quota), kind="stable")
    for j in order[: n - int(quota.sum())]:
        quota[j] += 1
    rng = np.random.default_rng([seed, 0xA070])
    picked = [rng.choice(np.flatnonzero(src == j), size=int(quota[j]), replace=False)
              for j in range(len(names)) if quota[j] > 0]
    return np.sort(np.concatenate(picked))


def split_folds(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """``folds`` disjoint, seeded, near-equal folds of ``range(n)`` (each sorted)."""
    perm = np.random.default_rng([seed, 0xF01D]).permutation(n)
    return [np.sort(perm[i::folds]) for i in range(folds)]


@dataclass
class _TrialData:
    pool_files: list[Path]
    pool_by_id: dict[str, Record]
    pool_order: dict[str, int]
    target_files: list[Path]       # per fold: the other folds (the candidates' target)
    heldout: list[list[Record]]    # per fold: the held-out records
    n_pool: int
    n_trial_pool: int
    n_excluded: int
    fold_sizes: list[int]
    file_sources: list[str] = field(default_factory=list)  # the pool source of each file


def _prepare(pool_records: list[Record], target_records: list[Record], opts: AutoOptions,
             seed: int, data_dir: Path, log: Callable[[str], None]) -> _TrialData:
    from finesift.evaluate.overlap import content_hash

    target_hashes = {content_hash(r) for r in target_records}
    usable = [r for r in pool_records if content_hash(r) not in target_hashes]
    n_excluded = len(pool_records) - len(usable)
    if n_excluded:
        log(f"auto: {n_excluded} pool record(s) duplicate a target example; the trials leave "
            "them out (a held-out loss must not be measured on training data)")
    if not usable:
        raise OptionError("method 'auto': every pool record duplicates a target example; "
                          "nothing is left to select from in the trials")
    pick = stratified_sample([r.source for r in usable], opts.trial_pool, seed)
    trial = [usable[i] for i in pick]
    sources = list(dict.fromkeys(r.source for r in pool_records))
    pool_files, file_sources = [], []
    for j, src in enumerate(sources):
        rows = [_raw_with_id(r) for r in trial if r.source == src]
        if not rows:
            continue
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(src).name.rsplit(".", 1)[0])[:40] or "pool"
        path = data_dir / f"pool-{j}-{stem}.jsonl"
        _write_once(path, rows)
        pool_files.append(path)
        file_sources.append(src)

    folds = split_folds(len(target_records), opts.folds, seed)
    target_files, heldout = [], []
    for i, held in enumerate(folds):
        held_set = set(held.tolist())
        rest = [target_records[t] for t in range(len(target_records)) if t not in held_set]
        path = data_dir / f"fold{i + 1}-target.jsonl"
        _write_once(path, [_raw_with_id(r) for r in rest])
        target_files.append(path)
        heldout.append([target_records[t] for t in held])
    return _TrialData(
        pool_files=pool_files,
        pool_by_id={r.id: r for r in trial},
        pool_order={r.id: i for i, r in enumerate(trial)},
        target_files=target_files,
        heldout=heldout,
        n_pool=len(pool_records),
        n_trial_pool=len(trial),
        n_excluded=n_excluded,
        file_sources=file_sources,
        fold_sizes=[len(h) for h in folds],
    )


def _cost_seconds(costs: dict[str, Any], key: str = "seconds") -> float:
    return float(sum(c.get(key) or 0.0 for c in costs.values()))


def resumed_trial_cost(section: dict[str, Any]) -> tuple[float, float | None]:
    """Wall and CPU seconds of the trial selections and fine-tunes in an ``auto``
    manifest section that an earlier process ran (this process resumed them), as they
    were recorded then; CPU is None when a resumed part has no CPU figure (recorded
    before auto kept one). A run's full cost is its own plus these."""
    wall, cpu, cpu_known = 0.0, 0.0, True
    for row in section.get("trials") or []:
        for run in row.get("runs") or []:
            for part in ("select", "finetune"):
                if not run.get(f"{part}_resumed"):
                    continue
                wall += float(run.get(f"{part}_seconds") or 0.0)
                got = run.get(f"{part}_cpu_seconds")
                cpu_known = cpu_known and got is not None
                cpu += float(got or 0.0)
    return wall, (cpu if cpu_known else None)


# --------------------------------------------------------------------------- the run


def select_auto(
    pool: str | Path | Sequence[str | Path],
    target: str | Path | Sequence[str | Path],
    *,
    select_with: Callable[..., pipeline.Selection],
    **options: Any,
) -> pipeline.Selection:
    """``finesift.select(..., method="auto")``: trial every candidate on folds of the
    target, then select with the winner. Arguments as :func:`finesift.api.select`;
    ``method_options`` are :class:`AutoOptions` plus ``METHOD.KEY`` candidate options.
    ``select_with`` is the plain select (:func:`finesift.api.select`, which passes
    itself) that every trial and the final selection go through. ``options``: the
    keywords of ``select_with`` (its defaults where not given, read from its signature,
    so the two never drift apart). Those this function does not read itself
    (``prefilter``, ...) go as given to the final selection and, those not ``None``, to
    every trial's selection (and its cache key).

    Returns:
        The winner's :class:`~finesift.pipeline.Selection` (all target examples, the whole
        pool), whose manifest has an ``auto`` section: ``trials`` (per candidate: held-out
        loss per fold and mean, mean improvement over random in %, selection and
        fine-tune seconds, the subset sizes), ``winner``, ``base_heldout_loss_per_fold``
        (the untouched model) and ``settings``.
    """
    import inspect

    from finesift.data.dedup import check_threshold
    from finesift.data.readers import load_records
    from finesift.logs import as_log
    from finesift.select.strategies import (
        STRATEGIES,
        parse_budget,
        parse_source_weights,
        resolve_source_weights,
    )

    defaults = {name: p.default for name, p in inspect.signature(select_with).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    defaults.pop("method", None)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise OptionError(f"method 'auto': unknown option(s) {', '.join(unknown)}; select "
                          f"takes {', '.join(defaults)}")
    opts_in = {**defaults, **options}
    read = ("budget", "method_options", "task", "model", "strategy", "seed", "out", "fmt",
            "max_length", "template", "precision", "dtype", "batch_size", "device", "progress",
            "log", "workdir", "num_shards", "shard_index", "executor", "ray_address",
            "ray_options", "dedup", "dedup_threshold", "source_weights", "columns", "export")
    (budget, method_options, task, model, strategy, seed, out, fmt, max_length, template,
     precision, dtype, batch_size, device, progress, log, workdir, num_shards, shard_index,
     executor, ray_address, ray_options, dedup, dedup_threshold, source_weights, columns,
     export) = (opts_in[k] for k in read)
    more = {k: v for k, v in opts_in.items() if k not in read}
    log = as_log(log)
    t_start = time.perf_counter()
    plan = parse_options(method_options)
    opts = plan.options
    if shard_index is not None or num_shards != 1:
        raise OptionError("--method auto cannot run as a shard (it selects with the winner "
                          "after its trials); run the winner with --num-shards instead")
    if not (isinstance(executor, str) and executor == "local") or ray_address or ray_options:
        raise OptionError("--method auto runs its trials and final selection in this process; "
                          "run the winning method again with --executor ray")
    if budget is None:
        raise OptionError("a budget is needed (--budget)")
    if strategy not in STRATEGIES:
        raise OptionError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if parse_source_weights(source_weights) and strategy != "balanced":
        raise OptionError(f"--source-weights needs --strategy balanced (not {strategy})")
    check_threshold(dedup_threshold)
    from finesift.engine.tasks import task_class

    task_class(task)  # an OptionError naming the known tasks
    if precision not in ("auto", "bf16", "fp32"):
        raise OptionError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 1):
        raise OptionError(f"max_length must be a positive integer or None, got {max_length!r}")
    from finesift.engine.budget import parse_batch_size

    parse_batch_size(batch_size)
    pipeline.check_device(device)
    from finesift.engine.precision import resolve_dtype

    # the trials' fine-tunes load the model in this dtype (each candidate's selection
    # resolves --dtype for itself)
    ft_dtype = resolve_dtype(dtype, device, trains=True,
                             who="--method auto (its trials fine-tune the model)")
    # files or in-memory data (finesift.data.memory), read through the column mapping
    pool_paths = pipeline.input_sources(pool, "pool")
    target_paths = pipeline.input_sources(target, "target")
    from finesift.data.columns import parse_columns
    from finesift.store.export import check_exportable, parse_export

    columns, exports = parse_columns(columns), parse_export(export)
    if exports and out is None:
        raise OptionError(f"--export {','.join(exports)} writes files: give an output folder "
                          "(--out)")
    pool_records = load_records(pool_paths, fmt, role="pool", columns=columns)
    target_records = load_records(target_paths, fmt, role="target", columns=columns)
    pipeline.check_shapes(pool_records, task)
    pipeline.check_shapes(target_records, task)
    check_exportable(pool_records, exports)
    k_full = parse_budget(budget, len(pool_records))
    if len(target_records) < opts.folds:
        raise OptionError(f"method 'auto': {opts.folds} folds need at least {opts.folds} "
                          f"target examples, the target has {len(target_records)}")

    tmp: tempfile.TemporaryDirectory | None = None
    if workdir is not None:
        work = Path(workdir)
    elif out is not None:
        work = Path(out) / ".work"
    else:  # nowhere to keep state: a temporary folder for the trial files
        tmp = tempfile.TemporaryDirectory(prefix="finesift-auto-")
        work = Path(tmp.name)
    try:
        section = _run_trials(
            plan, pool_paths, target_paths, pool_records, target_records, k_full,
            select_with=select_with, work=work / "auto", task=task, model=model,
            screening={"dedup": dedup, "dedup_threshold": dedup_threshold, "columns": columns,
                       "weights": resolve_source_weights(parse_source_weights(source_weights),
                                                         [r.source for r in pool_records]),
                       "more": {k: v for k, v in more.items() if v is not None}},
            strategy=strategy, seed=seed, fmt=fmt, max_length=max_length, template=template,
            precision=precision, batch_size=batch_size, device=device, progress=progress,
            log=log, dtype=dtype, ft_dtype=ft_dtype)
    finally:
        if tmp is not None:
            tmp.cleanup()
    trial_seconds = time.perf_counter() - t_start
    section["trial_seconds"] = round(trial_seconds, 3)
    # trials an earlier process ran: their recorded cost, which this run's clock misses
    wall, cpu = resumed_trial_cost(section)
    section["resumed_trial_seconds"] = round(wall, 3)
    section["resumed_trial_cpu_seconds"] = None if cpu is None else round(cpu, 3)
    winner = section["winner"]
    log(f"auto: the winner is {winner}; selecting with it from the whole pool and every "
        "target example ...")
    sel = select_with(
        pool_paths, target_paths, budget=budget, method=winner,
        method_options=plan.candidate_options[winner], task=task, model=model,
        strategy=strategy, seed=seed, out=out, fmt=fmt, max_length=max_length,
        template=template, precision=precision, dtype=dtype, batch_size=batch_size,
        device=device, progress=progress, log=log, workdir=workdir, dedup=dedup,
        dedup_threshold=dedup_threshold, source_weights=source_weights, columns=columns,
        export=exports, **more)
    section["final_seconds"] = sel.manifest.get("wall_seconds")
    sel.manifest["auto"] = section
    # the candidate the trials chose, where the harness reads what a method reports
    sel.manifest["method_info"] = {**(sel.manifest.get("method_info") or {}),
                                   "auto_winner": winner}
    sel.manifest["wall_seconds"] = round(time.perf_counter() - t_start, 3)
    if sel.out is not None:
        write_json(sel.out / "manifest.json", sel.manifest)
    return sel


def _run_trials(plan: AutoPlan, pool_paths: list[str], target_paths: list[str],
                pool_records: list[Record], target_records: list[Record], k_full: int, *,
                select_with: Callable[..., pipeline.Selection], work: Path, task: str,
                model: str | None, strategy: str, seed: int,
                fmt: str | None, max_length: int | None, template: str, precision: str,
                batch_size: int | str, device: str, progress: bool,
                log: Callable[[str], None], screening: dict[str, Any] | None = None,
                dtype: str = "fp32", ft_dtype: str = "fp32") -> dict[str, Any]:
    from finesift.engine.precision import resolve_dtype
    from finesift.methods.base import get_method

    opts = plan.options
    # each candidate's dtype as its selection resolves it (fp32: not in the trial key, so
    # trials run before dtypes existed are still found)
    cand_dtype = {}
    for cand in plan.candidates:
        meth = get_method(cand, plan.candidate_options[cand])
        cand_dtype[cand] = resolve_dtype(dtype, device, required=meth.required_dtype(),
                                         trains=meth.trains, who=f"auto candidate {cand!r}")
    lr = opts.lr if opts.lr is not None else DEFAULT_LR[task]
    ft_max_length = opts.max_length if max_length is None else min(opts.max_length, max_length)
    seeds = [seed + j for j in range(opts.seeds)]
    # in-memory inputs by the sha256 of their rows; a column mapping changes the records
    files = {"pool": [pipeline.source_fingerprint(p)["sha256"] for p in pool_paths],
             "target": [pipeline.source_fingerprint(p)["sha256"] for p in target_paths]}
    columns = (screening or {}).get("columns") or {}
    data_key = _hash([_DATA_VERSION, files, fmt, opts.trial_pool, opts.folds, seed,
                      *([columns] if columns else [])])
    data_dir = work / f"data-{data_key}"
    data = _prepare(pool_records, target_records, opts, seed, data_dir, log)
    screen: dict[str, Any] = {}  # --dedup and --source-weights for the trials' selections
    if (screening or {}).get("dedup"):
        screen.update(dedup=True, dedup_threshold=screening["dedup_threshold"])
    if (screening or {}).get("weights"):  # by the trial files, which stand for the sources
        screen["source_weights"] = {str(f): screening["weights"][src] for f, src in
                                    zip(data.pool_files, data.file_sources, strict=True)}
    if columns:  # the trial files hold the rows as read: the trials map them the same way
        screen["columns"] = columns
    screen.update((screening or {}).get("more") or {})  # --prefilter, ...: every trial too
    trial_k = min(data.n_trial_pool, max(1, round(k_full * data.n_trial_pool / data.n_pool)))
    labels = label_names(task, model, [target_records, pool_records])
    model_id = {s: model_identity({"name": pipeline.model_name(model), "task": task,
                                   "labels": labels, "seed": s}) for s in seeds}
    log(f"auto: {len(plan.candidates)} candidates ({', '.join(plan.candidates)}) x "
        f"{opts.folds} folds x {len(seeds)} seed(s); each selects {trial_k} of "
        f"{data.n_trial_pool} pool examples, then {opts.steps} fine-tuning steps at lr {lr:g}")

    ran_here: set[Path] = set()  # fine-tunes this process ran (shared by equal subsets)

    def finetune(records: list[Record] | None, fold: int, s: int) -> dict[str, Any]:
        ft = FinetuneOptions(steps=opts.steps, lr=lr, lora_rank=opts.lora_rank,
                             batch_size=opts.batch_size, seed=s, max_length=ft_max_length,
                             precision=precision, dtype=ft_dtype)
        ids = None if records is None else [r.id for r in records]
        key = _hash([_FINETUNE_VERSION, data_key, fold, finetune_key_fields(ft), model_id[s],
                     task, labels, ids], 16)
        path = work / "finetunes" / f"{key}.json"
        if path.exists():  # an earlier process's (resumed) or a same-subset candidate's
            return {**json.loads(path.read_text(encoding="utf-8")),
                    "resumed": path not in ran_here}
        res = finetune_and_evaluate(records, data.heldout[fold], task=task, model=model,
                                    options=ft, labels=labels, measure_base=records is None,
                                    progress=progress, device=device)
        fig = {"heldout_loss": res.test_loss, "n_train": res.n_train, "n_heldout": res.n_test,
               "train_loss": None if records is None else res.train_loss,
               "seconds": round(_cost_seconds(res.costs), 3),
               "cpu_seconds": round(_cost_seconds(res.costs, "cpu_seconds"), 3)}
        write_json(path, fig)
        ran_here.add(path)
        return fig

    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in plan.candidates}
    base: dict[tuple[int, int], float] = {}
    n_trials = len(plan.candidates) * opts.folds * len(seeds)
    done = 0
    for fold in range(opts.folds):
        for s in seeds:
            base[(fold, s)] = finetune(None, fold, s)["heldout_loss"]
            for cand in plan.candidates:
                done += 1
                where = f"{cand}, fold {fold + 1}/{opts.folds}, seed {s}"
                cand_opts = plan.candidate_options[cand]
                trial_key = _hash([_TRIAL_VERSION, data_key, cand, cand_opts, strategy, trial_k,
                                   *([screen] if screen else []),
                                   *([f"dtype={cand_dtype[cand]}"]
                                     if cand_dtype[cand] != "fp32" else []),
                                   task, model_id[s], max_length, template, precision, s])
                sel_dir = work / "trials" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', cand)}-f{fold + 1}-s{s}-{trial_key}"
                marker = sel_dir / "trial.json"
                if marker.exists():
                    trial = {**json.loads(marker.read_text(encoding="utf-8")), "resumed": True}
                    log(f"auto: trial {done}/{n_trials} ({where}): selection done before")
                else:
                    log(f"auto: trial {done}/{n_trials} ({where}): selecting ...")
                    t0, c0 = time.perf_counter(), time.process_time()
                    try:
                        sel = select_with(
                            [str(p) for p in data.pool_files], str(data.target_files[fold]),
                            budget=trial_k, method=cand, method_options=cand_opts, task=task,
                            model=model, strategy=strategy, seed=s, out=sel_dir, fmt=None,
                            max_length=max_length, template=template, precision=precision,
                            dtype=dtype, batch_size=batch_size, device=device,
                            progress=progress, log=lambda m, w=where: log(f"auto [{w}]: {m}"),
                            workdir=work / "work", **screen)
                    except FinesiftError as exc:
                        raise FinesiftError(f"auto trial {where}: {exc}") from exc
                    trial = {"ids": sel.selected_ids,
                             "seconds": round(time.perf_counter() - t0, 3),
                             "cpu_seconds": round(time.process_time() - c0, 3)}
                    write_json(marker, trial)
                # the fine-tune sees the subset in pool order: its result depends on which
                # examples were chosen, not on their ranking (identical subsets share a run)
                chosen = sorted(trial["ids"], key=data.pool_order.__getitem__)
                train = [data.pool_by_id[i] for i in chosen]
                if train:
                    fig = finetune(train, fold, s)
                else:  # a method that chose nothing (HARP): the untouched model
                    fig = {"heldout_loss": base[(fold, s)], "n_train": 0, "seconds": 0.0}
                log(f"auto: trial {done}/{n_trials} ({where}): held-out loss "
                    f"{fig['heldout_loss']:.4f} after training on {len(train)} examples")
                runs[cand].append({"fold": fold + 1, "seed": s,
                                   "heldout_loss": fig["heldout_loss"],
                                   "n_selected": len(train),
                                   "select_seconds": trial["seconds"],
                                   "finetune_seconds": fig["seconds"],
                                   "select_cpu_seconds": trial.get("cpu_seconds"),
                                   "finetune_cpu_seconds": fig.get("cpu_seconds"),
                                   # done by an earlier process: not in this one's cost
                                   "select_resumed": bool(trial.get("resumed")),
                                   "finetune_resumed": bool(fig.get("resumed")),
                                   "selection_dir": str(sel_dir)})

    rand = {(r["fold"], r["seed"]): r["heldout_loss"] for r in runs[FLOOR]}
    table = []
    for cand in plan.candidates:
        rows = runs[cand]
        per_fold = [float(np.mean([r["heldout_loss"] for r in rows if r["fold"] == f + 1]))
                    for f in range(opts.folds)]
        gains = [100.0 * (rand[(r["fold"], r["seed"])] - r["heldout_loss"])
                 / rand[(r["fold"], r["seed"])] for r in rows]
        table.append({
            "method": cand,
            "options": plan.candidate_options[cand],
            "heldout_loss_per_fold": per_fold,
            "mean_heldout_loss": float(np.mean(per_fold)),
            "improvement_over_random_pct": float(np.mean(gains)),
            "select_seconds": round(sum(r["select_seconds"] for r in rows), 3),
            "finetune_seconds": round(sum(r["finetune_seconds"] for r in rows), 3),
            "n_selected_per_fold": [int(np.mean([r["n_selected"] for r in rows
                                                 if r["fold"] == f + 1]))
                                    for f in range(opts.folds)],
            "runs": rows,
        })
    best = pick_winner(table)
    section = {
        "winner": best["method"],
        "winner_options": best["options"],
        "trials": table,
        "base_heldout_loss_per_fold": [
            float(np.mean([base[(f, s)] for s in seeds])) for f in range(opts.folds)],
        "settings": {
            "candidates": plan.candidates,
            "folds": opts.folds,
            "fold_sizes": data.fold_sizes,
            "seeds": seeds,
            "trial_pool": opts.trial_pool,
            "trial_pool_used": data.n_trial_pool,
            "pool_records": data.n_pool,
            "excluded_target_duplicates": data.n_excluded,
            "budget": k_full,
            "trial_budget": trial_k,
            "strategy": strategy,
            "finetune": {"steps": opts.steps, "lr": lr, "batch_size": opts.batch_size,
                         "lora_rank": opts.lora_rank, "max_length": ft_max_length,
                         "precision": precision, "dtype": ft_dtype},
            "tie_break": "lowest mean held-out loss; ties: the cheaper method "
                         "(random < dsir < embed < perplexity, uncertainty < tov < less, "
                         "tracin < harp), then the earlier candidate",
        },
        "workdir": str(work),
    }
    write_json(work / f"trials-{data_key}.json", section)
    return section


def pick_winner(table: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The trial row with the lowest ``mean_heldout_loss``; on a tie the cheaper method
    (:data:`COST_RANK`), then the earlier row."""
    return min(enumerate(table), key=lambda item: (
        item[1]["mean_heldout_loss"], COST_RANK.get(item[1]["method"], _UNKNOWN_COST),
        item[0]))[1]


def format_trials(section: dict[str, Any]) -> str:
    """The trial table and the winner as text (the CLI prints it)."""
    st = section["settings"]
    ft = st["finetune"]
    folds = st["folds"]
    head = (f"auto: {folds}-fold trials on {st['trial_pool_used']} of {st['pool_records']} pool "
            f"examples (trial budget {st['trial_budget']}), {ft['steps']} fine-tuning steps at "
            f"lr {ft['lr']:g}, {len(st['seeds'])} seed(s)")
    cols = ["method"] + [f"fold {f + 1}" for f in range(folds)] + [
        "mean loss", "vs random", "select s", "finetune s"]
    body = []
    for row in section["trials"]:
        body.append([row["method"] + (" *" if row["method"] == section["winner"] else "")]
                    + [f"{x:.4f}" for x in row["heldout_loss_per_fold"]]
                    + [f"{row['mean_heldout_loss']:.4f}",
                       f"{row['improvement_over_random_pct']:+.2f}%",
                       f"{row['select_seconds']:.1f}", f"{row['finetune_seconds']:.1f}"])
    base = section.get("base_heldout_loss_per_fold")
    if base:
        body.append(["(untouched)"] + [f"{x:.4f}" for x in base]
                    + [f"{float(np.mean(base)):.4f}", "", "", ""])
    widths = [max(len(r[j]) for r in [cols, *body]) for j in range(len(cols))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                         for j, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()

    win = next(r for r in section["trials"] if r["method"] == section["winner"])
    lines = [head, "  " + fmt(cols)] + ["  " + fmt(r) for r in body]
    lines.append(f"winner: {section['winner']} (mean held-out loss "
                 f"{win['mean_heldout_loss']:.4f}; {win['improvement_over_random_pct']:+.2f}% "
                 "loss improvement over random)")
    return "\n".join(lines)


__all__ = ["AutoOptions", "AutoPlan", "describe_options", "format_trials", "parse_options",
           "pick_winner", "select_auto", "split_folds", "stratified_sample"]

