"""``finesift.select``: the Python API behind ``finesift select``.

pool files + target files -> records -> encoded examples -> method scores ->
strategy -> selected records, ``scores.parquet``, ``selected.jsonl``, ``manifest.json``.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finesift.data.records import Example, Record
from finesift.errors import InputError, OptionError
from finesift.methods.base import MethodContext, get_method
from finesift.select.strategies import STRATEGIES, parse_budget, score_table, select_indices
from finesift.store import (
    Stopwatch,
    file_fingerprint,
    package_versions,
    peak_rss_mb,
    write_json,
    write_jsonl,
    write_parquet,
)


@dataclass
class Selection:
    """What :func:`select` returns.

    Attributes:
        selected: the chosen records, in selection order (best first).
        scores: one score per usable pool record (aligned with ``pool``).
        pool: the usable pool records (encoded; skipped ones excluded).
        columns: the score table written to ``scores.parquet``.
        manifest: everything needed to reproduce and audit the run.
        out: the output folder, if one was given.
    """

    selected: list[Record]
    scores: np.ndarray
    pool: list[Record]
    columns: dict[str, Any]
    manifest: dict[str, Any]
    out: Path | None = None

    @property
    def selected_ids(self) -> list[str]:
        return [r.id for r in self.selected]


@dataclass
class EncodedData:
    """Records and their encodings, aligned (skipped records dropped)."""

    records: list[Record]
    examples: list[Example]
    report: dict[str, Any] = field(default_factory=dict)


def _as_list(paths: str | Path | Sequence[str | Path]) -> list[str]:
    if isinstance(paths, (str, Path)):
        return [str(paths)]
    return [str(p) for p in paths]


def check_shapes(records: list[Record], task: str) -> None:
    """Raise an :class:`InputError` at the first record ``task`` cannot use."""
    if task == "ner":
        bad = next((r for r in records if r.shape != "ner"), None)
        message = "--task ner needs records with 'tokens' and 'tags', found a {shape} record"
    else:
        bad = next((r for r in records if r.shape == "ner"), None)
        message = "an NER record (tokens + tags) in a --task lm run; use --task ner"
    if bad is not None:
        raise InputError(
            bad.source,
            message.format(shape=bad.shape),
            line=bad.line,
            record=None if bad.line is not None else bad.row,
        )


def encode(
    records: list[Record],
    tokenizer: Any,
    task: str,
    *,
    max_length: int | None,
    label2id: dict[str, int] | None = None,
    template: str = "auto",
) -> EncodedData:
    """Encode records for ``task`` and drop the ones that were skipped."""
    from finesift.data.encode import encode_lm, encode_ner

    check_shapes(records, task)
    if task == "ner":
        examples, report = encode_ner(records, tokenizer, label2id or {}, max_length)
    else:
        examples, report = encode_lm(records, tokenizer, max_length, template=template)
    kept = [records[e.index] for e in examples]
    for j, e in enumerate(examples):
        e.index = j
    return EncodedData(kept, examples, report.to_dict())


def select(
    pool: str | Path | Sequence[str | Path],
    target: str | Path | Sequence[str | Path],
    *,
    budget: str | int | None,
    method: str = "tov",
    method_options: dict[str, Any] | None = None,
    task: str = "lm",
    model: str | None = None,
    strategy: str = "top",
    seed: int = 0,
    out: str | Path | None = None,
    fmt: str | None = None,
    max_length: int | None = 512,
    template: str = "auto",
    precision: str = "auto",
    batch_size: int | str = 8,
    device: str = "cpu",
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    workdir: str | Path | None = None,
    num_shards: int = 1,
    shard_index: int | None = None,
    executor: Any = "local",
    ray_address: str | None = None,
    ray_options: dict[str, Any] | None = None,
) -> Selection:
    """Score every pool example with ``method`` and pick ``budget`` of them.

    Args:
        pool: pool file(s): JSONL, JSON, CSV, Parquet, a datasets folder or CoNLL.
        target: file(s) with examples of the task you care about.
        budget: how many to select: a count (``500``) or a share of the pool (``"10%"``).
        method: a registered method name (``finesift methods`` lists them), or ``auto``:
            try candidate methods on folds of the target and select with the one whose
            short fine-tune gives the lowest held-out loss (:mod:`finesift.evaluate.auto`;
            the manifest then has an ``auto`` section).
        method_options: the method's options, e.g. ``{"mode": "basic"}`` for ``tov``; for
            ``auto`` its own (``candidates``, ``folds``, ...) and ``METHOD.KEY`` options of
            a candidate (``{"tov.mode": "basic"}``).
        task: ``lm`` (causal LM, chat/prompt-completion/text records) or ``ner``.
        model: a built-in model name or a local transformers folder (default per task:
            ``smollm2-135m`` / ``minilm-l6``).
        strategy: ``top``, ``length-binned`` or ``score+random``.
        seed: seeds everything random; the same inputs and seed give the same selection.
        out: folder for ``scores.parquet``, ``selected.jsonl``, ``manifest.json``.
        fmt: force the input format instead of guessing from the extension.
        max_length: truncate encoded examples to this many tokens (``None``: no limit).
        template: ``auto`` (the tokenizer's chat template if it has one), ``chat``, ``plain``.
        precision: ``auto`` (bf16 where the CPU is fast at it), ``bf16`` or ``fp32``.
        batch_size: rows per scoring batch (default 8); ``"auto"`` sizes each batch to
            1 GiB of activations (more rows for short examples), ``"auto:4GiB"`` to
            another limit (:class:`finesift.engine.budget.TokenBudget`).
        device: torch device.
        progress: show progress bars on stderr.
        log: receives human-readable progress and warning messages.
        workdir: folder for resumable intermediate state (default ``OUT/.work``; methods
            keep their state in fingerprinted subfolders or files, so runs may share one).
        num_shards, shard_index: score only shard ``shard_index`` of ``num_shards``
            (see :mod:`finesift.store.chunks` for which examples a shard gets). A shard
            run selects nothing: it writes the shard's ``scores.parquet`` and a shard
            ``manifest.json`` to ``out`` (needed) for :func:`finesift.shards.merge`;
            ``budget`` may be ``None``. Default: one unsharded run.
        executor: ``local`` (default: score in this process) or ``ray`` (the method's
            chunks are scored by Ray workers; ``tov`` only), or an executor object of
            :mod:`finesift.executors` (e.g. a configured ``RayExecutor``).
        ray_address: the Ray cluster to join (default: start a local instance).
        ray_options: ``num_cpus`` (local instance), ``workers``, ``cpus_per_worker``,
            ``gpus_per_worker``; see :class:`finesift.executors.RayExecutor`.
    """
    if method == "auto":  # trials of candidate methods, then this function with the winner
        from finesift.evaluate.auto import select_auto

        return select_auto(
            pool, target, budget=budget, method_options=method_options, task=task,
            model=model, strategy=strategy, seed=seed, out=out, fmt=fmt,
            max_length=max_length, template=template, precision=precision,
            batch_size=batch_size, device=device, progress=progress, log=log,
            workdir=workdir, num_shards=num_shards, shard_index=shard_index,
            executor=executor, ray_address=ray_address, ray_options=ray_options)
    from finesift.data.encode import build_label_map
    from finesift.data.readers import ReadReport, load_records
    from finesift.engine.tasks import task_for
    from finesift.models.loader import load_model, load_tokenizer, pretrained_labels

    log = log or (lambda msg: None)
    t_start = time.perf_counter()
    watch = Stopwatch()
    pool_paths, target_paths = _as_list(pool), _as_list(target)
    if strategy not in STRATEGIES:
        raise OptionError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if task not in ("lm", "ner"):
        raise OptionError(f"--task must be 'lm' or 'ner', got {task!r}")
    if precision not in ("auto", "bf16", "fp32"):
        raise OptionError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    from finesift.engine.budget import parse_batch_size

    parse_batch_size(batch_size)  # OptionError unless a positive int, 'auto' or 'auto:SIZE'
    if isinstance(batch_size, str) and batch_size.strip().isdigit():
        batch_size = int(batch_size)
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise OptionError(f"max_length must be a positive integer or None, got {max_length!r}")
    check_seed(seed)
    if model is not None and not str(model).strip():
        raise OptionError("--model is empty; give a built-in model name or a model folder")
    meth = get_method(method, method_options)  # fails fast on a bad name or option
    _check_device(device)
    shard = _shard_spec(num_shards, shard_index)
    if shard is not None:
        meth.check_shardable()
        if out is None:
            raise OptionError("a shard run (--shard-index) needs an output folder (--out)")
    elif budget is None:
        raise OptionError("a budget is needed (--budget), except in a shard run")
    out_dir = check_out_dir(out)
    run_executor = _make_executor(meth, executor, ray_address, ray_options, device)

    with watch.stage("read"):
        read_pool, read_target = ReadReport(), ReadReport()
        pool_records = load_records(pool_paths, fmt, role="pool", report=read_pool)
        target_records = load_records(target_paths, fmt, role="target", report=read_target)
    for role, rep in (("pool", read_pool), ("target", read_target)):
        if rep.skipped:
            log(f"warning: skipped {sum(rep.skipped.values())} {role} record(s) while reading: "
                f"{rep.skipped}")
    if budget is not None:
        parse_budget(budget, len(pool_records))  # early check against the raw pool size
    check_shapes(pool_records, task)  # before loading a model (an NER head needs tags)
    check_shapes(target_records, task)

    with watch.stage("load_model"):
        label2id = None
        labels = None
        if task == "ner":
            label2id = pretrained_labels(model, task)
            if label2id is None:
                label2id = build_label_map([target_records, pool_records])
            labels = [lab for lab, _ in sorted(label2id.items(), key=lambda kv: kv[1])]
        if meth.needs_model:
            bundle = load_model(model, task, labels=labels, seed=seed)
            tokenizer, model_obj, model_info = bundle.tokenizer, bundle.model, bundle.info
            new_head = bundle.new_head
        else:
            tokenizer, model_obj = load_tokenizer(model, task), None
            model_info = {"name": model, "loaded": False}
            new_head = False

    with watch.stage("encode"):
        enc_pool = encode(pool_records, tokenizer, task, max_length=max_length,
                          label2id=label2id, template=template)
        enc_target = encode(target_records, tokenizer, task, max_length=max_length,
                            label2id=label2id, template=template)
    for role, enc, paths in (("pool", enc_pool, pool_paths), ("target", enc_target, target_paths)):
        skipped = sum(enc.report.get("skipped", {}).values())
        if skipped:
            log(f"warning: skipped {skipped} {role} record(s): {enc.report.get('skipped')}")
        if not enc.examples:
            raise InputError(
                ", ".join(paths),
                f"no usable {role} records: all {enc.report.get('n_records')} were skipped "
                f"({enc.report.get('skipped')})",
            )
    k = parse_budget(budget, len(enc_pool.examples)) if budget is not None else None

    ctx = MethodContext(
        pool=enc_pool.examples,
        target=enc_target.examples,
        pool_records=enc_pool.records,
        target_records=enc_target.records,
        task=task_for(task, tokenizer),
        model=model_obj,
        model_task=task,
        seed=seed,
        precision=precision,
        device=device,
        batch_size=batch_size,
        progress=progress,
        workdir=(Path(workdir) if workdir is not None
                 else (out_dir / ".work") if out_dir is not None else None),
        log=log,
        shard=shard,
        executor=run_executor,
        model_spec={"name": _model_name(model), "task": task, "labels": labels, "seed": seed},
        new_head=new_head,
    )
    if meth.uses_budget and k is not None:
        meth.bind_budget(k)
    try:
        with watch.stage("score"):
            result = meth.score(ctx)
    finally:
        if run_executor is not None:
            run_executor.close()
    scores = np.asarray(result.scores, dtype=np.float64)
    n_scored = len(enc_pool.examples) if result.rows is None else len(result.rows)
    if scores.shape != (n_scored,) or not np.all(np.isfinite(scores)):
        raise RuntimeError(f"method {method} returned invalid scores (shape {scores.shape})")
    if shard is not None:
        from finesift.shards import write_shard

        return write_shard(
            out_dir, shard, enc_pool, enc_target, result,
            run={"method": method, "method_options": _jsonable(meth.options), "task": task,
                 "model": model_info, "seed": seed, "max_length": max_length,
                 "template": template, "precision": precision, "batch_size": batch_size,
                 "device": device, "format": fmt},
            data={"pool": [file_fingerprint(p) for p in pool_paths],
                  "target": [file_fingerprint(p) for p in target_paths],
                  "pool_records": len(pool_records), "target_records": len(target_records),
                  "pool_reading": read_pool.to_dict(), "target_reading": read_target.to_dict(),
                  "pool_encoding": enc_pool.report, "target_encoding": enc_target.report,
                  "labels": labels},
            watch=watch, t_start=t_start,
        )

    n_label = np.array([e.n_label_tokens for e in enc_pool.examples])
    with watch.stage("select"):
        if result.chosen is not None:  # the method chose its own set (at most k)
            chosen = np.asarray(result.chosen, dtype=np.int64)[:k]
            if strategy != "top":
                log(f"warning: {method} chooses its own subset; strategy {strategy!r} not applied")
            log(f"{method} chose {len(chosen)} example(s) for a budget of {k}")
        else:
            chosen = select_indices(
                scores, k, strategy=strategy, lengths=n_label, base_set=result.base_set,
                seed=seed, groups=np.array([r.source for r in enc_pool.records], dtype=str)
            )
    selected = [enc_pool.records[i] for i in chosen]
    columns: dict[str, Any] = score_table(
        [r.id for r in enc_pool.records], [r.source for r in enc_pool.records],
        [r.row for r in enc_pool.records], scores, n_label,
        [len(e) for e in enc_pool.examples], [e.truncated for e in enc_pool.examples], chosen)
    if result.base_set is not None:
        in_base = np.zeros(len(scores), dtype=bool)
        in_base[result.base_set] = True
        columns["in_base_set"] = in_base
    for name, col in result.columns.items():
        columns[name] = np.asarray(col)

    by_source = Counter(r.source for r in selected)
    manifest: dict[str, Any] = {
        "finesift_version": package_versions().get("finesift"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "method": method,
        "method_options": _jsonable(meth.options),
        "task": task,
        "model": model_info,
        "strategy": strategy,
        "budget": {"requested": str(budget), "count": int(k)},
        "seed": seed,
        "max_length": max_length,
        "template": template,
        "precision": precision,
        "batch_size": batch_size,
        "device": device,
        "format": fmt,
        "data": {
            "pool": [file_fingerprint(p) for p in pool_paths],
            "target": [file_fingerprint(p) for p in target_paths],
            "pool_records": len(pool_records),
            "target_records": len(target_records),
            "pool_reading": read_pool.to_dict(),
            "target_reading": read_target.to_dict(),
            "pool_encoding": enc_pool.report,
            "target_encoding": enc_target.report,
            "labels": labels,
        },
        "selected": {"count": len(selected), "by_source": dict(by_source)},
        "method_info": result.info,
        "stages": watch.to_dict(),
        "wall_seconds": round(time.perf_counter() - t_start, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "versions": package_versions(),
    }
    if out_dir is not None:
        write_outputs(out_dir, [
            ("scores.parquet", lambda path: write_parquet(path, columns)),
            ("selected.jsonl", lambda path: write_jsonl(path, (r.raw for r in selected))),
            ("manifest.json", lambda path: write_json(path, manifest)),
        ])
    return Selection(
        selected=selected,
        scores=scores,
        pool=enc_pool.records,
        columns=columns,
        manifest=manifest,
        out=out_dir,
    )


OUTPUT_FILES = ("scores.parquet", "selected.jsonl", "manifest.json")
"""The files a run writes in its output folder (a shard run: the first and the last)."""


def check_seed(seed: Any) -> None:
    """Raise an :class:`OptionError` unless ``seed`` is an integer in [0, 2**32 - 1] (the
    range every seeded library finesift uses accepts)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or \
            not 0 <= int(seed) <= 2**32 - 1:
        raise OptionError(f"--seed {seed!r}: expected an integer from 0 to {2**32 - 1}")


def check_out_dir(out: str | Path | None) -> Path | None:
    """The output folder, checked before any work: not empty, not a file, creatable and
    writable, and no folder where a run writes one of its files. Nothing is created.

    Raises:
        OptionError: naming the folder and what is wrong.
    """
    if out is None:
        return None
    if not str(out).strip():
        raise OptionError("--out is empty; give the output folder (. for this one)")
    out_dir = Path(out)
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise OptionError(f"--out {out_dir}: exists and is not a folder")
        if out_dir.is_dir():
            for name in OUTPUT_FILES:
                if (out_dir / name).is_dir():
                    raise OptionError(f"--out {out_dir}: {out_dir / name} is a folder; "
                                      f"a run writes its {name} file there")
            work = out_dir / ".work"
            if work.exists() and not work.is_dir():
                raise OptionError(f"--out {out_dir}: {work} is a file; a run keeps its "
                                  "resumable state in that folder")
        parent = out_dir.absolute()
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise OptionError(f"--out {out_dir}: cannot create the folder: {parent} is a file, "
                              "not a folder")
    except OSError as e:
        raise OptionError(f"--out {out_dir}: {e.strerror or e}") from None
    try:  # the one sure test of writability (permissions, read-only mounts, /proc, /sys)
        os.rmdir(tempfile.mkdtemp(prefix=".finesift-probe-", dir=parent))
    except OSError as e:
        where = "in it" if parent == out_dir.absolute() else f"in {parent}"
        raise OptionError(f"--out {out_dir}: cannot write {where}: {e.strerror or e}") from None
    return out_dir


def write_outputs(out_dir: Path, writers: list[tuple[str, Callable[[Path], None]]]) -> None:
    """Write a run's output files in order (the manifest last), each atomically. A stale
    manifest from an earlier run is removed first, and if a write fails the files this run
    wrote are removed, so a folder never holds a set of outputs that looks whole but is not.

    Raises:
        OptionError: a file could not be written (naming it and why).
    """
    written: list[Path] = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "manifest.json").unlink(missing_ok=True)
        for name, write in writers:
            write(out_dir / name)
            written.append(out_dir / name)
    except OSError as e:
        for path in written:
            path.unlink(missing_ok=True)
        what = e.filename or out_dir
        raise OptionError(f"--out {out_dir}: cannot write {what}: {e.strerror or e}") from None


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise OptionError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:1, ...)"
                          ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {device}: this torch build or machine has no CUDA GPU")


