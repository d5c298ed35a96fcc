"""The stages of a ``finesift select`` run, each with one job.

:func:`check_options` -> :func:`load_inputs` (read + shape check) -> :func:`load_model`
-> :func:`encode_inputs` -> :func:`screen_pool` -> :func:`prefilter_pool` (``--prefilter``)
-> :func:`score_pool` -> :func:`choose` (the strategy, and the
run's :class:`Selection` with its manifest) -> write (:func:`finesift.store.run.write_run`;
a shard run writes with :func:`finesift.shards.write_shard` instead of choosing).
:func:`finesift.api.select` composes them.

This module also holds what the modules around the pipeline share: the
:class:`Selection` a run returns, :class:`EncodedData`, the input and option checks.
It sits below :mod:`finesift.api`, :mod:`finesift.shards` and
:mod:`finesift.evaluate.auto` and imports none of them, so the import graph stays
one-way: api -> auto, shards -> pipeline -> store.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finesift.data.records import Example, Record
from finesift.errors import InputError, OptionError
from finesift.logs import as_log
from finesift.methods.base import Method, MethodContext, MethodResult, get_method, option_identity
from finesift.select.strategies import STRATEGIES, parse_budget, score_table, select_indices
from finesift.store.chunks import ShardSpec
from finesift.store.files import file_fingerprint
from finesift.store.manifest import Stopwatch
from finesift.store.run import check_out_dir, run_manifest, selection_entries

# -- what the modules around the pipeline share ----------------------------------------


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


def task_name(task: Any) -> str:
    """The name a task (a name, Task class or object) is recorded under."""
    from finesift.engine.tasks import task_class

    return task_class(task).name


def as_list(paths: str | Path | Sequence[str | Path]) -> list[str]:
    """One path or several, as a list of strings."""
    if isinstance(paths, (str, Path)):
        return [str(paths)]
    return [str(p) for p in paths]


def input_sources(value: Any, role: str) -> list[Any]:
    """The pool's or target's inputs: file paths (strings) and in-memory data
    (:class:`finesift.data.memory.MemorySource`: a ``datasets.Dataset``, a DataFrame, a
    pyarrow Table, a list of dicts; a dict ``{name: data}`` names them), in order.

    Raises:
        OptionError: an input of another kind, or a ``DatasetDict`` (naming its splits).
    """
    from finesift.data.memory import resolve_inputs

    return resolve_inputs(value, role)


def source_fingerprint(source: Any) -> dict[str, Any]:
    """The manifest's fingerprint of one input: a file's ``path``, ``sha256`` and
    ``bytes``; an in-memory input's ``name``, kind (``in_memory``), ``rows`` and the
    ``sha256`` and ``bytes`` of its rows as canonical JSON lines."""
    from finesift.data.memory import MemorySource, content_fingerprint

    if isinstance(source, MemorySource):
        return content_fingerprint(source)
    return file_fingerprint(source)


def check_shapes(records: list[Record], task: Any) -> None:
    """Raise an :class:`InputError` at the first record ``task`` (a name, Task class or
    object) cannot use, with the task's own words for why."""
    from finesift.engine.tasks import task_class

    kind = task_class(task)
    bad = next((r for r in records if not kind.accepts(r)), None)
    if bad is not None:
        raise bad.error(kind.wrong_record(bad))  # its file and line (or its input's row)


def encode(
    records: list[Record],
    tokenizer: Any,
    task: Any,
    *,
    max_length: int | None,
    label2id: dict[str, int] | None = None,
    template: str = "auto",
) -> EncodedData:
    """Encode records for ``task`` and drop the ones that were skipped."""
    from finesift.engine.tasks import task_class

    check_shapes(records, task)
    examples, report = task_class(task).encode(records, tokenizer, max_length=max_length,
                                               label2id=label2id, template=template)
    kept = [records[e.index] for e in examples]
    for j, e in enumerate(examples):
        e.index = j
    return EncodedData(kept, examples, report.to_dict())


