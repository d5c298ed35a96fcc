"""The method interface and registry.

A method turns encoded pool and target examples into one score per pool example
(higher = more useful). It knows nothing of budgets; selectors turn scores into
subsets. A new method is one module with a :class:`Method` subclass decorated by
:func:`register`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from finesift.config import from_mapping
from finesift.data.records import Example, Record
from finesift.engine.tasks import Task
from finesift.errors import OptionError
from finesift.store.chunks import ShardSpec
from finesift.store.work import fingerprint


@dataclass
class MethodContext:
    """Everything a method may use.

    Attributes:
        pool, target: encoded examples (records that could not be encoded are gone).
        pool_records, target_records: the records, aligned with the examples.
        task: batches examples and computes label log-probs for the model.
        model: the model (a transformers model) or ``None`` for model-free methods.
        model_task: ``"lm"`` or ``"ner"``.
        seed: the run's seed.
        precision: ``auto``, ``bf16`` or ``fp32``.
        device: torch device.
        batch_size: rows per scoring batch, or ``"auto"``/``"auto:SIZE"`` (sized to a
            memory limit, see :class:`finesift.engine.budget.TokenBudget`).
        progress: show progress bars.
        workdir: a folder for resumable intermediate state (``None``: no resume).
        log: a callback for progress messages (the CLI prints them).
        shard: score only this shard of the pool (``None``: all of it); only methods
            with ``shardable = True`` accept one (see :mod:`finesift.store.chunks`).
        executor: where chunks are scored: ``None`` (this process) or an executor of
            :mod:`finesift.executors` (e.g. Ray workers).
        model_spec: how another process loads ``model`` again: ``{"name", "task",
            "labels", "seed"}`` as passed to :func:`finesift.models.loader.load_model`.
        new_head: the model's classification head was freshly initialised for this run
            (token classification from a model without a trained head for these labels).
        dtype: the dtype the model's weights were loaded in (``fp32``, ``bf16``,
            ``fp16``; ``--dtype`` resolved). ``precision`` is then the autocast setting
            for fp32 weights (``fp32``, i.e. none, for bf16/fp16 weights).
    """

    pool: list[Example]
    target: list[Example]
    pool_records: list[Record]
    target_records: list[Record]
    task: Task
    model: Any = None
    model_task: str = "lm"
    seed: int = 0
    precision: str = "auto"
    device: str = "cpu"
    batch_size: int | str = 8
    progress: bool = False
    workdir: Path | None = None
    log: Callable[[str], None] = field(default=lambda msg: None)
    shard: ShardSpec | None = None
    executor: Any = None
    model_spec: dict[str, Any] | None = None
    new_head: bool = False
    dtype: str = "fp32"


@dataclass
class MethodResult:
    """A method's output.

    Attributes:
        scores: one finite float per pool example (higher = select first).
        columns: extra per-example columns for ``scores.parquet`` (e.g. per-round scores).
        base_set: indices of pool examples a strategy may sample from uniformly
            (ToV's base set U), or ``None``.
        chosen: for methods that choose a set rather than rank the pool (HARP): the
            pool indices they chose, in order, at most the budget and possibly fewer.
            When given, it is the selection and no strategy is applied.
        info: figures for the manifest (timings, losses, counts).
        rows: in a shard run, the pool positions ``scores`` and ``columns`` belong to
            (sorted); ``None``: every pool example, in pool order. ``base_set`` always
            holds positions in the whole pool.
    """

    scores: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    base_set: np.ndarray | None = None
    chosen: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    rows: np.ndarray | None = None


class Method(ABC):
    """Base class of selection methods."""

    name: ClassVar[str]
    description: ClassVar[str]
    needs_model: ClassVar[bool] = True
    #: the method's choice depends on the budget (it is told through :meth:`bind_budget`)
    uses_budget: ClassVar[bool] = False
    Options: ClassVar[type] = dict  # a dataclass type with defaults
    #: each pool example's score is independent of the other pool examples and
    #: :meth:`score` honours ``ctx.shard`` (scores only the shard's chunks, sets ``rows``)
    shardable: ClassVar[bool] = False
    #: why the method cannot be sharded (said in the error)
    not_shardable_reason: ClassVar[str] = "its scores are not computed shard by shard"
    #: the class of the method's *chunk scorer* (see :class:`ChunkScorer`), through
    #: which :meth:`score` hands the pool's chunks to ``ctx.executor`` (e.g. Ray
    #: workers) with :func:`score_chunks`; ``None``: the method scores in-process only.
    #: A method opts in to ``--executor ray`` by setting it.
    chunk_scorer: ClassVar[type | None] = None
    #: why the method cannot hand its work to an executor (said in the error)
    not_distributable_reason: ClassVar[str] = "it has no chunk scorer (chunk_scorer)"
    #: ``finesift select`` flags this method owns, flag name -> option name (``harp``'s
    #: ``--envelope`` sets its ``envelope`` option); the CLI adds one flag per name
    cli_flags: ClassVar[dict[str, str]] = {}
    #: keys of :attr:`MethodResult.info` a benchmark copies into each run's row and shows
    #: in its report, with their titles (HARP: how many examples it chose, how many
    #: leaves it trained)
    report_columns: ClassVar[dict[str, str]] = {}
    #: the method trains the model (an adapter) or takes its gradients: ``--dtype fp16``
    #: is refused (no loss scaling), see :func:`finesift.engine.precision.resolve_dtype`
    trains: ClassVar[bool] = False

    def __init__(self, options: Any) -> None:
        self.options = options

    def required_dtype(self) -> tuple[str, str] | None:
        """``(dtype, why)`` when the method, with its options, needs its model's weights in
        one dtype (ToV scoring in fp32: ``("fp32", "...")``), else ``None``. ``--dtype
        auto`` then loads that dtype, and another explicit ``--dtype`` stops the run
        with ``why``."""
        return None

    def check_distributable(self, executor: str = "ray") -> None:
        """Raise :class:`OptionError` unless this method, with its options, can hand its
        chunks to an executor (``--executor ray``)."""
        if self.chunk_scorer is None:
            can = ", ".join(n for n, c in available().items() if c.chunk_scorer is not None)
            raise OptionError(
                f"--executor {executor}: method {self.name!r} scores in-process only: "
                f"{self.not_distributable_reason}; run it without --executor "
                f"(methods that can use one: {can})"
            )

    def check_shardable(self) -> None:
        """Raise :class:`OptionError` unless this method, with its options, gives every
        shard's scores exactly as an unsharded run would."""
        if not self.shardable:
            can = ", ".join(n for n, c in available().items() if c.shardable)
            raise OptionError(
                f"method {self.name!r} cannot score the pool in shards: "
                f"{self.not_shardable_reason}; run it without --num-shards "
                f"(methods that can: {can})"
            )

    def bind_budget(self, k: int) -> None:
        """Tell the method the run's budget (a count) before :meth:`score`; only called
        for methods with ``uses_budget``."""

    def cost(self, ctx: MethodContext) -> Any:
        """What :meth:`score` would do on ``ctx``, without doing it: a
        :class:`finesift.engine.cost.Cost` (its forward and training passes in padded
        tokens, work it times itself through a probe, the memory it holds and the disk
        it writes), which ``finesift select --estimate`` turns into wall time, memory and
        disk with a few measured batches (:mod:`finesift.estimator`).
        ``ctx`` is the run's context (no work folder, no shard, no executor).

        Raises:
            OptionError: the method declares no cost (this default).
        """
        raise OptionError(f"--estimate: method {self.name!r} declares no cost model "
                          "(Method.cost); run it without --estimate")

    @abstractmethod
    def score(self, ctx: MethodContext) -> MethodResult:
        """Score every pool example."""


class ChunkScorer(Protocol):
    """What a method hands an executor: a picklable object (shipped once to every worker,
    e.g. through Ray's object store) that scores chunks of the pool.

    A method builds one after its global step (ToV's adapters, LESS's warm-up and target
    features, embed's target embeddings), holding everything a chunk's result depends
    on besides the chunk itself, and how to load the model again
    (``MethodContext.model_spec``, see :func:`load_spec_model`). The same object scores
    in this process (:meth:`bind`, with the run's model) and in a worker (:meth:`build`,
    which loads the model and then binds it), so a chunk's result is the same wherever
    it is computed.
    """

    def build(self, device: str = "cpu") -> Callable[[Any], np.ndarray]:
        """In a worker: load what is needed; return ``score(payload) -> array``."""
        ...

    def bind(self, model: Any, device: str = "cpu") -> Callable[[Any], np.ndarray]:
        """In this process: ``score(payload) -> array`` with ``model`` as :meth:`build`
        would load it (``None`` for scorers that need no model)."""
        ...


def load_spec_model(spec: dict[str, Any] | None, device: str = "cpu", *, who: str = "method") -> Any:
    """The model of ``ctx.model_spec`` loaded again (as the run loaded it: same name or
    folder, task, head labels and seed), on ``device``, in eval mode."""
    from finesift.models.loader import load_model

    if spec is None:
        raise OptionError(f"{who}: an executor needs ctx.model_spec (how workers load the model)")
    model = load_model(spec.get("name"), spec["task"], labels=spec.get("labels"),
                       seed=int(spec.get("seed", 0)), dtype=spec.get("dtype", "fp32")).model
    return model.to(device)


def score_chunks(ctx: MethodContext, scorer: ChunkScorer, todo: Iterable[int],
                 payload: Callable[[int], Any], *, model: Any = None
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """Score the chunks ``todo``: ``(chunk id, result)`` as each finishes (in any order
    with an executor).

    Without ``ctx.executor`` the chunks are scored one after the other in this process
    by ``scorer.bind(model, ctx.device)``; with one, the executor's workers score them
    (``scorer.build``). ``payload(c)`` is what the scorer is given for chunk ``c`` (its
    examples, texts, ...), made only when the chunk is sent. The caller saves each
    result in its chunk store as it arrives, so a killed run resumes either way.
    """
    todo = list(todo)
    if not todo:
        return
    if ctx.executor is None:
        fn = scorer.bind(model, ctx.device)
        for c in todo:
            yield c, fn(payload(c))
        return
    for c, vals in ctx.executor.map_chunks(scorer, ((c, payload(c)) for c in todo)):
        yield c, np.asarray(vals)


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    REGISTRY[cls.name] = cls
    return cls


def available() -> dict[str, type[Method]]:
    """Every registered method (importing the built-in modules first)."""
    import finesift.methods  # noqa: F401  (registers the built-ins)

    return dict(sorted(REGISTRY.items()))


def report_columns() -> dict[str, str]:
    """Every registered method's :attr:`Method.report_columns` (key -> title), in
    registry order, once."""
    seen: dict[str, str] = {}
    for cls in available().values():
        for key, title in cls.report_columns.items():
            seen.setdefault(key, title)
    return seen


def options_from_dict(cls: type[Method], values: dict[str, Any] | None) -> Any:
    """Build ``cls.Options`` from a dict, with a clear error for unknown or bad keys (the
    conversion and checks of :func:`finesift.config.from_mapping`)."""
    values = dict(values or {})
    opt_cls = cls.Options
    if not dataclasses.is_dataclass(opt_cls):
        return values

    def unknown(bad: list[str], known: list[str]) -> str:
        if not known:
            return f"method {cls.name!r} takes no options (got {', '.join(map(repr, bad))})"
        return (f"method {cls.name!r} has no option(s) {', '.join(bad)}; "
                f"its options are: {', '.join(known)}")

    return from_mapping(opt_cls, values, shown=lambda k, v: f"method {cls.name!r}: option {k}={v!r}",
                        unknown=unknown)


def get_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """Instantiate a registered method; a misspelt name gets the list of methods."""
    methods = available()
    if name not in methods:
        raise OptionError(
            f"unknown method {name!r}; available methods: {', '.join(methods)}"
        )
    cls = methods[name]
    return cls(options_from_dict(cls, options))


def model_identity(spec: dict[str, Any] | None) -> str:
    """The model a run uses, for resume fingerprints: its name or folder, task, head labels
    and seed, and for a folder (or a hub id's cached snapshot) the name, size and
    modification time of its weight files (so a model retrained into the same folder does
    not resume another model's state); the weights' ``dtype`` when it is not fp32 (an
    fp32 run keeps the text, hence the keys, it had before dtypes existed)."""
    if spec is None:
        return "model:unknown"
    parts: list[Any] = [spec.get(k) for k in ("name", "task", "labels", "seed")]
    name = spec.get("name")
    if name is not None and Path(str(name)).is_dir():
        for f in sorted(Path(str(name)).glob("*.safetensors")):
            st = f.stat()
            parts.append([f.name, st.st_size, st.st_mtime_ns])
    elif name is not None:  # a hub id in the local Hugging Face cache: its snapshot
        from finesift.models.loader import hub_snapshot

        snapshot = hub_snapshot(str(name))
        if snapshot is not None:
            parts.append(["hub", snapshot.name])
            for f in sorted(snapshot.glob("*.safetensors")):
                st = f.stat()
                parts.append([f.name, st.st_size, st.st_mtime_ns])
    if spec.get("dtype", "fp32") != "fp32":  # fp32 keeps the keys of existing work folders
        parts.append(["dtype", spec["dtype"]])
    return json.dumps(parts, default=str)


def option_identity(options: Any) -> dict[str, Any]:
    """``dataclasses.asdict(options)`` as resume fingerprints and benchmark records key
    it: without the fields the options class names in ``unkeyed_defaults`` (a
    ``ClassVar``) while they hold their default. An option added after work folders and
    benchmark rows were written is listed there, so those stay valid for runs that do not
    use it (``tov``'s ``proxy``)."""
    values = dataclasses.asdict(options)
    skip = getattr(type(options), "unkeyed_defaults", ())
    if skip:
        defaults = {f.name: f.default for f in dataclasses.fields(options)}
        for name in skip:
            if name in values and values[name] == defaults.get(name):
                del values[name]
    return values


def resolved_identity(name: str, options: dict[str, Any]) -> dict[str, Any] | None:
    """Every option of method ``name`` with its value for the given ``options`` dict,
    defaults filled in, as :func:`option_identity` keys it, in JSON types: what benchmark
    rows record, so that ``{}`` and the defaults spelt out compare equal. None for a
    method finesift does not know or one without an options dataclass (``auto``).
    Raises :class:`~finesift.errors.OptionError` for options the method refuses."""
    cls = available().get(name)
    if cls is None or not dataclasses.is_dataclass(cls.Options):
        return None
    opts = options_from_dict(cls, options)
    return json.loads(json.dumps(option_identity(opts), sort_keys=True, default=str))


def run_fingerprint(tag: str, options: Any, ctx: MethodContext) -> str:
    """A short hash of a method's options (:func:`option_identity`), seed, precision,
    model (see :func:`model_identity`) and every encoded example: the name under which a
    method keeps resumable state in ``ctx.workdir`` (16 hex digits, the store's
    ``"run-v0"`` scheme, see :mod:`finesift.store.work`).

    Args:
        tag: the method and the version of its saved-state format, e.g. ``"tov-v3"``.
        options: the options dataclass.
        ctx: the run's context.
    """
    identity = {
        "tag": tag,
        "options": option_identity(options),
        "seed": ctx.seed,
        "precision": ctx.precision,
        "n_pool": len(ctx.pool),
        "n_target": len(ctx.target),
        # None (a context built by hand): no model text is hashed, as before
        "model": None if ctx.model_spec is None else model_identity(ctx.model_spec),
    }
    blobs = (np.asarray(a) for ex in itertools.chain(ctx.pool, ctx.target)
             for a in (ex.input_ids, ex.labels))
    # the frozen scheme of the existing work folders (the values must never change)
    return fingerprint(identity, version="run-v0", blobs=blobs)