def _shard_spec(num_shards: int, shard_index: int | None):
    from finesift.store.chunks import ShardSpec

    if shard_index is None:
        if num_shards != 1:
            raise OptionError("--num-shards needs --shard-index (which shard this run scores)")
        return None
    return ShardSpec(num_shards, shard_index)


def _make_executor(meth: Any, executor: str, ray_address: str | None,
                   ray_options: dict[str, Any] | None, device: str):
    from finesift.executors import make_executor
    from finesift.methods import available

    if not isinstance(executor, str):  # an executor object
        made = executor
        if not meth.distributable:
            raise OptionError(f"method {meth.name!r} scores in-process only; it takes no executor")
        return made
    opts = dict(ray_options or {})
    known = {"num_cpus", "workers", "cpus_per_worker", "gpus_per_worker"}
    if set(opts) - known:
        raise OptionError(f"unknown Ray option(s) {sorted(set(opts) - known)}; known: {sorted(known)}")
    if executor == "local" and opts:
        raise OptionError("Ray options need --executor ray")
    made = make_executor(executor, ray_address=ray_address,
                         **{f"ray_{k}": v for k, v in opts.items()}, device=device)
    if made is not None and not meth.distributable:
        can = ", ".join(n for n, c in available().items() if c.distributable)
        raise OptionError(f"--executor {executor}: method {meth.name!r} scores in-process only "
                          f"(methods that can use it: {can})")
    return made


def _model_name(model: str | None) -> str | None:
    """``model`` as another process on a shared file system can load it (absolute path)."""
    if model is not None and Path(model).expanduser().exists():
        return str(Path(model).expanduser().resolve())
    return model


def _jsonable(options: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(options):
        return dataclasses.asdict(options)
    return dict(options) if isinstance(options, dict) else options