def check_seed(seed: Any) -> None:
    """Raise an :class:`OptionError` unless ``seed`` is an integer in [0, 2**32 - 1] (the
    range every seeded library finesift uses accepts)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or \
            not 0 <= int(seed) <= 2**32 - 1:
        raise OptionError(f"--seed {seed!r}: expected an integer from 0 to {2**32 - 1}")


def check_device(device: str) -> None:
    """Raise an :class:`OptionError` unless ``device`` is a torch device this machine has."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise OptionError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:1, ...)"
                          ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {device}: this torch build or machine has no CUDA GPU")


def shard_spec(num_shards: int, shard_index: int | None) -> ShardSpec | None:
    """The shard a run scores (None: the whole pool)."""
    if shard_index is None:
        if num_shards != 1:
            raise OptionError("--num-shards needs --shard-index (which shard this run scores)")
        return None
    return ShardSpec(num_shards, shard_index)


def make_executor(meth: Method, executor: Any, ray_address: str | None,
                  ray_options: dict[str, Any] | None, device: str) -> Any:
    """The executor that scores ``meth``'s chunks (None: in this process)."""
    from finesift.executors import make_executor as make

    if not isinstance(executor, str):  # an executor object
        meth.check_distributable(getattr(executor, "name", type(executor).__name__))
        return executor
    opts = dict(ray_options or {})
    known = {"num_cpus", "workers", "cpus_per_worker", "gpus_per_worker"}
    if set(opts) - known:
        raise OptionError(f"unknown Ray option(s) {sorted(set(opts) - known)}; known: {sorted(known)}")
    if executor == "local" and opts:
        raise OptionError("Ray options need --executor ray")
    made = make(executor, ray_address=ray_address,
                **{f"ray_{k}": v for k, v in opts.items()}, device=device)
    if made is not None:
        meth.check_distributable(executor)  # the method says why it cannot
    return made


def model_name(model: Any) -> str | None:
    """``model`` as another process on a shared file system can load it (absolute path);
    a model passed as an object: its name and weights hash (no other process can load it)."""
    from finesift.models.loader import from_memory, is_loaded

    if is_loaded(model):
        return from_memory(model, "lm" if isinstance(model, tuple) else model.task).name
    if model is not None and Path(model).expanduser().exists():
        return str(Path(model).expanduser().resolve())
    return model


def jsonable(options: Any) -> Any:
    """A method's options as the manifest records them (a dataclass as a dict): every
    option, except one the method added later and leaves out of its keys while unset
    (:func:`~finesift.methods.base.option_identity`), so shards written before it
    existed still merge with new ones."""
    if dataclasses.is_dataclass(options):
        return option_identity(options)
    return dict(options) if isinstance(options, dict) else options


# -- what the stages hand on -----------------------------------------------------------


@dataclass
class RunPlan:
    """A checked run: its settings as the stages use them, its method, its clock."""

    pool_paths: list[Any]  # file paths, and in-memory inputs (finesift.data.memory)
    target_paths: list[Any]
    budget: str | int | None
    method: str
    meth: Method
    task: str
    model: Any
    strategy: str
    seed: int
    out_dir: Path | None
    fmt: str | None
    max_length: int | None
    template: str
    precision: str
    batch_size: int | str
    device: str
    progress: bool
    log: Callable[[str], None]
    workdir: str | Path | None
    shard: ShardSpec | None
    executor: Any
    t_start: float
    watch: Stopwatch = field(default_factory=Stopwatch)
    executor_name: str = "local"
    ray_address: str | None = None
    ray_options: dict[str, Any] = field(default_factory=dict)
    dedup: bool = False  # drop the pool's near duplicates before scoring (screen_pool)
    dedup_threshold: float = 0.8
    source_weights: dict[str, float] | None = None  # as given (names -> weights)
    group_weights: dict[str, float] | None = None  # per pool source (resolve_weights)
    screening: dict[str, Any] = field(default_factory=dict)  # manifest: dedup, contamination
    dtype: str = "fp32"  # the weights' dtype, resolved (fp32, bf16, fp16)
    dtype_given: str = "fp32"  # --dtype as given (auto stays auto in config.yaml)
    columns: dict[str, str] = field(default_factory=dict)  # --columns: field -> column
    export: tuple[str, ...] = ()  # --export formats (finesift.store.export)
    prefilter: Any = None  # --prefilter (finesift.select.prefilter.PrefilterSpec) or None
    prefilter_entry: dict[str, Any] | None = None  # the manifest's, set by prefilter_pool

    def settings(self, model_info: dict[str, Any]) -> dict[str, Any]:
        """The run's settings as its manifest records them (a shard's ``run``)."""
        return {"method": self.method, "method_options": jsonable(self.meth.options),
                "task": task_name(self.task), "model": model_info, "seed": self.seed,
                "max_length": self.max_length, "template": self.template,
                "precision": self.precision, "dtype": self.dtype,
                "batch_size": self.batch_size, "device": self.device, "format": self.fmt,
                **({"columns": dict(self.columns)} if self.columns else {}),
                **({"prefilter": self.prefilter_entry} if self.prefilter_entry else {})}

    @property
    def needs_model(self) -> bool:
        """Whether the run loads the model: its method or its prefilter method needs it."""
        return bool(self.meth.needs_model or
                    (self.prefilter is not None and self.prefilter.meth.needs_model))


