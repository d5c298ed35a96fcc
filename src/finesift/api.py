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
    prefilter_pool,
    resolve_weights,
    score_pool,
    screen_pool,
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

# methods that choose among methods: their own options, trials and report
_CHOOSERS = {"auto": "finesift.evaluate.auto"}


def _chooser(method: str) -> Any:
    import importlib

    return importlib.import_module(_CHOOSERS[method]) if method in _CHOOSERS else None


def chooses_method(method: str) -> bool:
    """Whether ``method`` picks another method on the user's data (``auto``) rather than
    scoring the pool itself: its options are its own, a candidate's are ``METHOD.KEY``."""
    return method in _CHOOSERS


def check_method(method: str, options: dict[str, Any] | None = None) -> None:
    """OptionError unless ``method`` is a registered method (or ``auto``) that accepts
    ``options``; builds nothing costly."""
    chooser = _chooser(method)
    if chooser is not None:
        chooser.parse_options(options)
    else:
        from finesift.methods.base import get_method

        get_method(method, options)


def method_report(manifest: dict[str, Any]) -> str | None:
    """The text a run's method adds to the CLI's summary (``auto``: its trial table)."""
    for name in _CHOOSERS:
        if name in manifest:
            return _chooser(name).format_trials(manifest[name])
    return None


