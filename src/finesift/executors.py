"""Where a method's chunks are scored: in this process (``local``) or on Ray workers.

An executor takes a *chunk scorer* (:class:`finesift.methods.base.ChunkScorer`: a
picklable object whose ``build(device)`` loads what a worker needs and returns a function
``score(payload) -> array``; a method opts in to executors by declaring its scorer class as
``Method.chunk_scorer``) and an iterable of ``(chunk id, payload)`` (the chunk's examples,
texts, ...), and yields ``(chunk id, result)`` as chunks finish, in any order. The method
(through :func:`finesift.methods.base.score_chunks`) saves each result in its chunk store
as it arrives, so a killed distributed run resumes like a local one. Methods with a chunk
scorer: ``tov``, ``less``, ``tracin``, ``embed``, ``perplexity``, ``uncertainty``.

``ray``: the coordinator (this process) puts the scorer in Ray's object store once; one
Ray actor per worker takes it, loads the model once (a built-in model name, or a model
folder every node can read at the same path) and scores the chunks it is sent, at most
two at a time per worker. With no address, a local Ray instance is started with
``num_cpus`` CPUs and shut down at the end; with an address (``ray start --head`` prints
it; ``auto`` finds a local one) the run joins that cluster.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from finesift.errors import FinesiftError, OptionError

EXECUTORS = ("local", "ray")


class LocalExecutor:
    """Chunks scored one after the other in this process by a scorer built as a worker
    builds it (the model loaded again from its name or folder). Methods score with the
    model already in memory when ``ctx.executor`` is ``None`` (the default); this class
    runs the worker path without Ray.

    Args:
        device: torch device of the scorer (default ``cpu``).
    """

    name = "local"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def map_chunks(self, scorer: Any, items: Iterable[tuple[int, Any]]
                   ) -> Iterator[tuple[int, np.ndarray]]:
        fn = scorer.build(self.device)
        for cid, payload in items:
            yield cid, fn(payload)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

    def close(self) -> None:
        pass


class _ChunkWorker:
    """A Ray actor: builds the scorer once, then scores the chunks it is sent."""

    def __init__(self, scorer: Any, device: str, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, int(threads)))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.score = scorer.build(device)

    def run(self, payload: Any) -> np.ndarray:
        return self.score(payload)

    def where(self) -> dict[str, Any]:
        import socket

        return {"host": socket.gethostname(), "pid": os.getpid(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


class RayExecutor:
    """Score chunks on Ray actors (one per worker).

    Args:
        address: a running cluster's address (``ray start --head`` prints it, or
            ``auto``); ``None`` (default) starts a local Ray instance for this run.
        num_cpus: CPUs of the local instance (default: all of this machine's); ignored
            with an address.
        workers: number of actors (default: as many as the cluster's resources allow:
            its GPUs / ``gpus_per_worker``, or its CPUs / ``cpus_per_worker``).
        cpus_per_worker: CPUs each actor reserves and torch threads it uses (default 1).
        gpus_per_worker: GPUs each actor reserves (default 0). With 1, Ray gives every
            actor its own GPU (it sets ``CUDA_VISIBLE_DEVICES``) and the actor scores on
            ``cuda``; with 0 it scores on ``device``.
        device: torch device of CPU-only actors (default ``cpu``).
        max_in_flight: chunks queued per actor at a time (default 2).
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: int | None = None,
        workers: int | None = None,
        cpus_per_worker: float = 1,
        gpus_per_worker: float = 0,
        device: str = "cpu",
        max_in_flight: int = 2,
    ) -> None:
        for label, v in (("--ray-num-cpus", num_cpus), ("--ray-workers", workers)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise OptionError(f"{label} must be a positive integer, got {v!r}")
        if not cpus_per_worker > 0 or gpus_per_worker < 0 or max_in_flight < 1:
            raise OptionError("ray: cpus per worker must be > 0, gpus per worker >= 0")
        self.address = address
        self.num_cpus = num_cpus
        self.workers = workers
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        self.device = "cuda" if gpus_per_worker > 0 else device
        self.max_in_flight = max_in_flight
        self._started = False
        self._n_workers: int | None = None
        self._nodes: list[dict[str, Any]] = []

    # -- cluster -------------------------------------------------------------------
    def _ray(self):
        try:
            import ray
        except ImportError:
            raise OptionError(
                "--executor ray needs the ray package: pip install 'finesift[ray]'"
            ) from None
        if not ray.is_initialized():
            import logging

            kw: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False,
                                  "include_dashboard": False}
            if self.address:
                ray.init(address=self.address, **kw)
            else:
                ray.init(num_cpus=self.num_cpus or os.cpu_count() or 1, **kw)
                self._started = True
        return ray

    def n_workers(self) -> int:
        """The number of actors this executor starts."""
        if self.workers is not None:
            return self.workers
        res = self._ray().cluster_resources()
        if self.gpus_per_worker > 0:
            n = math.floor(res.get("GPU", 0) / self.gpus_per_worker)
            if n < 1:
                raise OptionError(
                    f"ray: the cluster has {res.get('GPU', 0):g} GPU(s), fewer than "
                    f"--ray-gpus-per-worker {self.gpus_per_worker:g}"
                )
            return n
        return max(1, math.floor(res.get("CPU", 1) / self.cpus_per_worker))

    def _check_fits(self, n: int) -> None:
        """Refuse a request the cluster can never satisfy (Ray would wait forever)."""
        res = self._ray().cluster_resources()
        for kind, per in (("CPU", self.cpus_per_worker), ("GPU", self.gpus_per_worker)):
            if per > 0 and n * per > res.get(kind, 0) + 1e-9:
                raise OptionError(
                    f"ray: {n} worker(s) x {per:g} {kind} need {n * per:g} {kind}s; the "
                    f"cluster has {res.get(kind, 0):g} (lower --ray-workers or the per-worker "
                    f"{kind} count)"
                )

    # -- work ----------------------------------------------------------------------
    def map_chunks(self, scorer: Any, items: Iterable[tuple[int, Any]]
                   ) -> Iterator[tuple[int, np.ndarray]]:
        """Score every chunk of ``items`` on the actors; yields results as they finish."""
        it = iter(items)
        first = next(it, None)
        if first is None:  # nothing to score: no actors
            return
        it = itertools.chain([first], it)
        ray = self._ray()
        n = self.n_workers()
        self._check_fits(n)
        self._n_workers = n
        worker_cls = ray.remote(num_cpus=self.cpus_per_worker,
                                num_gpus=self.gpus_per_worker)(_ChunkWorker)
        scorer_ref = ray.put(scorer)  # once in the object store, fetched by every actor
        threads = max(1, math.floor(self.cpus_per_worker))
        actors = [worker_cls.remote(scorer_ref, self.device, threads) for _ in range(n)]
        try:
            try:
                self._nodes = ray.get([a.where.remote() for a in actors])
            except ray.exceptions.RayError as exc:
                raise FinesiftError(f"a Ray worker could not start: {_cause(exc)}") from None
            load = dict.fromkeys(range(n), 0)
            pending: dict[Any, tuple[int, int]] = {}  # ref -> (chunk id, actor)
            exhausted = False
            while True:
                while not exhausted and min(load.values()) < self.max_in_flight:
                    nxt = next(it, None)
                    if nxt is None:
                        exhausted = True
                        break
                    a = min(load, key=load.get)
                    cid, payload = nxt
                    pending[actors[a].run.remote(payload)] = (cid, a)
                    load[a] += 1
                if not pending:
                    break
                ready, _ = ray.wait(list(pending), num_returns=1)
                cid, a = pending.pop(ready[0])
                load[a] -= 1
                try:
                    result = ray.get(ready[0])
                except ray.exceptions.RayError as exc:
                    raise FinesiftError(f"a Ray worker failed on chunk {cid}: {_cause(exc)}"
                                        ) from None
                yield cid, result
        finally:
            for a in actors:
                ray.kill(a)
            del scorer_ref

    def describe(self) -> dict[str, Any]:
        """Figures for the manifest."""
        return {
            "name": self.name,
            "address": self.address or "local instance",
            "workers": self._n_workers,
            "cpus_per_worker": self.cpus_per_worker,
            "gpus_per_worker": self.gpus_per_worker,
            "device": self.device,
            "nodes": sorted({w["host"] for w in self._nodes}),
        }

    def close(self) -> None:
        """Shut down the local Ray instance this executor started (if any)."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


def _cause(exc: BaseException) -> str:
    """The worker-side error of a Ray exception, in one line."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


def make_executor(
    name: str = "local",
    *,
    ray_address: str | None = None,
    ray_num_cpus: int | None = None,
    ray_workers: int | None = None,
    ray_cpus_per_worker: float = 1,
    ray_gpus_per_worker: float = 0,
    device: str = "cpu",
) -> LocalExecutor | RayExecutor | None:
    """The executor called ``name`` (``local`` gives ``None``: methods score in-process)."""
    if name == "local":
        if ray_address is not None:
            raise OptionError("--ray-address needs --executor ray")
        return None
    if name == "ray":
        return RayExecutor(ray_address, num_cpus=ray_num_cpus, workers=ray_workers,
                           cpus_per_worker=ray_cpus_per_worker,
                           gpus_per_worker=ray_gpus_per_worker, device=device)
    raise OptionError(f"unknown executor {name!r}; choose from {', '.join(EXECUTORS)}")