@dataclass
class Inputs:
    """The pool and target records as read, with what reading skipped."""

    pool: list[Record]
    target: list[Record]
    pool_reading: Any  # finesift.data.readers.ReadReport
    target_reading: Any


@dataclass
class LoadedModel:
    """The tokenizer, the model (None when the method needs none) and its description."""

    tokenizer: Any
    model: Any
    info: dict[str, Any]
    new_head: bool
    label2id: dict[str, int] | None
    labels: list[str] | None


@dataclass
class Encoded:
    """The encoded pool and target, and the budget as a count (None in a shard run)."""

    pool: EncodedData
    target: EncodedData
    k: int | None


@dataclass
class Scored:
    """The method's result and its scores, checked (one finite score per scored row)."""

    result: MethodResult
    scores: np.ndarray


# -- the stages ------------------------------------------------------------------------


def check_options(
    pool: str | Path | Sequence[str | Path], target: str | Path | Sequence[str | Path], *,
    budget: str | int | None, method: str, method_options: dict[str, Any] | None, task: str,
    model: str | None, strategy: str, seed: int, out: str | Path | None, fmt: str | None,
    max_length: int | None, template: str, precision: str, batch_size: int | str,
    device: str, progress: bool, log: Callable[[str], None] | None,
    workdir: str | Path | None, num_shards: int, shard_index: int | None, executor: Any,
    ray_address: str | None, ray_options: dict[str, Any] | None,
    dedup: bool = False, dedup_threshold: float = 0.8, source_weights: Any = None,
    dtype: str = "fp32", columns: Any = None, export: Any = None, prefilter: Any = None,
) -> RunPlan:
    """Stage 1: check every option before any work (the arguments of
    :func:`finesift.api.select`, except ``method="auto"``); start the run's clock.

    Raises:
        OptionError: the first bad option, named as the command line names it.
    """
    t_start = time.perf_counter()
    pool_paths, target_paths = input_sources(pool, "pool"), input_sources(target, "target")
    from finesift.data.columns import parse_columns
    from finesift.data.memory import in_memory
    from finesift.store.export import parse_export

    columns, export = parse_columns(columns), parse_export(export)
    if export and out is None:
        raise OptionError(f"--export {','.join(export)} writes files: give an output folder "
                          "(--out)")
    if export and shard_index is not None:
        raise OptionError("--export: a shard run selects nothing to export")
    if shard_index is not None and in_memory(pool_paths + target_paths):
        raise OptionError(f"a shard run needs pool and target files (merge reads them again); "
                          f"{in_memory(pool_paths + target_paths)[0]} is in memory: save it "
                          "first (Dataset.to_json, DataFrame.to_parquet, ...)")
    if strategy not in STRATEGIES:
        raise OptionError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    from finesift.engine.tasks import task_class

    task_class(task)  # an OptionError naming the known tasks
    if precision not in ("auto", "bf16", "fp32"):
        raise OptionError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    from finesift.engine.budget import parse_batch_size

    parse_batch_size(batch_size)  # OptionError unless a positive int, 'auto' or 'auto:SIZE'
    if isinstance(batch_size, str) and batch_size.strip().isdigit():
        batch_size = int(batch_size)
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise OptionError(f"max_length must be a positive integer or None, got {max_length!r}")
    check_seed(seed)
    from finesift.models.loader import is_loaded

    if model is not None and not is_loaded(model) and not str(model).strip():
        raise OptionError("--model is empty; give a built-in model name or a model folder")
    if is_loaded(model) and not (executor == "local" or executor is None):
        raise OptionError("a model passed as an object cannot be sent to other processes "
                          "(--executor ray); save it (model.save_pretrained) and pass the folder")
    meth = get_method(method, method_options)  # fails fast on a bad name or option
    check_device(device)
    from finesift.engine.precision import resolve_dtype

    # --dtype auto: bf16 where the device is fast at it, unless the method needs fp32
    resolved_dtype = resolve_dtype(dtype, device, required=meth.required_dtype(),
                                   trains=meth.trains, who=f"method {method!r}")
    from finesift.select.prefilter import parse_prefilter

    cascade = parse_prefilter(prefilter)  # --prefilter METHOD:SHARE, checked
    if cascade is not None and cascade.meth.needs_model:  # it scores with the same model
        resolve_dtype(resolved_dtype, device, required=cascade.meth.required_dtype(),
                      trains=cascade.meth.trains, who=f"--prefilter {cascade.text}")
    shard = shard_spec(num_shards, shard_index)
    if shard is not None:
        meth.check_shardable()
        if out is None:
            raise OptionError("a shard run (--shard-index) needs an output folder (--out)")
    elif budget is None:
        raise OptionError("a budget is needed (--budget), except in a shard run")
    out_dir = check_out_dir(out)
    from finesift.data.dedup import check_threshold
    from finesift.select.strategies import parse_source_weights

    dedup_threshold = check_threshold(dedup_threshold)
    weights = parse_source_weights(source_weights)
    if weights and strategy != "balanced":
        raise OptionError(f"--source-weights needs --strategy balanced (not {strategy})")
    return RunPlan(
        pool_paths=pool_paths, target_paths=target_paths, budget=budget, method=method,
        meth=meth, task=task, model=model, strategy=strategy, seed=seed, out_dir=out_dir,
        fmt=fmt, max_length=max_length, template=template, precision=precision,
        batch_size=batch_size, device=device, progress=progress,
        log=as_log(log), workdir=workdir, shard=shard,
        executor=make_executor(meth, executor, ray_address, ray_options, device),
        t_start=t_start, executor_name=executor if isinstance(executor, str) else "local",
        ray_address=ray_address, ray_options=dict(ray_options or {}),
        dedup=bool(dedup), dedup_threshold=dedup_threshold, source_weights=weights,
        dtype=resolved_dtype, dtype_given=dtype, columns=columns, export=export,
        prefilter=cascade)


