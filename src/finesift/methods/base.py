"""The method interface and registry.

A method turns encoded pool and target examples into one score per pool example
(higher = more useful). It knows nothing of budgets; selectors turn scores into
subsets. A new method is one module with a :class:`Method` subclass decorated by
:func:`register`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from finesift.data.records import Example, Record
from finesift.engine.tasks import Task
from finesift.errors import OptionError
from finesift.store.chunks import ShardSpec


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
    #: :meth:`score` can hand its chunks to ``ctx.executor`` (e.g. Ray workers)
    distributable: ClassVar[bool] = False

    def __init__(self, options: Any) -> None:
        self.options = options

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

    @abstractmethod
    def score(self, ctx: MethodContext) -> MethodResult:
        """Score every pool example."""


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    REGISTRY[cls.name] = cls
    return cls


def available() -> dict[str, type[Method]]:
    """Every registered method (importing the built-in modules first)."""
    import finesift.methods  # noqa: F401  (registers the built-ins)

    return dict(sorted(REGISTRY.items()))


def options_from_dict(cls: type[Method], values: dict[str, Any] | None) -> Any:
    """Build ``cls.Options`` from a dict, with a clear error for unknown or bad keys."""
    values = dict(values or {})
    opt_cls = cls.Options
    if not dataclasses.is_dataclass(opt_cls):
        return values
    known = {f.name: f for f in dataclasses.fields(opt_cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        if not known:
            raise OptionError(
                f"method {cls.name!r} takes no options (got {', '.join(map(repr, unknown))})"
            )
        raise OptionError(
            f"method {cls.name!r} has no option(s) {', '.join(unknown)}; "
            f"its options are: {', '.join(known)}"
        )
    defaults = opt_cls()
    converted = {}
    for k, v in values.items():
        converted[k] = _convert_option(cls.name, k, v, getattr(defaults, k))
    opts = opt_cls(**converted)
    check = getattr(opts, "validate", None)
    if callable(check):
        check()
    return opts


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _convert_option(method: str, key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of the option's default; a clear :class:`OptionError` for a
    value of another kind (a bool, a fraction, an infinity or a word for a count; a number
    other than 0 and 1 or a word other than true/false for a flag).

    Counts take integers and integral numbers (``1e4``); numbers take any finite number;
    flags take true/false, yes/no, on/off, 1/0. Other options are passed on as given
    (the method's ``validate`` checks them).
    """
    shown = f"method {method!r}: option {key}={value!r}"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise OptionError(f"{shown}: expected true or false")
    if isinstance(default, int):
        number = _number(value)
        if number is None:
            raise OptionError(f"{shown} is not a number")
        if isinstance(number, float):
            if not math.isfinite(number) or number != int(number):
                raise OptionError(f"{shown}: expected an integer")
            number = int(number)
        if abs(number) >= 2**63:
            raise OptionError(f"{shown}: expected an integer of at most 19 digits")
        return number
    if isinstance(default, float):
        number = _number(value)
        if number is None:
            raise OptionError(f"{shown} is not a number")
        try:
            number = float(number)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number) and math.isfinite(default):
            raise OptionError(f"{shown}: expected a finite number")
        return number
    return value


def _number(value: Any) -> int | float | None:
    """An int or float from a number or numeric string (never from a bool), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            return None
    return None


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
    and seed, and for a folder the name, size and modification time of its weight files
    (so a model retrained into the same folder does not resume another model's state)."""
    if spec is None:
        return "model:unknown"
    parts: list[Any] = [spec.get(k) for k in ("name", "task", "labels", "seed")]
    name = spec.get("name")
    if name is not None and Path(str(name)).is_dir():
        for f in sorted(Path(str(name)).glob("*.safetensors")):
            st = f.stat()
            parts.append([f.name, st.st_size, st.st_mtime_ns])
    return json.dumps(parts, default=str)


def run_fingerprint(tag: str, options: Any, ctx: MethodContext) -> str:
    """A short hash of a method's options, seed, precision, model (see
    :func:`model_identity`) and every encoded example: the name under which a method
    keeps resumable state in ``ctx.workdir``.

    Args:
        tag: the method and the version of its saved-state format, e.g. ``"tov-v3"``.
        options: the options dataclass.
        ctx: the run's context.
    """
    h = hashlib.sha256()
    h.update(f"{tag}|".encode())
    h.update(json.dumps(dataclasses.asdict(options), sort_keys=True).encode())
    h.update(f"{ctx.seed}|{ctx.precision}|{len(ctx.pool)}|{len(ctx.target)}".encode())
    if ctx.model_spec is not None:  # None (a context built by hand): hashed as before
        h.update(model_identity(ctx.model_spec).encode())
    for ex in itertools.chain(ctx.pool, ctx.target):
        h.update(np.asarray(ex.input_ids).tobytes())
        h.update(np.asarray(ex.labels).tobytes())
    return h.hexdigest()[:16]