def select(
    pool: Any,
    target: Any,
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
    dtype: str = "fp32",
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
    dedup: bool = False,
    dedup_threshold: float = 0.8,
    source_weights: dict[str, float] | str | None = None,
    columns: dict[str, str] | str | None = None,
    export: str | Sequence[str] | None = None,
    prefilter: str | dict[str, Any] | None = None,
) -> Selection:
    """Score every pool example with ``method`` and pick ``budget`` of them.

    Args:
        pool: pool file(s): JSONL, JSON, CSV, Parquet, a datasets folder or CoNLL; or data
            in memory: a ``datasets.Dataset`` (one split), a pandas DataFrame, a pyarrow
            Table, a list of dicts; a list mixing these with paths; a dict ``{source name:
            data}`` (:mod:`finesift.data.memory`: in-memory sources are named ``pool-0``,
            ... or by the Dataset's own name, and their rows checked as a file's).
        target: the examples of the task you care about, in any form ``pool`` takes.
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
        precision: autocast of fp32 weights: ``auto`` (bf16 matmuls where the device is
            fast at them), ``bf16`` or ``fp32``. Saves time, not memory.
        dtype: the dtype the model's weights are loaded in: ``fp32`` (default), ``bf16``,
            ``fp16`` (half the memory; computing in that dtype, so ``precision`` no longer
            applies) or ``auto`` (bf16 where the device computes it natively and the
            method does not need fp32, e.g. ToV's fp32 scoring passes; else fp32). fp16
            is refused for methods that train or take gradients. A model passed as an
            object keeps its own dtype. Recorded as the manifest's ``dtype``.
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
            chunks are scored by Ray workers: ``tov``, ``less``, ``tracin``,
            ``embed``, ``perplexity``, ``uncertainty``, any method with a
            ``chunk_scorer``), or an executor object of :mod:`finesift.executors` (e.g.
            a configured ``RayExecutor``).
        ray_address: the Ray cluster to join (default: start a local instance).
        ray_options: ``num_cpus`` (local instance), ``workers``, ``cpus_per_worker``,
            ``gpus_per_worker``; see :class:`finesift.executors.RayExecutor`.
        dedup: keep only the first (in pool order) of each group of exact or near
            duplicates in the pool, before scoring (:mod:`finesift.data.dedup`). Whether or
            not, the manifest's ``dedup`` counts the groups, and target examples that also
            appear in the pool are a warning and the manifest's ``contamination``.
        dedup_threshold: the Jaccard similarity (of character 5-gram sets) from which two
            texts are near duplicates, from 0.5 to 1; exact duplicates always count.
        source_weights: ``strategy="balanced"`` only: pool source name -> weight (a source
            is named by its path, file name or file name without extension; unnamed ones
            weigh 1), or ``"sharegpt=1,gsm8k=3"``; shares proportional to the weights.
        columns: read the data's columns as finesift's record fields, ``{"prompt":
            "query", "completion": "answer"}`` (or ``"prompt=query,completion=answer"``),
            for every input (:mod:`finesift.data.columns`).
        export: also write the selection ready for training, next to ``selected.jsonl``
            (needs ``out``): ``"messages"`` (TRL conversational JSONL),
            ``"prompt-completion"``, ``"datasets"`` (a ``save_to_disk`` folder), or a list
            of them (:mod:`finesift.store.export`).
        prefilter: a cascade for a large pool and an expensive method: ``"METHOD:SHARE"``
            (``"embed:20%"``, ``"dsir:500"``, ``"dsir:10%,sampling=top"`` with the
            prefilter method's options) or ``{"method": "embed", "share": "20%",
            "options": {...}}``. The prefilter method ranks the whole usable pool, the top
            SHARE (a share of the pool or a count) is kept, ``method`` scores only those,
            and the rest rank below every kept example in the prefilter's order
            (:mod:`finesift.select.prefilter`); ``scores.parquet`` gets
            ``prefilter_score`` and ``prefilter_kept``, the manifest ``prefilter``. A
            prefilter that keeps fewer examples than the budget stops the run.
    """
    given = dict(locals())  # every keyword as given (first statement: nothing else yet)
    if chooses_method(method):  # trials of candidate methods, then this function with the winner
        from finesift.select.prefilter import parse_prefilter

        parse_prefilter(prefilter)  # a bad --prefilter stops the run before the trials
        return _chooser(method).select_auto(
            pool, target, select_with=select,
            **{k: v for k, v in given.items() if k not in ("pool", "target", "method")})
    plan = check_options(
        pool, target, budget=budget, method=method, method_options=method_options, task=task,
        model=model, strategy=strategy, seed=seed, out=out, fmt=fmt, max_length=max_length,
        template=template, precision=precision, batch_size=batch_size, device=device,
        progress=progress, log=log, workdir=workdir, num_shards=num_shards,
        shard_index=shard_index, executor=executor, ray_address=ray_address,
        ray_options=ray_options, dedup=dedup, dedup_threshold=dedup_threshold,
        source_weights=source_weights, dtype=dtype, columns=columns, export=export,
        prefilter=prefilter)
    inputs = load_inputs(plan)
    resolve_weights(plan, inputs)  # --source-weights names the pool's sources
    loaded = load_model(plan, inputs)
    enc = encode_inputs(plan, inputs, loaded)
    enc = screen_pool(plan, enc)  # contamination warning; --dedup drops duplicates
    cascade = prefilter_pool(plan, enc, loaded)  # --prefilter: the kept share (None without)
    scored = score_pool(plan, enc, loaded, cascade)
    settings, data = plan.settings(loaded.info), data_section(plan, inputs, enc, loaded.labels)
    write_run_config(plan, loaded)  # OUT/config.yaml: `finesift select --config` runs it again
    if plan.shard is not None:  # a shard run selects nothing: it writes its scores for merge
        return write_shard(plan.out_dir, plan.shard, enc.pool, enc.target, scored.result,
                           run=settings, data=data, watch=plan.watch, t_start=plan.t_start)
    sel = choose(plan, enc, scored, settings, data)
    if sel.out is not None:  # this module's write_jsonl: a test swaps it for a full disk
        write_run(sel.out, sel.columns, sel.manifest, sel.selected, jsonl_writer=write_jsonl,
                  exports=plan.export)
    return sel


__all__ = [
    "OUTPUT_FILES",
    "EncodedData",
    "Selection",
    "check_method",
    "check_out_dir",
    "check_seed",
    "check_shapes",
    "chooses_method",
    "encode",
    "method_report",
    "select",
    "write_outputs",
]