def load_inputs(plan: RunPlan) -> Inputs:
    """Stage 2: read the pool and target files and check that the task can use every
    record (before a model is loaded: an NER head needs the tags); check the budget
    against the pool as read."""
    from finesift.data.readers import ReadReport, load_records

    with plan.watch.stage("read"):
        read_pool, read_target = ReadReport(), ReadReport()
        pool_records = load_records(plan.pool_paths, plan.fmt, role="pool", report=read_pool,
                                    columns=plan.columns)
        target_records = load_records(plan.target_paths, plan.fmt, role="target",
                                      report=read_target, columns=plan.columns)
    for role, rep in (("pool", read_pool), ("target", read_target)):
        if rep.skipped:
            plan.log(f"warning: skipped {sum(rep.skipped.values())} {role} record(s) while "
                     f"reading: {rep.skipped}")
    if plan.budget is not None:
        parse_budget(plan.budget, len(pool_records))  # early check against the raw pool size
    check_shapes(pool_records, plan.task)
    check_shapes(target_records, plan.task)
    from finesift.store.export import check_exportable

    check_exportable(pool_records, plan.export)  # --export fails now, not after scoring
    return Inputs(pool_records, target_records, read_pool, read_target)


def load_model(plan: RunPlan, inputs: Inputs) -> LoadedModel:
    """Stage 3: the tokenizer, and the model if the method needs one (for NER, the label
    map: the model's own labels, else the tags of the target and pool)."""
    from finesift.engine.tasks import task_class
    from finesift.models import loader

    kind = task_class(plan.task)
    if loader.is_loaded(plan.model):  # a model the caller loaded: nothing to read
        bundle = loader.from_memory(plan.model, kind)
        plan.model = bundle  # hashed once: later stages name it by bundle.name
        plan.dtype = bundle.info["dtype"]  # --dtype applies to models finesift loads
        if plan.meth.needs_model and plan.dtype in ("bf16", "fp16"):  # what the method needs
            from finesift.engine.precision import resolve_dtype

            resolve_dtype(plan.dtype, plan.device, required=plan.meth.required_dtype(),
                          trains=plan.meth.trains,
                          who=f"method {plan.method!r} (given a {plan.dtype} model object)")
        if plan.needs_model and plan.device != "cpu":
            bundle.model.to(plan.device)
        labels = kind.label_names(_own_labels(bundle.model, kind), [inputs.target, inputs.pool])
        return LoadedModel(bundle.tokenizer, bundle.model if plan.needs_model else None,
                           bundle.info, False,
                           None if labels is None else {x: i for i, x in enumerate(labels)},
                           labels)
    with plan.watch.stage("load_model"):
        label2id = None
        labels = kind.label_names(
            loader.pretrained_labels(plan.model, plan.task), [inputs.target, inputs.pool])
        if labels is not None:
            label2id = {lab: i for i, lab in enumerate(labels)}
        if plan.needs_model:  # the method's or the prefilter's
            bundle = loader.load_model(plan.model, plan.task, labels=labels, seed=plan.seed,
                                       dtype=plan.dtype, device=plan.device)
            return LoadedModel(bundle.tokenizer, bundle.model, bundle.info, bundle.new_head,
                               label2id, labels)
        return LoadedModel(loader.load_tokenizer(plan.model, plan.task), None,
                           {"name": plan.model, "loaded": False}, False, label2id, labels)


