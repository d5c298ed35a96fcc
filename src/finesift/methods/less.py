"""``less`` (Xia et al., LESS, arXiv 2402.04333) and ``tracin`` (TracIn-CP).

Both share one pipeline:

1. Warm-up: a LoRA adapter is trained with AdamW on a random ``warmup_fraction`` of the
   pool for ``warmup_epochs`` epochs; after each epoch k the adapter, the Adam moments
   (exp_avg, exp_avg_sq, step) and the epoch's learning rate eta_k are kept.
2. At each checkpoint, the gradient of every example's token-averaged label loss with
   respect to the LoRA parameters, exactly and batched (see ``_gradients``).
   ``less``: pool gradients become the Adam update direction computed from the
   checkpoint's moments as if the example's gradient were the next step's
   (``adam_formula``: LESS's released code, m / sqrt(v + eps), by default; or the
   bias-corrected m_hat / (sqrt(v_hat) + eps) of the Adam update as written); target
   gradients stay plain (as in LESS, whose target gradients are SGD gradients).
   ``tracin``: plain gradients for both.
3. A seeded random projection to ``proj_dim`` dimensions (Rademacher or Gaussian,
   generated block by block so memory stays bounded); ``less`` then unit-normalises.
4. ``less``: score(x) = max over target subtasks s of
   mean_{z in s} sum_k eta_k cos(Proj g_k(x), Proj g_k(z)) (one subtask unless target
   records carry ``meta["subtask"]``). ``tracin``: the same with plain dot products of
   the projected gradients, no normalisation (TracIn-CP).

The default Adam direction is the LESS code's, whose results the paper reports: it
omits bias correction and puts eps inside the square root, so with eps = 1e-8 every
coordinate whose second moment is below 1e-8 (on SmolLM2's LoRA, about 99% of them) is
divided by about 1e-4 rather than by its own scale. ``adam_formula=paper`` gives the
bias-corrected update instead; the two rank pool examples differently (Spearman about
0.95 on the demo), and the benchmark suites measure both.

With ``proxy="iprox:RHO"`` everything above runs on an IProX proxy of the model
(:mod:`finesift.models.proxy`, built before the LoRA adapter is added, which then sits on
one factor of each factored layer; cached in finesift's cache, or the work folder where
that is not writable, and reused by any run with the same model, proxy options and probe
examples), and the proxy's parameter counts and stage timings join the manifest.

The pool is cut into chunks of ``chunk_size`` examples on the length-sorted grid of
:mod:`finesift.store.chunks` (tight batches; a chunk's features are the same whichever
run computes them), so ``--num-shards N --shard-index I`` scores only shard I's chunks:
each shard run trains the same warm-up adapter (or loads it from a shared work folder)
and computes the target's features itself, and ``finesift merge`` gives the scores of an
unsharded run. With a work folder, the warm-up checkpoints and every gradient feature are
kept on disk (one atomic file per checkpoint and pool chunk; the target's features as a
memory-mapped ``.npy`` per checkpoint, each chunk marked done once flushed), so a killed
run resumes from the last finished chunk.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from finesift.config import LoraFields
from finesift.engine.projection import PROJECTIONS, Projector
from finesift.engine.train import (
    LoraOptions,
    TrainOptions,
    add_lora,
    load_trainable_state,
    make_optimizer,
    train,
    trainable_state,
)
from finesift.errors import OptionError, check_choice
from finesift.methods import _gradients as G
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
from finesift.store.chunks import ChunkStore, chunk_grid, grid_rows, shard_chunk_ids
from finesift.store.files import atomic_save_npy, atomic_save_torch

_STATE_VERSION = 2  # 2: pool features per chunk of the length-sorted grid


@dataclass
class GradInfluenceOptions(LoraFields):
    """Options of ``less`` and ``tracin``.

    The LoRA adapter's ``lora_rank``, ``lora_alpha`` and ``lora_dropout`` are declared once,
    in :class:`finesift.config.LoraFields` (defaults 16, 32, 0.05).

    Attributes:
        warmup_fraction: share of the pool the warm-up adapter is trained on (random).
        min_warmup: at least this many warm-up examples (capped at the pool size).
        warmup_epochs: N, warm-up epochs; one checkpoint after each.
        lr: warm-up learning rate (AdamW).
        lr_schedule: ``linear`` (default; eta_k = lr * (N - k) / N for epoch k = 0..N-1,
            a per-epoch version of LESS's linear decay) or ``constant``.
        batch_size: warm-up training batch size.
        weight_decay: AdamW weight decay.
        proj_dim: d, the projected gradient dimension (default 8192).
        projection: ``rademacher`` (default) or ``gaussian`` (dense, as in LESS), or
            ``sparse``: a block sparse JL transform with ``sparsity`` nonzeros per input
            coordinate, far cheaper on CPU (see ``engine.projection.Projector``).
        sparsity: nonzeros per input coordinate of the ``sparse`` projection (default 8).
        chunk_size: examples whose gradients are projected together (and stored as one
            resumable chunk); the projection blocks are generated once per chunk.
        proxy: ``""`` (default: the model itself) or ``iprox:RHO[,KEY=VALUE...]``: run on
            an IProX influence-preserving proxy of the model with compression ratio RHO
            (see :mod:`finesift.models.proxy`; KEY is an :class:`IProxOptions` field,
            e.g. ``iprox:0.5,align_epochs=1``, ``iprox:0.5,svd=exact`` for the exact
            rather than randomized SVD in IPSVD, ``svd_niter=4``, ``probe_examples=32``).
            The LoRA adapter then goes on one factor of each factored layer (the smaller
            adapter) and on the layers kept full: one adapted linear per adapted linear of
            the model, fewer LoRA parameters. The built proxy is cached (finesift's cache,
            else the work folder) and loaded by later runs with the same inputs.
        adam_formula: ``less`` only: the Adam preconditioning of pool gradients,
            ``reference`` (default; LESS's released code: m / sqrt(v + eps), no bias
            correction) or ``paper`` (the bias-corrected Adam update,
            m_hat / (sqrt(v_hat) + eps)).
    """

    warmup_fraction: float = 0.05
    min_warmup: int = 8
    warmup_epochs: int = 4
    lr: float = 2e-4
    lr_schedule: str = "linear"
    batch_size: int = 8
    weight_decay: float = 0.0
    proj_dim: int = 8192
    projection: str = "rademacher"
    sparsity: int = 8
    chunk_size: int = 32
    proxy: str = ""
    adam_formula: str = "reference"

    def validate(self) -> None:
        check_choice(self.adam_formula, G.ADAM_FORMULAS, "adam_formula")
        if not 0 < self.warmup_fraction <= 1:
            raise OptionError("warmup_fraction must be in (0, 1]")
        check_choice(self.projection, PROJECTIONS, "projection")
        if self.projection == "sparse" and (self.sparsity < 1 or self.proj_dim % self.sparsity):
            raise OptionError(f"projection sparse: proj_dim ({self.proj_dim}) must be a "
                              f"multiple of sparsity ({self.sparsity})")
        if self.lr_schedule not in ("linear", "constant"):
            raise OptionError("lr_schedule must be 'linear' or 'constant'")
        if min(self.warmup_epochs, self.proj_dim, self.batch_size, self.chunk_size,
               self.min_warmup, self.lora_rank) < 1:
            raise OptionError(
                "warmup_epochs, proj_dim, batch_size, chunk_size, min_warmup and lora_rank "
                "must be >= 1"
            )
        if not self.lr > 0:
            raise OptionError("lr must be > 0")
        check_proxy(self.proxy)


@dataclass
class Checkpoint:
    """A warm-up checkpoint: adapter, Adam state per trainable parameter, eta_k."""

    state: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: dict[str, int]
    lr: float
    betas: tuple[float, float]
    eps: float


def aggregate(sim: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Max over target groups of the per-group mean of ``sim`` (n_pool, n_target)."""
    out = None
    for gval in np.unique(groups):
        m = sim[:, groups == gval].mean(axis=1)
        out = m if out is None else np.maximum(out, m)
    return out


def subtask_groups(ctx: MethodContext) -> np.ndarray:
    """The subtask of each target example (all one group without ``meta["subtask"]``)."""
    if len(ctx.target_records) != len(ctx.target):
        return np.zeros(len(ctx.target), dtype=np.int64)
    names = [str((r.meta or {}).get("subtask", "")) for r in ctx.target_records]
    _, inv = np.unique(np.array(names, dtype=object).astype(str), return_inverse=True)
    return inv.astype(np.int64)


def grad_features(model, task, params, ckpt: Checkpoint, examples, *, adam: bool,
                  normalize: bool, adam_formula: str, projector: Projector,
                  batch_size: int | str, device: str = "cpu",
                  timing: dict[str, float] | None = None) -> np.ndarray:
    """Projected gradient features of ``examples`` at the checkpoint whose state ``model``
    holds, (n, d) float32, computed together (one chunk): per-example LoRA gradients,
    Adam-preconditioned by ``ckpt``'s moments when ``adam``, projected, unit-normalised
    when ``normalize``. ``timing`` (if given) accumulates the seconds of the gradients and
    of the projection."""
    names = [name for name, _, _ in params]
    t_grad = time.perf_counter()
    flat, _ = G.batched_grads(model, task, examples, params, batch_size=batch_size,
                              device=device)
    if adam:
        off = 0
        for name in names:  # in place, one parameter at a time
            size = ckpt.exp_avg[name].numel()
            flat[:, off : off + size] = G.adam_direction(
                flat[:, off : off + size], ckpt.exp_avg[name].reshape(1, -1).float(),
                ckpt.exp_avg_sq[name].reshape(1, -1).float(), ckpt.step[name],
                ckpt.betas, ckpt.eps, formula=adam_formula)
            off += size
    t_proj = time.perf_counter()
    proj = _project_chunk(projector, flat)
    if timing is not None:
        timing["seconds_per_example_grads"] += t_proj - t_grad
        timing["seconds_projection"] += time.perf_counter() - t_proj
    if normalize:
        proj = proj / proj.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return G.as_numpy(proj).astype(np.float32, copy=False)


@dataclass
class GradChunkScorer:
    """The chunk scorer of ``less`` and ``tracin`` (see
    :class:`finesift.methods.base.ChunkScorer`): a chunk's payload ``(examples, ks)`` ->
    the pool features of those examples at the warm-up checkpoints ``ks``, shape
    (len(ks), n, d) float32 (what the coordinator's chunk stores hold).

    Attributes:
        model_spec: how a worker loads the model (``MethodContext.model_spec``).
        model_task: ``lm`` or ``ner`` (for the adapter).
        proxy: an IProX proxy as ``{"ranks": {layer: r}, "factors": {name: tensor}}``
            (the worker factorises the model and copies the trained factors in), or
            ``None``.
        lora, seed: the warm-up adapter's settings and seed.
        task: the :class:`~finesift.engine.tasks.Task`.
        checkpoints: the warm-up checkpoints (on the CPU).
        proj_dim, projection, proj_seed, sparsity: the projection.
        adam, normalize, adam_formula: ``less`` (Adam direction, unit norm) or ``tracin``.
        batch_size: rows per gradient batch.
        timing: seconds of gradients and projection, accumulated in this process.
        projector: the run's projector, reused in this process (its cached blocks are
            never shipped: a worker generates its own, the same, from the seed).
    """

    model_spec: dict[str, Any]
    model_task: str
    proxy: dict[str, Any] | None
    lora: LoraOptions
    seed: int
    task: Any
    checkpoints: list[Checkpoint]
    proj_dim: int
    projection: str
    proj_seed: int
    sparsity: int
    adam: bool
    normalize: bool
    adam_formula: str
    batch_size: int | str = 8
    timing: dict[str, float] | None = None
    projector: Projector | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "projector": None}

    def build(self, device: str = "cpu"):
        base = load_spec_model(self.model_spec, device, who="less/tracin")
        if self.proxy is not None:
            base = proxy_from_blob(base, self.proxy)
        return self.bind(add_lora(base, self.model_task, self.lora, seed=self.seed).to(device),
                         device)

    def bind(self, model, device: str = "cpu"):
        """``score((examples, ks))`` with ``model`` (carrying the warm-up adapter)."""
        params = G.trainable_linear_params(model)
        n_in = sum(getattr(m, a).numel() for _, m, a in params)
        projector = self.projector
        if projector is None or projector.n_in != n_in:
            projector = Projector(n_in, self.proj_dim, self.projection, seed=self.proj_seed,
                                  sparsity=self.sparsity)

        def score(payload: tuple[list[Any], list[int]]) -> np.ndarray:
            examples, ks = payload
            out = np.empty((len(ks), len(examples), self.proj_dim), dtype=np.float32)
            for j, k in enumerate(ks):
                ck = self.checkpoints[k]
                load_trainable_state(model, ck.state)
                out[j] = grad_features(model, self.task, params, ck, examples, adam=self.adam,
                                       normalize=self.normalize,
                                       adam_formula=self.adam_formula, projector=projector,
                                       batch_size=self.batch_size, device=device,
                                       timing=self.timing)
            return out

        return score


