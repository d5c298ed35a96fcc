"""``finesift select --estimate`` / :func:`finesift.estimate`: what a run will cost on this
machine, before doing its work.

The estimate runs the cheap stages of a real run (read, load the model, encode, dedup:
their seconds are measured and counted as they are), asks the method for its
:class:`~finesift.engine.cost.Cost` (:meth:`finesift.methods.base.Method.cost`: its
forward and training passes in padded tokens, the work it times itself, the memory it
holds and what it writes), and measures seconds per unit of each kind of pass on a few
real batches of the run's own examples, with the run's model, batch size, precision,
device and adapter (:class:`Calibrator`). Then

    wall = measured stages + sum over passes (units x seconds per unit) + once-only costs
    peak memory = the peak resident memory while estimating (model, batches, optimiser
                  state of the measured steps) + what the method holds beyond a batch
    disk = the method's work files + the run's outputs

:func:`project` is that arithmetic alone (the tests give it fixed rates). The estimate is
for a cold run in one process: finished work in a work folder (a resumed run), shards and
Ray workers are not counted. Nothing is written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finesift.engine.cost import FORWARD, FULL, PROBE, TRAIN, Cost, Pass, ProbeResult
from finesift.errors import OptionError

#: batches timed per kind of pass (after one untimed warm-up batch, the longest)
CALIBRATION_BATCHES = 2
#: the stages of a run the estimate performs and measures itself
MEASURED_STAGES = ("read", "load_model", "encode", "dedup")


@dataclass
class Rate:
    """Seconds per unit of one kind of pass on this machine.

    Attributes:
        key: what was measured (kind, data, batch size, precision, adapter).
        seconds_per_unit: seconds per padded token (or per probe unit).
        unit: ``token`` or the probe's unit.
        fixed_seconds: paid once per run (a probe's loading or set-up).
        detail: how it was measured.
        measured: ``False`` when given (:func:`estimate`'s ``rates``).
    """

    key: str
    seconds_per_unit: float
    unit: str = "token"
    fixed_seconds: float = 0.0
    detail: str = ""
    measured: bool = True


@dataclass
class PassEstimate:
    """One pass of the projection: its units and the seconds they take."""

    what: str
    kind: str
    units: float
    unit: str
    rate: str  # Rate.key
    seconds_per_unit: float
    seconds: float


@dataclass
class Estimate:
    """The projected cost of a ``finesift select`` run (see the module docstring).

    ``text()`` is what ``finesift select --estimate`` prints; ``to_dict()`` the same as
    JSON-ready figures.
    """

    method: str
    method_options: dict[str, Any]
    model: str | None
    device: str
    precision: str
    batch_size: int | str
    threads: int
    n_pool: int
    pool_tokens: int
    n_target: int
    target_tokens: int
    model_parameters: int
    model_bytes: int
    adapter_parameters: int
    stages: dict[str, float]
    passes: list[PassEstimate]
    rates: list[Rate]
    fixed_seconds: float
    wall_seconds: float
    measured_peak_bytes: float
    held_bytes: dict[str, float]
    peak_memory_bytes: float
    device_peak_bytes: float | None
    disk: dict[str, float]
    disk_bytes: float
    calibration_seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))

    def text(self) -> str:
        """The estimate as ``finesift select --estimate`` prints it."""
        opts = ", ".join(f"{k}={v}" for k, v in sorted(self.method_options.items()))
        lines = [
            (f"estimate: {self.method}{f' ({opts})' if opts else ''} on {self.n_pool:,} pool "
            f"examples ({self.pool_tokens:,} tokens) and {self.n_target:,} target examples "
            f"({self.target_tokens:,} tokens)"),
            f"  wall ~{_duration(self.wall_seconds)}, peak memory ~{_size(self.peak_memory_bytes)}"
            + (f" (device ~{_size(self.device_peak_bytes)})" if self.device_peak_bytes else "")
            + f", disk ~{_size(self.disk_bytes)}",
        ]
        model = f"{self.model or 'no model'}"
        if self.model_parameters:
            model += f": {_count(self.model_parameters)} parameters ({_size(self.model_bytes)})"
        if self.adapter_parameters:
            model += f", adapter {_count(self.adapter_parameters)}"
        lines.append(f"  {model}; {self.device}, {self.threads} thread(s), batch "
                     f"{self.batch_size}, precision {self.precision}")
        lines.append("  time:")
        stages = sum(self.stages.values())
        rows = [(stages, "read, load the model, encode, dedup (measured)")]
        rows += [(p.seconds, f"{p.what}: {_units(p.units, p.unit)} x {_rate(p.seconds_per_unit, p.unit)}")
                 for p in self.passes]
        if self.fixed_seconds:
            rows.append((self.fixed_seconds, "once per run (loading an encoder, set-up)"))
        for secs, what in rows:
            lines.append(f"    {_duration(secs):>9}  {what}")
        if any(r.measured for r in self.rates):
            lines.append(f"  calibration on this machine ({self.calibration_seconds:.0f} s, not "
                         "part of the run):")
        elif self.rates:
            lines.append("  rates (given, not measured):")
        for r in self.rates:
            given = "" if r.measured else " (given)"
            lines.append(f"    {_rate(r.seconds_per_unit, r.unit):>14}  {r.key}{given}"
                         + (f": {r.detail}" if r.detail else ""))
        lines.append(f"  memory ~{_size(self.peak_memory_bytes)}: "
                     f"{_size(self.measured_peak_bytes)} peak while estimating (weights, "
                     "the longest batch, optimiser state)"
                     + "".join(f" + {_size(b)} {what}" for what, b in self.held_bytes.items()
                               if b >= 1 << 20))
        if self.disk_bytes:
            lines.append(f"  disk ~{_size(self.disk_bytes)}: "
                         + ", ".join(f"{what} {_size(b)}" for what, b in self.disk.items() if b))
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


# -- arithmetic ----------------------------------------------------------------------------


def project(cost: Cost, rate_of: Callable[[Pass], Rate], stages: Mapping[str, float] | None = None
            ) -> tuple[list[PassEstimate], float, float]:
    """``(passes, fixed seconds, wall seconds)``: every pass's units times its rate, each
    rate's once-only seconds counted once, plus the measured ``stages``."""
    out, fixed = [], {}
    for p in cost.passes:
        r = rate_of(p)
        out.append(PassEstimate(p.what, p.kind, float(p.units), p.unit, r.key,
                                r.seconds_per_unit, float(p.units) * r.seconds_per_unit))
        fixed[r.key] = r.fixed_seconds
    total_fixed = float(sum(fixed.values()))
    wall = float(sum((stages or {}).values())) + sum(p.seconds for p in out) + total_fixed
    return out, total_fixed, wall


# -- calibration ---------------------------------------------------------------------------


class Calibrator:
    """Seconds per padded token of the forward and training passes, measured on a few real
    batches (the longest first, untimed: it warms up and sets the memory peak; then
    ``batches`` spread over the data), and the probes' own measurements; each kind once.

    Args:
        ctx: the run's :class:`~finesift.methods.base.MethodContext`.
        batches: batches timed per kind.
        given: rates that are not measured: seconds per unit by a rate's full key, a
            probe's key, or a kind (``"forward"``, ``"train"``); floats or :class:`Rate`.
    """

    def __init__(self, ctx: Any, batches: int = CALIBRATION_BATCHES,
                 given: Mapping[str, Any] | None = None) -> None:
        self.ctx = ctx
        self.batches = max(1, int(batches))
        self.given = dict(given or {})
        self.rates: dict[str, Rate] = {}
        self.seconds = 0.0

    def key(self, p: Pass) -> str:
        from finesift.engine.precision import resolve

        if p.kind == PROBE:
            return f"{p.probe.key}"
        bs = self.ctx.batch_size if p.batch_size is None else p.batch_size
        prec = resolve(p.precision or self.ctx.precision, self.ctx.device)
        adapter = ("no adapter" if p.adapter is None else "every parameter"
                   if p.adapter == FULL else f"LoRA r={p.adapter.rank}")
        kind = "forward" if p.kind == FORWARD else "forward+backward+step"
        return f"{kind}, {p.data}, batch {bs}, {prec}, {adapter}"

    def __call__(self, p: Pass) -> Rate:
        key = self.key(p)
        if key not in self.rates:
            given = self.given.get(key)
            if given is None and p.probe is not None:
                given = self.given.get(p.probe.key)
            if given is None:
                given = self.given.get(p.kind)
            if given is not None:
                self.rates[key] = (given if isinstance(given, Rate)
                                   else Rate(key, float(given), p.unit, measured=False))
            else:
                t0 = time.perf_counter()
                self.rates[key] = self._measure(p, key)
                self.seconds += time.perf_counter() - t0
        return self.rates[key]

    def _measure(self, p: Pass, key: str) -> Rate:
        if p.kind == PROBE:
            res = p.probe.measure()
            if not isinstance(res, ProbeResult):
                res = ProbeResult(float(res))
            return Rate(key, res.seconds_per_unit, p.unit, res.fixed_seconds, res.detail)
        ctx = self.ctx
        if ctx.model is None:
            raise OptionError(f"--estimate: {p.what!r} needs the model, but none was loaded")
        from finesift.engine.cost import lengths_of, spread

        examples = ctx.pool if p.data == "pool" else ctx.target
        lengths = lengths_of(ctx.task, examples)
        bs = ctx.batch_size if p.batch_size is None else p.batch_size
        rows = bs if isinstance(bs, int) else 8
        precision = p.precision or ctx.precision
        if p.kind == FORWARD:
            from finesift.engine.batching import sorted_batches

            batches = [list(b) for b in sorted_batches(examples, lengths, batch_size=rows,
                                                         max_tokens=4096)]
            warm = batches[0]
            timed_batches = [batches[i] for i in spread(len(batches), self.batches)]
            run = self._forward_runner(examples, bs, precision)
        else:
            rng = np.random.default_rng([ctx.seed, 0xE57])
            perm = [int(i) for i in rng.permutation(len(examples))]
            longest = int(np.argmax(lengths))
            warm = [longest] + [i for i in perm if i != longest][: rows - 1]
            timed_batches = [perm[s : s + rows] for s in range(0, len(perm), rows)][: self.batches]
            run = self._train_runner(examples, rows, precision)
        from finesift.engine.cost import timed, with_adapter

        with with_adapter(ctx.model, ctx.model_task, p.adapter, ctx.seed) as model:
            run(model, warm)
            took = sum(timed(lambda b=b: run(model, b), ctx.device) for b in timed_batches)
        padded = sum(len(b) * int(lengths[b].max()) for b in timed_batches)
        return Rate(key, took / max(1, padded), "token",
                    detail=f"{len(timed_batches)} batch(es), {padded:,} tokens, {took:.2f} s")

    def _forward_runner(self, examples: Sequence[Any], bs: int | str, precision: str):
        from finesift.engine.scoring import token_logprobs

        ctx = self.ctx

        def run(model: Any, idx: list[int]) -> None:
            token_logprobs(model, ctx.task, [examples[i] for i in idx], batch_size=bs,
                           precision=precision, device=ctx.device)

        return run

    def _train_runner(self, examples: Sequence[Any], rows: int, precision: str):
        from finesift.engine.train import TrainOptions, train

        ctx = self.ctx

        def run(model: Any, idx: list[int]) -> None:
            opts = TrainOptions(lr=1e-6, epochs=1.0, batch_size=len(idx), max_steps=1)
            train(model, ctx.task, [examples[i] for i in idx], opts, precision=precision,
                  device=ctx.device)

        return run


# -- the run -----------------------------------------------------------------------------


def estimate(
    pool: Any,
    target: Any,
    *,
    calibration_batches: int = CALIBRATION_BATCHES,
    rates: Mapping[str, Any] | None = None,
    **options: Any,
) -> Estimate:
    """The projected wall time, peak memory and disk of ``finesift.select`` with the same
    arguments, on this machine; writes nothing (``out`` only says where the outputs would
    go, and that the method keeps its work files in ``OUT/.work``).

    Args:
        pool, target: as :func:`finesift.api.select`.
        calibration_batches: batches timed per kind of pass.
        rates: seconds per unit not to measure (tests; see :class:`Calibrator`).
        options: the keywords of :func:`finesift.api.select` (its defaults where not
            given; read from its signature, so the two never drift apart), checked as
            ``select`` checks them.

    Raises:
        OptionError: a bad option (as ``select`` says it), ``method="auto"``, a shard run,
            or a method that declares no cost.
    """
    import inspect

    from finesift.api import chooses_method, select
    from finesift.store.manifest import Stopwatch

    defaults = {name: p.default for name, p in inspect.signature(select).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise OptionError(f"estimate: unknown option(s) {', '.join(unknown)}; select takes "
                          f"{', '.join(defaults)}")
    opts = {**defaults, **options}
    method, num_shards, shard_index = opts["method"], opts["num_shards"], opts["shard_index"]
    executor, model, device, seed = opts["executor"], opts["model"], opts["device"], opts["seed"]

    if chooses_method(method):
        raise OptionError(f"--estimate does not project --method {method} (it runs trials of "
                          "several methods on folds of the target); estimate the candidates "
                          "one by one")
    if shard_index is not None or num_shards != 1:
        raise OptionError("--estimate projects a whole run; drop --num-shards/--shard-index")
    from finesift import pipeline

    watch = Stopwatch()
    with watch.stage("estimate"):
        plan = pipeline.check_options(  # one local, unsharded process
            pool, target, **{**opts, "num_shards": 1, "shard_index": None,
                             "executor": "local", "ray_address": None, "ray_options": None})
        inputs = pipeline.load_inputs(plan)
        pipeline.resolve_weights(plan, inputs)
        loaded = pipeline.load_model(plan, inputs)
        enc = pipeline.encode_inputs(plan, inputs, loaded)
        enc = pipeline.screen_pool(plan, enc)
        stages = {k: float(v["seconds"]) for k, v in plan.watch.stages.items()
                  if k in MEASURED_STAGES}
        ctx = _context(plan, enc.pool.records, enc.pool.examples, enc, loaded)
        cost, main_ctx = _costs(plan, ctx, enc, loaded)
        calibrate = Calibrator(main_ctx, calibration_batches, rates)
        passes, fixed, wall = project(cost, calibrate, stages)
    rss = watch.stages["estimate"]
    from finesift.engine.cost import adapter_size, lengths_of, parameter_bytes

    n_params, n_bytes = parameter_bytes(loaded.model)
    adapters = {repr(p.adapter): p.adapter for p in cost.passes
                if p.adapter is not None and p.adapter != FULL}
    adapter = max((adapter_size(loaded.model, ctx.model_task, a, seed)[0]
                   for a in adapters.values()), default=0)
    measured = float(rss["peak_rss_mb"]) * 2**20
    held = {k: float(v) for k, v in cost.memory.items()}
    disk = _disk(plan, cost, enc) if (plan.out_dir is not None or plan.workdir is not None) \
        else {}
    notes = list(cost.notes)
    if plan.out_dir is None and plan.workdir is None:
        notes.append("no --out or --workdir: nothing is written (no resume)")
    if executor not in ("local", None):
        notes.append("projected for one process: --executor ray shares the pool's passes "
                     "among its workers")
    import torch

    return Estimate(
        method=method, method_options=_changed(plan.meth.options),
        model=_model_label(loaded.info, model),
        device=device, precision=ctx.precision, batch_size=plan.batch_size,
        threads=torch.get_num_threads(),
        n_pool=len(enc.pool.examples), pool_tokens=int(lengths_of(ctx.task, ctx.pool).sum()),
        n_target=len(enc.target.examples),
        target_tokens=int(lengths_of(ctx.task, ctx.target).sum()),
        model_parameters=n_params, model_bytes=n_bytes, adapter_parameters=adapter,
        stages=stages, passes=passes, rates=list(calibrate.rates.values()), fixed_seconds=fixed,
        wall_seconds=wall, measured_peak_bytes=measured, held_bytes=held,
        peak_memory_bytes=measured + sum(held.values()),
        device_peak_bytes=(float(rss["peak_gpu_mb"]) * 2**20 + sum(held.values())
                           if "peak_gpu_mb" in rss else None),
        disk=disk, disk_bytes=float(sum(disk.values())), calibration_seconds=calibrate.seconds,
        notes=notes)


def _changed(options: Any) -> dict[str, Any]:
    """A method's options that differ from their defaults (the run's choices)."""
    import dataclasses

    if not dataclasses.is_dataclass(options):
        return dict(options or {})
    default = type(options)()
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
            if getattr(options, f.name) != getattr(default, f.name)}


def _model_label(info: dict[str, Any], model: Any) -> str | None:
    name = info.get("name") or (model if isinstance(model, (str, Path)) else None)
    return None if name is None else str(name)


def _context(plan: Any, records: list[Any], examples: list[Any], enc: Any, loaded: Any) -> Any:
    """The :class:`MethodContext` :meth:`Method.cost` sees: the run's, with ``records`` /
    ``examples`` as the pool, no work folder, shard or executor."""
    from finesift.engine.precision import compute_precision
    from finesift.engine.tasks import task_for
    from finesift.methods.base import MethodContext
    from finesift.pipeline import model_name, task_name

    return MethodContext(
        pool=examples, target=enc.target.examples, pool_records=records,
        target_records=enc.target.records, task=task_for(plan.task, loaded.tokenizer),
        model=loaded.model, model_task=task_name(plan.task), seed=plan.seed,
        precision=compute_precision(plan.precision, plan.dtype), device=plan.device,
        batch_size=plan.batch_size, progress=False, workdir=None, log=plan.log,
        model_spec={"name": model_name(plan.model), "task": task_name(plan.task),
                    "labels": loaded.labels, "seed": plan.seed, "dtype": plan.dtype},
        new_head=loaded.new_head, dtype=plan.dtype)


def _costs(plan: Any, ctx: Any, enc: Any, loaded: Any) -> tuple[Cost, Any]:
    """The run's cost and the context its method runs in: with ``--prefilter``, the
    prefilter method's cost over the whole pool plus the method's over a seeded random
    subset of the kept size (which examples the prefilter keeps is not known before it
    runs)."""
    if enc.k is not None and plan.meth.uses_budget:
        plan.meth.bind_budget(enc.k)
    spec = getattr(plan, "prefilter", None)
    if spec is None:
        return plan.meth.cost(ctx), ctx
    first = spec.meth.cost(ctx)
    n = len(ctx.pool)
    n_keep = min(n, int(spec.count(n)))
    rng = np.random.default_rng([plan.seed, 0xCA5])
    keep = np.sort(rng.choice(n, size=n_keep, replace=False))
    sub = _context(plan, [ctx.pool_records[i] for i in keep], [ctx.pool[i] for i in keep],
                   enc, loaded)
    second = plan.meth.cost(sub)
    for p in first.passes:
        p.what = f"prefilter {spec.text}: {p.what}"
    return Cost(passes=first.passes + second.passes,
                memory={**{f"prefilter: {k}": v for k, v in first.memory.items()},
                        **second.memory},
                disk={**{f"prefilter: {k}": v for k, v in first.disk.items()}, **second.disk},
                score_columns=first.score_columns + second.score_columns + 2,
                notes=first.notes + second.notes + [
                    (f"--prefilter {spec.text}: the method's passes are projected on "
                    f"{n_keep:,} random pool examples (the kept share)")]), sub


def _disk(plan: Any, cost: Cost, enc: Any) -> dict[str, float]:
    """The method's work files and the run's outputs (scores.parquet, selected.jsonl, its
    exports, manifest.json, config.yaml), in bytes."""
    records = enc.pool.records
    n = len(records)
    disk = {f"work: {k}": float(v) for k, v in cost.disk.items()}
    if plan.out_dir is None:
        return disk
    ids = float(np.mean([len(str(r.id)) for r in records])) if records else 0.0
    disk["scores.parquet"] = n * (48.0 + ids + 8.0 * cost.score_columns)
    raw = float(np.mean([len(json.dumps(r.raw, default=str)) + 1 for r in records])) \
        if records else 0.0
    k = enc.k if enc.k is not None else n
    disk["selected.jsonl"] = k * raw * (1 + len(plan.export or ()))
    disk["manifest.json, config.yaml"] = 16_384.0
    return disk


# -- formatting ----------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 1:
        return "<1 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _count(n: float) -> str:
    for suffix, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


def _units(units: float, unit: str) -> str:
    plural = unit if units == 1 else ("word pieces" if unit == "word piece" else f"{unit}s")
    return f"{units:,.0f} {plural}"


def _rate(seconds: float, unit: str) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s/{unit}"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms/{unit}"
    return f"{seconds * 1e6:.3g} us/{unit}"


__all__ = [
    "CALIBRATION_BATCHES",
    "FORWARD",
    "PROBE",
    "TRAIN",
    "Calibrator",
    "Estimate",
    "PassEstimate",
    "Rate",
    "estimate",
    "project",
]