def _own_labels(model: Any, kind: Any) -> dict[str, int] | None:
    """A loaded token classifier's label -> id map (``None`` for a task without a head)."""
    from finesift.data.encode import model_label_map

    config = getattr(model, "config", None)
    return model_label_map(config) if kind.trains_head and config is not None else None


def encode_inputs(plan: RunPlan, inputs: Inputs, loaded: LoadedModel) -> Encoded:
    """Stage 4: encode the pool and target (skipped records dropped and reported) and
    turn the budget into a count of the usable pool.

    Raises:
        InputError: every pool or every target record was skipped.
    """
    with plan.watch.stage("encode"):
        enc_pool = encode(inputs.pool, loaded.tokenizer, plan.task, max_length=plan.max_length,
                          label2id=loaded.label2id, template=plan.template)
        enc_target = encode(inputs.target, loaded.tokenizer, plan.task,
                            max_length=plan.max_length, label2id=loaded.label2id,
                            template=plan.template)
    for role, enc, paths in (("pool", enc_pool, plan.pool_paths),
                             ("target", enc_target, plan.target_paths)):
        skipped = sum(enc.report.get("skipped", {}).values())
        if skipped:
            plan.log(f"warning: skipped {skipped} {role} record(s): {enc.report.get('skipped')}")
        if not enc.examples:
            raise InputError(
                ", ".join(map(str, paths)),
                f"no usable {role} records: all {enc.report.get('n_records')} were skipped "
                f"({enc.report.get('skipped')})",
            )
    k = parse_budget(plan.budget, len(enc_pool.examples)) if plan.budget is not None else None
    return Encoded(enc_pool, enc_target, k)


def resolve_weights(plan: RunPlan, inputs: Inputs) -> None:
    """Stage 2b (before the model is loaded): match ``--source-weights`` names to the
    pool's sources (an unknown name stops the run, listing the sources)."""
    from finesift.select.strategies import resolve_source_weights

    plan.group_weights = resolve_source_weights(plan.source_weights,
                                                [r.source for r in inputs.pool])