def _cpu_checkpoint(c: Checkpoint) -> Checkpoint:
    def cpu(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in d.items()}

    return Checkpoint(state=cpu(c.state), exp_avg=cpu(c.exp_avg), exp_avg_sq=cpu(c.exp_avg_sq),
                      step=dict(c.step), lr=c.lr, betas=tuple(c.betas), eps=c.eps)


class _GradInfluence(Method):
    Options = GradInfluenceOptions
    needs_model = True
    # the score of x depends on x, the warm-up checkpoints (trained on a seeded subset of
    # the whole pool, the same in every shard run) and the target only
    shardable = True
    # the coordinator warms up and computes the target's features; workers compute the
    # pool's features chunk by chunk
    chunk_scorer = GradChunkScorer
    cli_flags: ClassVar[dict[str, str]] = {"proxy": "proxy"}  # --proxy iprox:RHO
    # a LoRA warm-up and per-example gradients (taken in fp32 from bf16 activations, as
    # LESS's released code ran in bf16; fp16 gradients would underflow)
    trains = True
    adam: bool
    normalize: bool

    # -- cost ----------------------------------------------------------------------
    def cost(self, ctx: MethodContext):
        """The passes of :meth:`score`:

        * (``proxy``: the IProX build, see :func:`finesift.methods._proxy.proxy_cost`);
        * warm-up: ``warmup_epochs`` epochs of LoRA training on the warm-up set
          (``warmup_fraction`` of the pool, at least ``min_warmup``), ``batch_size`` random
          rows per step;
        * per checkpoint (one per warm-up epoch): per-example LoRA gradients of every
          target and pool example (a forward and a backward pass over length-sorted
          batches of the run's batch size within each chunk; timed on real pool batches)
          and their projection to ``proj_dim`` (timed on a few blocks of the projection
          and scaled to the adapter's size: the generation of dense blocks per chunk, the
          multiplication per example).

        Held: one chunk's flat gradients (``chunk_size`` x adapter parameters, fp32), the
        projection when it is cached, the target features and the similarity matrix
        (checkpoints x pool x target). Written: the warm-up checkpoints (adapter and two
        Adam moments each) and every feature (checkpoints x examples x ``proj_dim`` x 4
        bytes).
        """
        from finesift.engine.cost import (
            Cost,
            Pass,
            Probe,
            ProbeResult,
            adapter_size,
            lengths_of,
            shuffled_tokens,
            sorted_tokens,
            spread,
            timed,
            with_adapter,
        )

        o = self.options
        o.validate()
        lora = o.lora()
        K, d = o.warmup_epochs, o.proj_dim
        pool_len, target_len = lengths_of(ctx.task, ctx.pool), lengths_of(ctx.task, ctx.target)
        n, m = len(ctx.pool), len(ctx.target)
        cost = Cost(score_columns=K)
        spec = parse_proxy(o.proxy)
        if spec is not None:
            proxy_cost(ctx, spec, lora, cost)
        warm = self.warmup_indices(ctx)
        tokens = sum(shuffled_tokens(pool_len[warm], o.batch_size, 1.0, seed=ctx.seed * 1000 + k)
                     for k in range(K))
        cost.passes.append(Pass(f"{self.name}: warm-up, {K} epoch(s) on {len(warm)} pool examples",
                                tokens, kind="train", batch_size=o.batch_size, adapter=lora))
        grid = chunk_grid(pool_len, o.chunk_size)
        target_chunks = [np.arange(s0, min(m, s0 + o.chunk_size)) for s0 in range(0, m, o.chunk_size)]
        g_pool = sum(sorted_tokens(pool_len[c], ctx.batch_size) for c in grid)
        g_target = sum(sorted_tokens(target_len[c], ctx.batch_size) for c in target_chunks)
        P, p_bytes = adapter_size(ctx.model, ctx.model_task, lora, ctx.seed)
        rows = ctx.batch_size if isinstance(ctx.batch_size, int) else 8

        def measure_grads() -> ProbeResult:
            order = np.argsort(-pool_len, kind="stable")
            starts = spread(max(1, n - rows + 1), 2)
            batches = [[int(i) for i in order[s0 : s0 + rows]] for s0 in starts]
            with with_adapter(ctx.model, ctx.model_task, lora, ctx.seed) as model:
                params = G.trainable_linear_params(model)

                def grads(idx: list[int]) -> None:
                    G.batched_grads(model, ctx.task, [ctx.pool[i] for i in idx], params,
                                    batch_size=rows, device=ctx.device)

                grads([int(i) for i in order[:rows]])  # the longest batch: warm-up, peak memory
                took = sum(timed(lambda b=b: grads(b), ctx.device) for b in batches)
            padded = sum(len(b) * int(pool_len[b].max()) for b in batches)
            return ProbeResult(took / max(1, padded),
                               detail=f"{len(batches)} batches, {padded:,} tokens, {took:.1f} s")

        projection: dict[str, ProbeResult] = {}

        def measure_projection() -> None:
            if projection:
                return
            import torch

            full = Projector(P, d, o.projection, seed=ctx.seed, sparsity=o.sparsity)
            blocks = min(full.n_blocks, 3)
            small = Projector(min(P, full.rows * blocks), d, o.projection, seed=ctx.seed,
                              sparsity=o.sparsity)
            c = max(1, min(o.chunk_size, n))
            x = torch.randn(c, small.n_in)
            first = timed(lambda: small(x))  # generates (and caches) the blocks, multiplies
            again = timed(lambda: small(x))  # multiplies only
            scale = P / max(1, small.n_in)
            generate = max(0.0, first - again) * scale
            detail = (f"{blocks} of {full.n_blocks} blocks x {c} rows: {first:.2f} s, then "
                      f"{again:.2f} s cached")
            cached = full.cache is not None  # then generated once: a fixed cost
            projection["generate"] = ProbeResult(generate, detail=detail)
            projection["multiply"] = ProbeResult(again * scale / c,
                                                 fixed_seconds=generate if cached else 0.0,
                                                 detail=detail)

        def part(name: str):
            def measure() -> ProbeResult:
                measure_projection()
                return projection[name]
            return measure

        key = f"{o.projection} projection to {d} of {P:,} inputs, chunks of {o.chunk_size}"
        n_chunks = len(grid) + len(target_chunks)
        cost.passes.append(Pass(
            f"{self.name}: per-example gradients, {K} checkpoint(s) x {m} target + {n} pool "
            "examples", K * (g_pool + g_target), kind="probe",
            probe=Probe(f"per-example LoRA gradients (r={lora.rank}), batch {rows}, "
                        f"{ctx.device}", measure_grads, "token")))
        probe_full = Projector(max(P, 1), d, o.projection, seed=ctx.seed, sparsity=o.sparsity)
        if probe_full.cache is None:  # dense blocks are generated again for every chunk
            cost.passes.append(Pass(
                f"{self.name}: projection blocks ({o.projection}), {K} checkpoint(s) x "
                f"{n_chunks} chunk(s)", K * n_chunks, kind="probe",
                probe=Probe(f"{key}: generating the blocks", part("generate"), "chunk")))
        cost.passes.append(Pass(
            f"{self.name}: projection to {d} dimensions, {K} checkpoint(s) x {n + m} examples",
            K * (n + m), kind="probe",
            probe=Probe(f"{key}" + ("" if probe_full.cache is None else
                                    " (blocks generated once, cached)"),
                        part("multiply"), "example")))
        chunk = min(o.chunk_size, max(n, m, 1))
        if probe_full.cache is not None:
            entries = P * (o.sparsity if o.projection == "sparse" else d)
            cost.memory["projection (cached)"] = entries * (12 if o.projection == "sparse" else 4)
        cost.memory.update({
            f"flat gradients of one chunk ({chunk} x {P:,})": 4.0 * chunk * P,
            "target features": 12.0 * K * m * d,
            "similarities (checkpoints x pool x target)": 8.0 * K * n * m,
        })
        cost.disk.update({
            f"warm-up checkpoints ({K} x adapter + Adam moments)": 3.0 * K * p_bytes,
            "pool features": 4.0 * K * n * d + 128 * K * len(grid),
            "target features": 4.0 * K * m * d,
        })
        return cost

    # -- fingerprint / paths -------------------------------------------------------
    def _fingerprint(self, ctx: MethodContext) -> str:
        return run_fingerprint(f"{self.name}-v{_STATE_VERSION}", self.options, ctx)

    # -- warm-up -------------------------------------------------------------------
    def warmup_indices(self, ctx: MethodContext) -> np.ndarray:
        o = self.options
        n = len(ctx.pool)
        size = min(n, max(o.min_warmup, round(o.warmup_fraction * n)))
        rng = np.random.default_rng([ctx.seed, 0x1E55])
        return np.sort(rng.choice(n, size=size, replace=False))

    def epoch_lrs(self) -> list[float]:
        """eta_k, the learning rate of epoch k: ``lr`` (constant) or lr * (N - k) / N
        (linear decay, piecewise constant per epoch)."""
        o = self.options
        N = o.warmup_epochs
        if o.lr_schedule == "constant":
            return [o.lr] * N
        return [o.lr * (N - k) / N for k in range(N)]

    def _warmup(self, ctx: MethodContext, model, names: list[str], path: Path | None):
        o = self.options
        if path is not None and path.exists():
            blob = torch.load(path, weights_only=True)
            ctx.log(f"{self.name}: warm-up checkpoints loaded from {path}")
            return [Checkpoint(**{**c, "betas": tuple(c["betas"])}) for c in blob["ckpts"]], blob["info"]
        idx = self.warmup_indices(ctx)
        exs = [ctx.pool[i] for i in idx]
        params = [p for p in model.parameters() if p.requires_grad]
        pmap = dict(model.named_parameters())
        topts = TrainOptions(lr=o.lr, epochs=1.0, batch_size=o.batch_size, optimizer="adamw",
                             weight_decay=o.weight_decay)
        opt = make_optimizer(params, topts, o.lr)
        lrs = self.epoch_lrs()
        ckpts, losses, steps = [], [], 0
        t0 = time.perf_counter()
        for k in range(o.warmup_epochs):
            torch.manual_seed(ctx.seed * 1000 + k)
            res = train(model, ctx.task, exs, topts, lr=lrs[k], optimizer=opt,
                        seed=ctx.seed * 1000 + k, precision=ctx.precision, device=ctx.device,
                        progress=ctx.progress, desc=f"{self.name}: warm-up epoch {k + 1}")
            losses.append(res["mean_loss"])
            steps += res["steps"]
            state = trainable_state(model)
            st = {n: opt.state[pmap[n]] for n in names}
            ckpts.append(Checkpoint(
                state=state,
                exp_avg={n: st[n]["exp_avg"].detach().clone() for n in names},
                exp_avg_sq={n: st[n]["exp_avg_sq"].detach().clone() for n in names},
                step={n: int(st[n]["step"]) for n in names},
                lr=lrs[k],
                betas=tuple(opt.param_groups[0]["betas"]),
                eps=float(opt.param_groups[0]["eps"]),
            ))
            ctx.log(f"{self.name}: warm-up epoch {k + 1}/{o.warmup_epochs} done")
        info = {"warmup_examples": len(exs), "warmup_steps": steps,
                "warmup_mean_loss": float(np.mean(losses)) if losses else float("nan"),
                "epoch_lrs": lrs, "seconds_warmup": round(time.perf_counter() - t0, 3)}
        if path is not None:
            atomic_save_torch(path, {"ckpts": [asdict(c) for c in ckpts], "info": info})
        return ckpts, info

    # -- features ------------------------------------------------------------------
    def _target_features(self, ctx, model, params, ckpt: Checkpoint, *,
                         projector: Projector, store: Path | None, bar) -> np.ndarray:
        """The target's features, (m, d) float32, in chunks of ``chunk_size``,
        memory-mapped from ``store`` when given; finished chunks are skipped."""
        o = self.options
        examples = ctx.target
        n, d = len(examples), o.proj_dim
        if store is None:
            feats = np.empty((n, d), dtype=np.float32)
            done = np.zeros(0, dtype=bool)
        else:
            npy, marks = store.with_suffix(".npy"), store.with_suffix(".done.npy")
            if npy.exists() and marks.exists():
                feats = np.load(npy, mmap_mode="r+")
                done = np.load(marks)
            else:
                feats = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=(n, d))
                done = np.zeros((n + o.chunk_size - 1) // o.chunk_size, dtype=bool)
        for c, s0 in enumerate(range(0, n, o.chunk_size)):
            idx = list(range(s0, min(n, s0 + o.chunk_size)))
            if store is None or not done[c]:
                feats[s0 : s0 + len(idx)] = grad_features(
                    model, ctx.task, params, ckpt, [examples[i] for i in idx], adam=False,
                    normalize=self.normalize, adam_formula=o.adam_formula,
                    projector=projector, batch_size=ctx.batch_size, device=ctx.device,
                    timing=self._timing)
            if store is not None and not done[c]:
                feats.flush()
                done[c] = True
                atomic_save_npy(marks, done)
            bar.update(len(idx))
        return np.asarray(feats)

    # -- main ----------------------------------------------------------------------
    def score(self, ctx: MethodContext) -> MethodResult:
        o = self.options
        o.validate()
        if ctx.model is None:
            raise OptionError(f"{self.name} needs a model")
        lora = o.lora()
        base, proxy_info = ctx.model, {}
        spec = parse_proxy(o.proxy)
        if spec is not None:
            base, proxy_info = run_proxy(ctx, spec)  # a new model; ctx.model is left as it was
        blob = proxy_blob(base) if spec is not None and ctx.executor is not None else None
        model = add_lora(base, ctx.model_task, lora, seed=ctx.seed)
        try:
            result = self._score(ctx, model, blob)
        finally:
            model.unload()
        result.info.update(proxy_info)
        return result

    def _score(self, ctx: MethodContext, model, proxy: dict[str, Any] | None = None
               ) -> MethodResult:
        """Warm up, compute the target's features at every checkpoint, then the pool's
        chunk by chunk (here, or with ``ctx.executor`` by its workers through
        :class:`GradChunkScorer`), each chunk's features saved per checkpoint and reduced
        at once to its similarities to the target."""
        o = self.options
        params = G.trainable_linear_params(model)
        names = [n for n, _, _ in params]
        P = sum(getattr(m, a).numel() for _, m, a in params)
        work = None
        if ctx.workdir is not None:
            work = Path(ctx.workdir) / f"{self.name}-{self._fingerprint(ctx)}"
            work.mkdir(parents=True, exist_ok=True)
        ckpts, info = self._warmup(ctx, model, names, work / "warmup.pt" if work else None)
        projector = Projector(P, o.proj_dim, o.projection, seed=ctx.seed,
                              sparsity=o.sparsity)
        groups = subtask_groups(ctx)
        K, d = len(ckpts), o.proj_dim
        lengths = np.array([ctx.task.length(e) for e in ctx.pool], dtype=np.int64)
        grid = chunk_grid(lengths, o.chunk_size)
        ids = shard_chunk_ids(len(grid), ctx.shard)
        rows = grid_rows(grid, ids)
        col = np.full(len(ctx.pool), -1, dtype=np.int64)
        col[rows] = np.arange(len(rows))
        per_ckpt = np.empty((K, len(rows), len(ctx.target)), dtype=np.float64)
        self._timing = {"seconds_per_example_grads": 0.0, "seconds_projection": 0.0}
        stores = [ChunkStore(work / f"ckpt{k}-pool" if work else None) for k in range(K)]
        t0 = time.perf_counter()
        bar = tqdm(total=K * (len(rows) + len(ctx.target)), desc=f"{self.name}: gradients",
                   unit="ex", disable=not ctx.progress, leave=False)
        try:
            ft = []
            for k, ck in enumerate(ckpts):
                load_trainable_state(model, ck.state)
                ft.append(self._target_features(
                    ctx, model, params, ck, projector=projector,
                    store=work / f"ckpt{k}-target" if work else None, bar=bar
                ).astype(np.float64))

            def finish(c: int, feats: list[np.ndarray]) -> None:
                for k in range(K):
                    per_ckpt[k, col[grid[c]]] = feats[k].astype(np.float64) @ ft[k].T
                bar.update(K * len(grid[c]))

            have: dict[int, list[np.ndarray | None]] = {}
            for c in ids:
                have[c] = [st.load(c, (len(grid[c]), d)) for st in stores]
                if all(v is not None for v in have[c]):
                    finish(c, have.pop(c))  # type: ignore[arg-type]
            scorer = GradChunkScorer(
                dict(ctx.model_spec or {}), ctx.model_task, proxy, o.lora(), ctx.seed, ctx.task,
                [_cpu_checkpoint(c) for c in ckpts], d, o.projection, ctx.seed, o.sparsity,
                self.adam, self.normalize, o.adam_formula, ctx.batch_size, self._timing,
                projector)

            def payload(c: int) -> tuple[list[Any], list[int]]:
                return ([ctx.pool[i] for i in grid[c]],
                        [k for k, v in enumerate(have[c]) if v is None])

            for c, vals in score_chunks(ctx, scorer, list(have), payload, model=model):
                missing = [k for k, v in enumerate(have[c]) if v is None]
                feats = have.pop(c)
                for j, k in enumerate(missing):
                    stores[k].save(c, vals[j])
                    feats[k] = vals[j]
                finish(c, feats)  # type: ignore[arg-type]
        finally:
            bar.close()
        lrs = np.array([c.lr for c in ckpts])
        total = np.tensordot(lrs, per_ckpt, axes=1)  # sum_k eta_k sim_k, (n, m)
        scores = aggregate(total, groups)
        columns = {f"score_ckpt_{k + 1}": lrs[k] * aggregate(per_ckpt[k], groups)
                   for k in range(K)}
        info.update({
            "checkpoints": K, "trainable_parameters": int(P), "proj_dim": o.proj_dim,
            "projection": o.projection, "target_subtasks": len(np.unique(groups)),
            "seconds_gradients": round(time.perf_counter() - t0, 3),
            **{k: round(v, 3) for k, v in self._timing.items()},
            "store_bytes": sum(p.stat().st_size for p in work.iterdir()) if work else 0,
        })
        if ctx.shard is not None:
            info["shard"] = {**ctx.shard.to_dict(), "chunks": len(ids), "examples": len(rows)}
        return MethodResult(scores=scores, columns=columns, info=info,
                            rows=rows if ctx.shard is not None else None)


def _project_chunk(projector: Projector, flat: torch.Tensor) -> torch.Tensor:
    """Project one chunk of flat gradients (a seam for tests that simulate a kill)."""
    return projector(flat)


@register
class Less(_GradInfluence):
    name = "less"
    description = ("LESS: Adam-preconditioned LoRA gradients over warm-up checkpoints, projected, "
                   "cosine to target")
    adam = True
    normalize = True


@register
class TracIn(_GradInfluence):
    name = "tracin"
    description = "TracIn-CP: lr-weighted projected LoRA gradient dot products over warm-up checkpoints"
    adam = False
    normalize = False
