"""``finesift.select``: the Python API behind ``finesift select``.

pool files + target files -> records -> encoded examples -> method scores ->
strategy -> selected records, ``scores.parquet``, ``selected.jsonl``, ``manifest.json``.

:func:`select` composes the stages of :mod:`finesift.pipeline` and writes with
:mod:`finesift.store.run`; ``method="auto"`` goes to :mod:`finesift.evaluate.auto`, and a
shard run writes with :func:`finesift.shards.write_shard`. Nothing below imports this
module: it re-exports the names other code imported from it before the stages moved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from finesift.pipeline import (
    EncodedData,
    Selection,
    check_options,
    check_seed,
    check_shapes,
    choose,
    data_section,
    encode,
    encode_inputs,
    load_inputs,
    load_model,
    score_pool,
    write_run_config,
)
from finesift.pipeline import as_list as _as_list  # noqa: F401  (re-exported)
from finesift.pipeline import check_device as _check_device  # noqa: F401  (re-exported)
from finesift.pipeline import jsonable as _jsonable  # noqa: F401  (re-exported)
from finesift.pipeline import make_executor as _make_executor  # noqa: F401  (re-exported)
from finesift.pipeline import model_name as _model_name  # noqa: F401  (re-exported)
from finesift.pipeline import shard_spec as _shard_spec  # noqa: F401  (re-exported)
from finesift.shards import write_shard
from finesift.store import write_jsonl
from finesift.store.run import OUTPUT_FILES, check_out_dir, write_outputs, write_run


def select(
    pool: str | Path | Sequence[str | Path],
    target: str | Path | Sequence[str | Path],
    *,
    budget: str | int | None = None,
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
            pool, target, select_with=select, budget=budget, method_options=method_options,
            task=task, model=model, strategy=strategy, seed=seed, out=out, fmt=fmt,
            max_length=max_length, template=template, precision=precision,
            batch_size=batch_size, device=device, progress=progress, log=log,
            workdir=workdir, num_shards=num_shards, shard_index=shard_index,
            executor=executor, ray_address=ray_address, ray_options=ray_options)
    plan = check_options(
        pool, target, budget=budget, method=method, method_options=method_options, task=task,
        model=model, strategy=strategy, seed=seed, out=out, fmt=fmt, max_length=max_length,
        template=template, precision=precision, batch_size=batch_size, device=device,
        progress=progress, log=log, workdir=workdir, num_shards=num_shards,
        shard_index=shard_index, executor=executor, ray_address=ray_address,
        ray_options=ray_options)
    inputs = load_inputs(plan)
    loaded = load_model(plan, inputs)
    enc = encode_inputs(plan, inputs, loaded)
    scored = score_pool(plan, enc, loaded)
    settings, data = plan.settings(loaded.info), data_section(plan, inputs, enc, loaded.labels)
    write_run_config(plan, loaded)  # OUT/config.yaml: `finesift select --config` runs it again
    if plan.shard is not None:  # a shard run selects nothing: it writes its scores for merge
        return write_shard(plan.out_dir, plan.shard, enc.pool, enc.target, scored.result,
                           run=settings, data=data, watch=plan.watch, t_start=plan.t_start)
    sel = choose(plan, enc, scored, settings, data)
    if sel.out is not None:  # this module's write_jsonl: a test swaps it for a full disk
        write_run(sel.out, sel.columns, sel.manifest, sel.selected, jsonl_writer=write_jsonl)
    return sel


__all__ = ["OUTPUT_FILES", "EncodedData", "Selection", "check_out_dir", "check_seed",
           "check_shapes", "encode", "select", "write_outputs"]