def screen_pool(plan: RunPlan, enc: Encoded) -> Encoded:
    """Stage 4b: name the target examples that also appear in the usable pool (a warning
    and the manifest's ``contamination``), find the pool's duplicate groups (the manifest's
    ``dedup``) and, with ``--dedup``, keep only the first of each, so the duplicates are
    not scored; the budget then counts the pool that is left."""
    from finesift.data.dedup import screen
    from finesift.data.records import record_text

    with plan.watch.stage("dedup"):
        found = screen(enc.pool.records, enc.target.records, text_of=record_text,
                       threshold=plan.dedup_threshold, dedup=plan.dedup)
    plan.screening = {"dedup": found.dedup_entry(),
                      "contamination": found.contamination_entry()}
    for message in found.messages():
        plan.log(message)
    keep = found.kept
    if len(keep) == len(enc.pool.records):
        return enc
    examples = [enc.pool.examples[i] for i in keep]
    for j, e in enumerate(examples):
        e.index = j
    pool = EncodedData([enc.pool.records[i] for i in keep], examples, enc.pool.report)
    k = None
    if plan.budget is not None:
        try:
            k = parse_budget(plan.budget, len(examples))
        except OptionError as e:
            raise OptionError(f"{e} (after --dedup dropped {len(enc.pool.records) - len(keep)} "
                              "duplicate(s))") from None
    return Encoded(pool, enc.target, k)


def method_context(plan: RunPlan, pool: EncodedData, enc: Encoded, loaded: LoadedModel, *,
                   shard: ShardSpec | None, executor: Any) -> MethodContext:
    """What a method sees: ``pool`` (the usable pool, or the prefilter's kept subset), the
    target, the model and the run's settings."""
    from finesift.engine.precision import compute_precision
    from finesift.engine.tasks import task_for

    out_dir, workdir = plan.out_dir, plan.workdir
    return MethodContext(
        pool=pool.examples, target=enc.target.examples,
        pool_records=pool.records, target_records=enc.target.records,
        task=task_for(plan.task, loaded.tokenizer), model=loaded.model,
        model_task=task_name(plan.task),
        seed=plan.seed, precision=compute_precision(plan.precision, plan.dtype),
        device=plan.device, batch_size=plan.batch_size, progress=plan.progress,
        workdir=(Path(workdir) if workdir is not None
                 else (out_dir / ".work") if out_dir is not None else None),
        log=plan.log, shard=shard, executor=executor,
        model_spec={"name": model_name(plan.model), "task": task_name(plan.task),
                    "labels": loaded.labels, "seed": plan.seed, "dtype": plan.dtype},
        new_head=loaded.new_head, dtype=plan.dtype,
    )


def prefilter_pool(plan: RunPlan, enc: Encoded, loaded: LoadedModel) -> Any:
    """Stage 4c (``--prefilter METHOD:SHARE``; ``None`` without): the prefilter method
    scores the whole usable pool in this process (in a shard run too: every shard keeps
    the same examples) and the top SHARE is kept for :func:`score_pool`
    (:mod:`finesift.select.prefilter`: the kept set and the score rule).

    Returns:
        The :class:`finesift.select.prefilter.Cascade`; its manifest entry is
        ``plan.prefilter_entry``.

    Raises:
        OptionError: the prefilter keeps fewer examples than the budget.
        RuntimeError: the prefilter method returned scores of the wrong shape or not finite.
    """
    from finesift.select.prefilter import Cascade, check_budget, kept_positions

    spec = plan.prefilter
    if spec is None:
        return None
    n = len(enc.pool.examples)
    n_keep = spec.count(n)
    if enc.k is not None:
        check_budget(spec.text, n_keep, enc.k, n)
    if "%" not in spec.share and int(spec.share) > n:
        plan.log(f"warning: --prefilter {spec.text} keeps all {n} usable pool examples (the "
                 f"count is larger than the pool): {plan.method} scores the whole pool")
    if spec.meth.uses_budget:
        spec.meth.bind_budget(n_keep)
    ctx = method_context(plan, enc.pool, enc, loaded, shard=None, executor=None)
    t0 = time.perf_counter()
    with plan.watch.stage("prefilter"):
        result = spec.meth.score(ctx)
    seconds = time.perf_counter() - t0
    scores = np.asarray(result.scores, dtype=np.float64)
    if (scores.shape != (n,) or not np.all(np.isfinite(scores))
            or (result.rows is not None and len(result.rows) != n)):
        raise RuntimeError(f"prefilter method {spec.method} returned invalid scores "
                           f"(shape {scores.shape})")
    cascade = Cascade(spec, scores, kept_positions(scores, n_keep),
                      {k: np.asarray(v) for k, v in result.columns.items()}, result.info,
                      seconds)
    plan.prefilter_entry = cascade.entry()
    plan.log(f"prefilter {spec.method} kept {n_keep} of {n} pool examples in {seconds:.1f} s; "
             f"{plan.method} scores those, the rest rank below them in {spec.method}'s order")
    return cascade


