"""``uncertainty``: max-uncertainty selection (the ToV paper's baseline).

For a pool example with label tokens t = 1..T and p_t the untouched model's probability
of label token t (one forward pass),

    psi(x) = (1/T) sum_t log[p_t (1 - p_t)],

which peaks at p_t = 1/2 (psi = log 1/4) and falls off both where the model is sure of
the token and where it finds it unlikely. Higher psi = more uncertain = selected first.

``proxy="iprox:RHO"`` (``--proxy``; here and for ``perplexity``) runs the forward pass on an
IProX proxy of the model (:mod:`finesift.models.proxy`; built once, cached as for ``less``)
instead of the model itself.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from tqdm.auto import tqdm

from finesift.engine.scoring import token_logprobs
from finesift.errors import OptionError
from finesift.methods._proxy import check_proxy, proxy_cost, run_proxy
from finesift.methods.base import (
    Method,
    MethodContext,
    MethodResult,
    load_spec_model,
    register,
    run_fingerprint,
    score_chunks,
)
from finesift.models.proxy import parse_proxy, proxy_blob, proxy_from_blob
from finesift.store import chunks
from finesift.store.chunks import (
    ChunkStore,
    chunk_grid,
    pack_ragged,
    shard_chunk_ids,
    unpack_ragged,
)

LOGP_MAX = -1e-8
"""log p is clamped to at most this (p <= 1 - 1e-8), keeping log(1 - p) >= -18.4:
float32 log-softmax rounds probabilities within ~6e-8 of 1 to exactly 1."""


def log1mexp(logp: np.ndarray) -> np.ndarray:
    """log(1 - exp(logp)) for logp < 0, accurate for p near 0 and near 1.

    Uses log(-expm1(logp)) for logp > -log 2 and log1p(-exp(logp)) below (Maechler 2012).
    """
    logp = np.asarray(logp, dtype=np.float64)
    out = np.empty_like(logp)
    near_one = logp > -np.log(2.0)
    out[near_one] = np.log(-np.expm1(logp[near_one]))
    out[~near_one] = np.log1p(-np.exp(logp[~near_one]))
    return out


def uncertainty_scores(logprobs: list[np.ndarray]) -> np.ndarray:
    """psi(x) = mean_t [log p_t + log(1 - p_t)] per example (0 for an example with no
    label tokens; the encoders never produce one)."""
    out = np.zeros(len(logprobs), dtype=np.float64)
    for i, lp in enumerate(logprobs):
        if len(lp):
            lp = np.minimum(np.asarray(lp, dtype=np.float64), LOGP_MAX)
            out[i] = float(np.mean(lp + log1mexp(lp)))
    return out


@dataclass
class UncertaintyOptions:
    """Options of ``uncertainty``.

    Attributes:
        precision: precision of the forward pass: ``run`` (default: the run's
            ``--precision``), ``auto``, ``bf16`` or ``fp32``.
        proxy: ``""`` (default: the model itself) or ``iprox:RHO[,KEY=VALUE...]``: the
            forward pass runs on an IProX proxy of the model (see ``less``'s ``proxy``).
    """

    #: left out of benchmark records while unset (see ``option_identity``)
    unkeyed_defaults: ClassVar[tuple[str, ...]] = ("proxy",)

    precision: str = "run"
    proxy: str = ""

    def validate(self) -> None:
        if self.precision not in ("run", "auto", "bf16", "fp32"):
            raise OptionError(
                f"precision must be 'run', 'auto', 'bf16' or 'fp32', got {self.precision!r}"
            )
        check_proxy(self.proxy, "uncertainty: ")


@dataclass
class LogprobChunkScorer:
    """The chunk scorer of ``perplexity`` and ``uncertainty`` (see
    :class:`finesift.methods.base.ChunkScorer`): the untouched model's label-token
    log-probs of a chunk's examples, packed by :func:`~finesift.store.chunks.pack_ragged`
    (the chunk store's format).

    Attributes:
        model_spec: how a worker loads the model (``MethodContext.model_spec``).
        task: the :class:`~finesift.engine.tasks.Task`.
        batch_size, precision: of the forward pass.
        proxy: an IProX proxy as :func:`~finesift.models.proxy.proxy_blob` gives it (the
            worker rebuilds it on the model it loads), or ``None``.
    """

    model_spec: dict[str, Any]
    task: Any
    batch_size: int | str = 8
    precision: str = "fp32"
    proxy: dict[str, Any] | None = None

    def build(self, device: str = "cpu"):
        model = load_spec_model(self.model_spec, device, who="forward pass")
        if self.proxy is not None:
            model = proxy_from_blob(model, self.proxy)
        return self.bind(model, device)

    def bind(self, model, device: str = "cpu"):
        def score(examples: list[Any]) -> np.ndarray:
            return pack_ragged(token_logprobs(model, self.task, examples,
                                              batch_size=self.batch_size,
                                              precision=self.precision, device=device,
                                              progress=False))

        return score


def forward_logprobs(
    ctx: MethodContext, precision: str, desc: str, *, proxy: str = "",
    info: dict[str, Any] | None = None,
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Label-token log-probs under ``ctx.model`` (one pass): ``(logprobs, rows)``.

    The pool is scored chunk by chunk on the grid of :mod:`finesift.store.chunks`
    (``chunks.DEFAULT_CHUNK`` examples in length order), so a shard run (``ctx.shard``) gives
    exactly the values an unsharded run gives its examples. ``rows`` is ``None`` (every
    pool example, in pool order) or, in a shard run, the shard's sorted pool positions.
    With ``ctx.workdir`` every finished chunk is saved (atomically), so a killed run
    resumes at the first unfinished chunk. With ``ctx.executor`` the chunks are scored by
    its workers (:class:`LogprobChunkScorer`), into the same store.

    ``proxy`` (an ``iprox:RHO`` spec): the pass runs on an IProX proxy of ``ctx.model``
    (built once, see :func:`finesift.methods._proxy.run_proxy`; workers rebuild it), its
    figures go into ``info``, and its chunks into a store of their own.
    """
    spec = parse_proxy(proxy)
    if ctx.model is None and (ctx.executor is None or spec is not None):  # a proxy needs it
        raise OptionError(f"{desc} needs the model, but none was loaded")
    prec = ctx.precision if precision == "run" else precision
    model, blob = ctx.model, None
    if spec is not None:
        model, proxy_info = run_proxy(ctx, spec)  # a new model; ctx.model is left as it was
        if info is not None:
            info.update(proxy_info)
        if ctx.executor is not None:
            blob = proxy_blob(model)
    store = ChunkStore(None)
    if ctx.workdir is not None:
        tag = f"logprobs-v1-{prec}-{ctx.batch_size}"
        if spec is not None:  # unchanged without a proxy: existing stores stay valid
            tag += "-iprox-" + json.dumps(asdict(spec), sort_keys=True)
        key = run_fingerprint(tag, _NoOptions(), ctx)
        store = ChunkStore(Path(ctx.workdir) / f"logprobs-{key}")
    lengths = np.array([ctx.task.length(e) for e in ctx.pool], dtype=np.int64)
    grid = chunk_grid(lengths, chunks.DEFAULT_CHUNK)
    ids = shard_chunk_ids(len(grid), ctx.shard)
    scored = np.concatenate([grid[c] for c in ids]) if ids else np.zeros(0, dtype=np.int64)
    out: list[np.ndarray | None] = [None] * len(ctx.pool)
    bar = tqdm(total=len(scored), desc=desc, disable=not ctx.progress, leave=False, unit="ex")

    def done(c: int, lps: list[np.ndarray]) -> None:
        for i, lp in zip(grid[c], lps, strict=True):
            out[i] = lp
        bar.update(len(grid[c]))

    try:
        todo = []
        for c in ids:
            saved = store.load(c, None)
            lps = unpack_ragged(saved, len(grid[c])) if saved is not None else None
            if lps is None:
                todo.append(c)
            else:
                done(c, lps)
        scorer = LogprobChunkScorer(dict(ctx.model_spec or {}), ctx.task, ctx.batch_size, prec,
                                    blob)
        for c, packed in score_chunks(ctx, scorer, todo,
                                      lambda c: [ctx.pool[i] for i in grid[c]], model=model):
            packed = np.asarray(packed, dtype=np.float32)
            lps = unpack_ragged(packed, len(grid[c]))
            if lps is None:
                raise RuntimeError(f"{desc}: chunk {c} came back malformed")
            store.save(c, packed)
            done(c, lps)
    finally:
        bar.close()
    if ctx.shard is None:
        return out, None  # type: ignore[return-value]
    rows = np.sort(scored).astype(np.int64)
    return [out[i] for i in rows], rows  # type: ignore[misc]


def forward_cost(ctx: MethodContext, precision: str, desc: str, proxy: str = "") -> Any:
    """The cost of :func:`forward_logprobs`: one forward pass of the untouched model over
    the pool (length-sorted batches of the run's batch size) at ``precision`` (``run``:
    the run's); its chunk store holds every label token's log-prob (float32). With
    ``proxy``, the IProX build comes first (:func:`finesift.methods._proxy.proxy_cost`,
    its training passes calibrated with a default LoRA adapter) and the forward pass,
    on the proxy, is timed on the full model (an upper bound)."""
    from finesift.engine.cost import Cost, Pass, lengths_of, sorted_tokens
    from finesift.engine.train import LoraOptions

    prec = ctx.precision if precision == "run" else precision
    tokens = sorted_tokens(lengths_of(ctx.task, ctx.pool), ctx.batch_size)
    labels = sum(int(e.n_label_tokens) + 1 for e in ctx.pool)
    n_chunks = -(-len(ctx.pool) // chunks.DEFAULT_CHUNK)
    cost = Cost(score_columns=1)
    spec = parse_proxy(proxy)
    if spec is not None:
        proxy_cost(ctx, spec, LoraOptions(), cost)
    cost.passes.append(Pass(f"{desc}: one forward pass over the pool", tokens, precision=prec))
    cost.disk["label-token log-probs (chunk store)"] = 4 * labels + 128 * n_chunks
    return cost


@dataclass
class _NoOptions:
    """The forward pass has no options of its own (the fingerprint tag names them)."""


@register
class Uncertainty(Method):
    name = "uncertainty"
    description = "max-uncertainty: mean over label tokens of log[p(1-p)] under the model"
    needs_model = True
    Options = UncertaintyOptions
    shardable = True  # psi(x) depends on x and the untouched model only
    chunk_scorer = LogprobChunkScorer  # workers run the forward pass over pool chunks
    cli_flags: ClassVar[dict[str, str]] = {"proxy": "proxy"}  # --proxy iprox:RHO

    def cost(self, ctx: MethodContext) -> Any:
        """One forward pass of the untouched model (or its proxy) over the pool."""
        self.options.validate()
        return forward_cost(ctx, self.options.precision, self.name, self.options.proxy)

    def score(self, ctx: MethodContext) -> MethodResult:
        self.options.validate()
        info: dict[str, Any] = {}
        logprobs, rows = forward_logprobs(ctx, self.options.precision, self.name,
                                          proxy=self.options.proxy, info=info)
        psi = uncertainty_scores(logprobs)
        loss = np.array([-float(np.mean(lp)) if len(lp) else 0.0 for lp in logprobs])
        return MethodResult(scores=psi, columns={"loss": loss}, rows=rows, info=info)