def score_pool(plan: RunPlan, enc: Encoded, loaded: LoadedModel, cascade: Any = None) -> Scored:
    """Stage 5: the method scores the pool (a shard run: the shard's rows; with a
    prefilter ``cascade`` from :func:`prefilter_pool`, only the kept examples, which its
    context holds as the whole pool, and the result is expanded to the whole pool by the
    cascade's score rule); the executor is closed whatever happens.

    Raises:
        RuntimeError: the method returned scores of the wrong shape or not finite.
    """
    pool = enc.pool
    if cascade is not None:  # the kept subset, in pool order, as the method's whole pool
        pool = EncodedData([enc.pool.records[i] for i in cascade.kept],
                           [dataclasses.replace(enc.pool.examples[i], index=j)
                            for j, i in enumerate(cascade.kept)], enc.pool.report)
    ctx = method_context(plan, pool, enc, loaded, shard=plan.shard, executor=plan.executor)
    if plan.meth.uses_budget and enc.k is not None:
        plan.meth.bind_budget(enc.k)
    try:
        with plan.watch.stage("score"):
            result = plan.meth.score(ctx)
    finally:
        if plan.executor is not None:
            plan.executor.close()
    if plan.executor is not None:
        result.info.setdefault("executor", plan.executor.describe())
    scores = np.asarray(result.scores, dtype=np.float64)
    n_scored = len(pool.examples) if result.rows is None else len(result.rows)
    if scores.shape != (n_scored,) or not np.all(np.isfinite(scores)):
        raise RuntimeError(f"method {plan.method} returned invalid scores "
                           f"(shape {scores.shape})")
    if cascade is not None:  # back to the whole pool (a shard: its rows)
        result = cascade.expand(result, plan.shard)
        scores = np.asarray(result.scores, dtype=np.float64)
    return Scored(result, scores)


def data_section(plan: RunPlan, inputs: Inputs, enc: Encoded,
                 labels: list[str] | None) -> dict[str, Any]:
    """The manifest's ``data`` entry: the input files' fingerprints, the record counts, the
    reading and encoding reports and the NER labels."""
    return {
        "pool": [source_fingerprint(p) for p in plan.pool_paths],
        "target": [source_fingerprint(p) for p in plan.target_paths],
        "pool_records": len(inputs.pool),
        "target_records": len(inputs.target),
        "pool_reading": inputs.pool_reading.to_dict(),
        "target_reading": inputs.target_reading.to_dict(),
        "pool_encoding": enc.pool.report,
        "target_encoding": enc.target.report,
        "labels": labels,
    }


def choose(plan: RunPlan, enc: Encoded, scored: Scored, settings: dict[str, Any],
           data: dict[str, Any]) -> Selection:
    """Stage 6: apply the strategy (or take the method's own choice), build the score
    table and the manifest; returns the run's :class:`Selection` (not written yet).
    ``settings`` and ``data`` are the manifest's (:meth:`RunPlan.settings`,
    :func:`data_section`)."""
    from finesift.store.export import export_entry

    result, scores, k, pool = scored.result, scored.scores, enc.k, enc.pool
    n_label = np.array([e.n_label_tokens for e in pool.examples])
    with plan.watch.stage("select"):
        if result.chosen is not None:  # the method chose its own set (at most k)
            chosen = np.asarray(result.chosen, dtype=np.int64)[:k]
            if plan.strategy != "top":
                plan.log(f"warning: {plan.method} chooses its own subset; strategy "
                         f"{plan.strategy!r} not applied")
            plan.log(f"{plan.method} chose {len(chosen)} example(s) for a budget of {k}")
        else:
            chosen = select_indices(
                scores, k, strategy=plan.strategy, lengths=n_label, base_set=result.base_set,
                seed=plan.seed, groups=np.array([r.source for r in pool.records], dtype=str),
                weights=plan.group_weights)
    selected = [pool.records[i] for i in chosen]
    columns: dict[str, Any] = score_table(
        [r.id for r in pool.records], [r.source for r in pool.records],
        [r.row for r in pool.records], scores, n_label,
        [len(e) for e in pool.examples], [e.truncated for e in pool.examples], chosen)
    if result.base_set is not None:
        in_base = np.zeros(len(scores), dtype=bool)
        in_base[result.base_set] = True
        columns["in_base_set"] = in_base
    for name, col in result.columns.items():
        columns[name] = np.asarray(col)
    weights = {"source_weights": plan.group_weights} if plan.group_weights else {}
    manifest = run_manifest(
        {**settings, "strategy": plan.strategy, **weights}, data,
        {**selection_entries(plan.budget, k, selected), "method_info": result.info,
         **plan.screening, **export_entry(plan.export, selected)},
        watch=plan.watch, t_start=plan.t_start)
    return Selection(selected=selected, scores=scores, pool=pool.records, columns=columns,
                     manifest=manifest, out=plan.out_dir)


def run_config(plan: RunPlan, loaded: LoadedModel) -> Any:
    """The run as a :class:`finesift.config.RunConfig` that runs again to the same
    selection: absolute input paths, the method's every option (defaults included), the
    model that was loaded; written to the output folder as ``config.yaml``."""
    from finesift.config import RunConfig
    from finesift.engine.tasks import task_class

    shard = plan.shard
    return RunConfig(
        pool=[str(Path(p).absolute()) for p in plan.pool_paths],
        target=[str(Path(p).absolute()) for p in plan.target_paths],
        budget=None if plan.budget is None else str(plan.budget), method=plan.method,
        method_options=jsonable(plan.meth.options) or {}, task=task_class(plan.task).name,
        model=model_name(loaded.info.get("name") or plan.model), strategy=plan.strategy,
        seed=int(plan.seed), out=None if plan.out_dir is None else str(plan.out_dir.absolute()),
        fmt=plan.fmt, max_length=plan.max_length, template=plan.template,
        precision=plan.precision, dtype=plan.dtype_given, batch_size=plan.batch_size,
        device=plan.device,
        workdir=None if plan.workdir is None else str(Path(plan.workdir).absolute()),
        num_shards=1 if shard is None else shard.num_shards,
        shard_index=None if shard is None else shard.index,
        executor=plan.executor_name, ray_address=plan.ray_address,
        ray_options=dict(plan.ray_options or {}), dedup=plan.dedup,
        dedup_threshold=plan.dedup_threshold, source_weights=dict(plan.source_weights or {}),
        columns=dict(plan.columns), export=list(plan.export),
        prefilter=None if plan.prefilter is None else plan.prefilter.config())


def write_run_config(plan: RunPlan, loaded: LoadedModel) -> None:
    """Write ``config.yaml`` (``finesift select --config OUT/config.yaml`` runs it again).
    A run with an in-memory pool or target has no file a config could name: it writes no
    ``config.yaml`` (and removes one an earlier run left in the folder), and says so."""
    from finesift.data.memory import in_memory
    from finesift.store import atomic_path

    if plan.out_dir is None:
        return
    memory = in_memory(plan.pool_paths + plan.target_paths)
    if memory:
        (plan.out_dir / "config.yaml").unlink(missing_ok=True)
        plan.log(f"no config.yaml written: {memory[0]} is in memory, and a config names "
                 "input files (save the data to a file to re-run this selection from the "
                 "command line)")
        return
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(plan.out_dir / "config.yaml") as tmp:
        tmp.write_text(run_config(plan, loaded).to_yaml(), encoding="utf-8")

