"""``tov``: Train on Validation (Jain, Montanari, Sasoglu, arXiv 2510.00386).

Fine-tune on the few target examples and score every pool example by how much the
fine-tuning raised the log-probability of its label tokens:

    Delta_t(x) = log p_t(x; theta_val) - log p_t(x; theta_base)
    phi(x)     = (1/T) sum_t F(Delta_t),   F in {identity, abs, relu}

Modes:

* ``basic``: theta_base = the starting model; theta_val = after fine-tuning on the
  target. Two forward passes over the pool. With a freshly initialised classification
  head (token classification), fine-tuning on the target would mostly teach the head
  the tag prior, and the largest log-prob gains would land on examples with no entity
  at all; so by default (``warmup="auto"``) theta_base is then the model after
  ``base_epochs`` on a random base set U of the pool, as interleaved mode's first
  round does, and the target fine-tune starts from there.
* ``interleaved`` (the paper's main algorithm): a base set U is drawn from the pool.
  Round k trains one epoch on U at eta_k (-> theta_bas_k), then one epoch on the target
  at eps * eta_k (-> theta_val_k), scores the pool at both, and continues from
  theta_val_k. The score is the mean over rounds.
* ``parallel``: as interleaved, but the base trajectory never sees the target: it
  continues from theta_bas_k, while a second trajectory takes the same U epochs (same
  batch order) plus the target epochs. The two trajectories converge to the minimisers
  of L_U and L_U + eps * L_target, so for an M-estimator the score tends to
  eps * grad l(x)^T H^{-1} grad L_target: the influence function, without a Hessian.

All training uses LoRA adapters (``adapter="lora"``) or, for small models, every
parameter (``adapter="full"``). Scoring never feeds back into training, so every round's
adapter pair is trained first and the pool is then scored at each of them, in chunks.
Trained rounds and scored chunks are saved in the run's work folder, so a killed run
resumes where it stopped and gives the same scores.

With ``proxy="iprox:RHO"`` (``--proxy``) all of this (the fine-tuning on the target and on
the base set U, and both scoring passes of every round) runs on an IProX proxy of the model
(:mod:`finesift.models.proxy`: a low-rank factorised copy, built once from the model before
the adapter is added, which then sits on one factor of each factored layer). The proxy is
cached in finesift's cache (the work folder where that is not writable) and reused by any
run with the same model, proxy options and probe examples; its parameter counts and build
timings join the manifest. The resume state of a proxy run is kept apart from a full-model
run's (the option is part of the work folder's fingerprint).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from finesift.config import LoraFields
from finesift.engine.scoring import token_logprobs
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
from finesift.store.files import atomic_save_torch

MODES = ("basic", "interleaved", "parallel")
TRANSFORMS = ("identity", "abs", "relu")
SCHEDULES = ("constant", "linear", "cosine")
WARMUPS = ("auto", "on", "off")
# Part of the resume fingerprint: bump when saved round state changes meaning.
_STATE_VERSION = 3


@dataclass
class ToVOptions(LoraFields):
    """Options of ``tov``.

    The LoRA adapter's ``lora_rank``, ``lora_alpha`` and ``lora_dropout`` are declared once,
    in :class:`finesift.config.LoraFields` (defaults 16, 32, 0.05).

    Attributes:
        mode: ``basic``, ``interleaved`` (default) or ``parallel``.
        transform: F applied to each token's log-prob change: ``identity`` (default),
            ``abs`` or ``relu``.
        rounds: L, the number of rounds (interleaved/parallel).
        base_size: |U|, drawn at random from the pool (default min(4096, |pool|)).
        lr: learning rate eta (of round 1; see ``lr_schedule``); in ``basic`` mode the
            target fine-tuning learning rate.
        lr_schedule: eta_k over rounds: ``constant``, ``linear`` (to lr/L) or ``cosine``.
        eps: the target learning-rate factor (target epochs run at eps * eta_k).
        val_epochs: epochs on the target per fine-tuning phase (basic mode: total).
        base_epochs: epochs on U per round.
        batch_size: training batch size.
        optimizer: ``adamw`` or ``sgd``.
        weight_decay: weight decay (with ``sgd`` an L2 penalty, as in an M-estimator).
            In ``interleaved``/``parallel`` it regularises the epochs on U only; the
            target epochs run without it, so the val trajectory minimises
            L_U + penalty + eps * L_target (not L_U + (1 + eps) * penalty + ...).
        grad_clip: clip each step's gradient norm to this (0 = off).
        adapter: ``lora`` (default) or ``full`` (train every parameter).
        score_precision: precision of the scoring passes (default ``fp32``). The two
            passes differ by a small adapter update; bf16 activations round away
            differences below ~0.4% of a value, which on SmolLM2 dropped the Spearman
            correlation of bf16 to fp32 scores to 0.35 at a target lr of 2e-5 (0.98 at
            2e-4). Training phases use the run's precision (bf16 where fast).
        chunk_size: pool examples per scoring chunk; each finished chunk is saved, so a
            killed run loses at most one chunk of scoring work.
        warmup: ``basic`` mode: first train ``base_epochs`` on a random base set U of
            ``base_size`` pool examples at ``lr``, and measure the target fine-tune's
            log-prob changes from there. ``auto`` (default): only when the model's
            classification head is new (a fresh head's first updates learn the tag
            prior, which would dominate the scores); ``on``; ``off``.
        proxy: ``""`` (default: the model itself) or ``iprox:RHO[,KEY=VALUE...]``: train
            and score on an IProX proxy of the model with compression ratio RHO (see
            :mod:`finesift.models.proxy`; KEY is an :class:`IProxOptions` field, e.g.
            ``iprox:0.5,align_epochs=1``). Every fine-tuning phase (target and base set)
            and both scoring passes run on the proxy; the LoRA adapter goes on one factor of
            each factored layer and on the layers kept full (``adapter=full`` trains every
            parameter of the proxy). The built proxy is cached (finesift's cache, else the
            work folder) and loaded by later runs with the same inputs.
    """

    #: left out of the resume fingerprint (and benchmark records) while unset, so work
    #: folders from before the option existed stay valid (see ``option_identity``)
    unkeyed_defaults: ClassVar[tuple[str, ...]] = ("proxy",)

    mode: str = "interleaved"
    transform: str = "identity"
    rounds: int = 3
    base_size: int = 4096
    lr: float = 2e-4
    lr_schedule: str = "constant"
    eps: float = 0.1
    val_epochs: float = 1.0
    base_epochs: float = 1.0
    batch_size: int = 8
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    adapter: str = "lora"
    score_precision: str = "fp32"
    chunk_size: int = 256
    warmup: str = "auto"
    proxy: str = ""

    def validate(self) -> None:
        check_choice(self.warmup, WARMUPS, "tov: warmup")
        check_choice(self.mode, MODES, "tov: mode")
        check_choice(self.transform, TRANSFORMS, "tov: transform")
        check_choice(self.lr_schedule, SCHEDULES, "tov: lr_schedule")
        if self.score_precision not in ("auto", "bf16", "fp32"):
            raise OptionError("tov: score_precision must be 'auto', 'bf16' or 'fp32'")
        if self.adapter not in ("lora", "full"):
            raise OptionError("tov: adapter must be 'lora' or 'full'")
        if self.optimizer not in ("adamw", "sgd"):
            raise OptionError("tov: optimizer must be 'adamw' or 'sgd'")
        if self.rounds < 1 or self.base_size < 1 or self.batch_size < 1 or self.chunk_size < 1:
            raise OptionError("tov: rounds, base_size, batch_size and chunk_size must be >= 1")
        if not (self.lr > 0 and self.eps > 0 and self.val_epochs > 0 and self.base_epochs > 0):
            raise OptionError("tov: lr, eps, val_epochs and base_epochs must be > 0")
        check_proxy(self.proxy, "tov: ")

    def round_lr(self, k: int) -> float:
        """eta_k for round k = 0..L-1."""
        L = self.rounds
        if self.lr_schedule == "constant" or L == 1:
            return self.lr
        if self.lr_schedule == "linear":
            return self.lr * (1.0 - k / L)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * k / L))


def transform_delta(delta: np.ndarray, transform: str) -> np.ndarray:
    """F applied elementwise to per-token log-prob changes."""
    if transform == "identity":
        return delta
    if transform == "abs":
        return np.abs(delta)
    if transform == "relu":
        return np.maximum(delta, 0.0)
    raise ValueError(transform)


def tov_round_scores(
    before: list[np.ndarray], after: list[np.ndarray], transform: str = "identity"
) -> np.ndarray:
    """phi(x) = mean_t F(log p_t(after) - log p_t(before)), per example."""
    out = np.empty(len(before), dtype=np.float64)
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        d = a.astype(np.float64) - b.astype(np.float64)
        out[i] = transform_delta(d, transform).mean() if len(d) else 0.0
    return out


def score_examples(
    model: torch.nn.Module,
    task: Any,
    checkpoints: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]],
    examples: list[Any],
    *,
    transform: str = "identity",
    batch_size: int = 8,
    precision: str = "fp32",
    device: str = "cpu",
    on_pass: Any = None,
) -> np.ndarray:
    """ToV scores of ``examples`` at every round's adapter pair: shape (L, len(examples)).

    For round k with checkpoint pair (theta_before, theta_after), two forward passes give
    the label-token log-probs, and phi_k(x) = mean_t F(log p_t(after) - log p_t(before)).
    This is the one scoring loop of ToV: the local run and Ray workers both call it.

    Args:
        model: the model with the adapter the checkpoints were taken from (a peft LoRA
            model, or the plain model for ``adapter="full"``); its trainable parameters
            are overwritten with each checkpoint in turn.
        task: the :class:`~finesift.engine.tasks.Task` for the model.
        checkpoints: ``[(theta_before, theta_after), ...]``, one pair per round, as
            :func:`~finesift.engine.train.trainable_state` snapshots.
        examples: the encoded examples (scored together, batched by length).
        transform: F: ``identity`` (default), ``abs`` or ``relu``.
        batch_size: rows per forward batch (default 8).
        precision: ``fp32`` (default), ``bf16`` or ``auto``.
        device: torch device (default ``cpu``).
        on_pass: called with ``len(examples)`` after each forward pass (progress).
    """
    vals = np.empty((len(checkpoints), len(examples)), dtype=np.float64)
    for k, (before_state, after_state) in enumerate(checkpoints):
        passes = []
        for state in (before_state, after_state):
            load_trainable_state(model, state)
            passes.append(token_logprobs(
                model, task, examples, batch_size=batch_size,
                precision=precision, device=device, progress=False,
            ))
            if on_pass is not None:
                on_pass(len(examples))
        vals[k] = tov_round_scores(passes[0], passes[1], transform)
    return vals


@dataclass
class ToVChunkScorer:
    """What a worker process needs to score ToV chunks: how to load the model and add the
    adapter, the round checkpoints and the scoring settings (picklable; an executor
    ships it once per worker, e.g. through Ray's object store).

    Attributes:
        model_spec: ``{"name", "task", "labels", "seed"}`` for
            :func:`~finesift.models.loader.load_model` (a built-in name or a folder the
            worker can read).
        lora: the LoRA adapter settings, or ``None`` for ``adapter="full"``.
        seed: the seed the adapter was created with.
        task: the :class:`~finesift.engine.tasks.Task`.
        checkpoints: the rounds' ``(theta_before, theta_after)`` snapshots.
        transform, batch_size, precision: as for :func:`score_examples`.
        proxy: an IProX proxy as :func:`~finesift.models.proxy.proxy_blob` gives it (the
            worker rebuilds it on the model it loads, then adds the adapter), or ``None``.
    """

    model_spec: dict[str, Any]
    lora: LoraOptions | None
    seed: int
    task: Any
    checkpoints: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]
    transform: str = "identity"
    batch_size: int = 8
    precision: str = "fp32"
    proxy: dict[str, Any] | None = None

    @classmethod
    def from_run(cls, method: Method, ctx: MethodContext, checkpoints, precision: str,
                 proxy: dict[str, Any] | None = None):
        if ctx.executor is not None and ctx.model_spec is None:
            raise OptionError("tov: an executor needs ctx.model_spec (how workers load the model)")
        o = method.options
        lora = (o.lora()
                if o.adapter == "lora" else None)
        cpu = [(_cpu(b), _cpu(a)) for b, a in checkpoints]
        return cls(dict(ctx.model_spec or {}), lora, ctx.seed, ctx.task, cpu, o.transform,
                   ctx.batch_size, precision, proxy)

    def build(self, device: str = "cpu"):
        """Load the model on this worker (and rebuild the proxy on it), add the adapter;
        returns ``score(examples) -> (L, n) array``."""
        model = load_spec_model(self.model_spec, device, who="tov")
        if self.proxy is not None:
            model = proxy_from_blob(model, self.proxy)
        if self.lora is not None:
            model = add_lora(model, self.model_spec["task"], self.lora, seed=self.seed)
        return self.bind(model.to(device), device)

    def bind(self, model, device: str = "cpu"):
        """``score(examples) -> (L, n) array`` with ``model`` (carrying the adapter the
        checkpoints were taken from)."""
        checkpoints = [({k: v.to(device) for k, v in b.items()},
                        {k: v.to(device) for k, v in a.items()}) for b, a in self.checkpoints]

        def score(examples: list[Any]) -> np.ndarray:
            return score_examples(model, self.task, checkpoints, examples,
                                  transform=self.transform, batch_size=self.batch_size,
                                  precision=self.precision, device=device)

        return score


@dataclass
class _Trajectory:
    state: dict[str, torch.Tensor]
    opt_base: Any = None
    opt_val: Any = None


@dataclass
class _Progress:
    """Round-level state written after each trained round (for resume): the adapter
    before and after each round's target epoch, the trajectories and their optimisers."""

    done: int = 0
    checkpoints: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = field(
        default_factory=list
    )
    info: list[dict[str, Any]] = field(default_factory=list)


@register
class ToV(Method):
    name = "tov"
    description = "Train on Validation: log-prob change of pool examples after fine-tuning on the target"
    needs_model = True
    Options = ToVOptions
    # phi(x) depends on x and the trained adapters only; training sees the target and
    # (interleaved/parallel) a base set drawn from the whole pool, which every shard
    # run reads, so each shard trains the same adapters as the unsharded run.
    shardable = True
    # the coordinator trains the rounds; workers score chunks at every checkpoint
    chunk_scorer = ToVChunkScorer
    cli_flags: ClassVar[dict[str, str]] = {"proxy": "proxy"}  # --proxy iprox:RHO
    trains = True  # the rounds' adapters

    def required_dtype(self) -> tuple[str, str] | None:
        """fp32 weights for fp32 scoring passes (``score_precision=fp32``, the default:
        bf16 activations round away the small adapter updates ToV measures) and for
        ``adapter=full`` (bf16 weights lose updates below 1/256 of their size)."""
        o = self.options
        if o.adapter == "full":
            return "fp32", ("adapter=full trains the weights themselves, and bf16 or fp16 "
                            "weights lose updates smaller than their last digit")
        if o.score_precision == "fp32":
            return "fp32", ("its scoring passes run in fp32 (score_precision=fp32, the "
                            "default): bf16 activations round away the small log-prob "
                            "changes it measures (Spearman 0.35 against fp32 on SmolLM2 at "
                            "a target lr of 2e-5); add -o score_precision=auto to score in "
                            "the weights' dtype, or use --dtype fp32")
        return None

    def cost(self, ctx: MethodContext):
        """ToV's passes, as :meth:`score` runs them.

        * ``basic``: (a warm-up of ``base_epochs`` on the base set U when there is one)
          ``val_epochs`` on the target, then 2 forward passes over the pool.
        * ``interleaved``: per round, ``base_epochs`` on U (min(``base_size``, |pool|)
          pool examples) and ``val_epochs`` on the target; then 2 forward passes over the
          pool per round.
        * ``parallel``: as interleaved, with the epochs on U twice per round (the base and
          the val trajectory).

        Training batches are ``batch_size`` random rows (padded to the longest); scoring
        passes run at ``score_precision`` with the adapter on. Held: two adapters per
        round and each trajectory's adapter and two optimisers' moments; written: the same
        in the resume file, and one float64 per round and pool example.

        With ``proxy``, the IProX build comes first
        (:func:`finesift.methods._proxy.proxy_cost`); the passes above then run on the
        proxy but are timed (and the adapter states sized) on the full model, an upper
        bound.
        """
        from finesift.engine.cost import (
            FULL,
            Cost,
            Pass,
            adapter_size,
            lengths_of,
            shuffled_tokens,
            sorted_tokens,
        )

        o = self.options
        o.validate()
        adapter = o.lora() if o.adapter == "lora" else FULL
        pool_len, target_len = lengths_of(ctx.task, ctx.pool), lengths_of(ctx.task, ctx.target)
        n = len(ctx.pool)

        def fit(what: str, lengths, epochs: float, data: str, times: int = 1) -> Pass:
            tokens = shuffled_tokens(lengths, o.batch_size, epochs, seed=ctx.seed)
            return Pass(what, times * tokens, kind="train", data=data, batch_size=o.batch_size,
                        adapter=adapter)

        cost = Cost()
        spec = parse_proxy(o.proxy)
        if spec is not None:  # the build's passes, before any of ToV's own
            proxy_cost(ctx, spec, o.lora(), cost)
        passes: list[Pass] = cost.passes
        if o.mode == "basic":
            rounds, trajectories = 1, 0
            base_idx = self._basic_base_set(ctx)
            if base_idx is not None:
                passes.append(fit(f"tov: warm-up on a base set of {len(base_idx)} pool examples, "
                                  f"{o.base_epochs:g} epoch(s)", pool_len[base_idx],
                                  o.base_epochs, "pool"))
            passes.append(fit(f"tov: fine-tune on the target, {o.val_epochs:g} epoch(s)",
                              target_len, o.val_epochs, "target"))
        else:
            rounds = o.rounds
            trajectories = 2 if o.mode == "parallel" else 1
            rng = np.random.default_rng([ctx.seed, 0x70F])
            base_idx = np.sort(rng.choice(n, size=min(o.base_size, n), replace=False))
            on_u = f"{trajectories} x " if trajectories > 1 else ""
            passes.append(fit(f"tov: {rounds} round(s) x {on_u}{o.base_epochs:g} epoch(s) on a "
                              f"base set of {len(base_idx)} pool examples", pool_len[base_idx],
                              o.base_epochs, "pool", rounds * trajectories))
            passes.append(fit(f"tov: {rounds} round(s) x {o.val_epochs:g} epoch(s) on the target",
                              target_len, o.val_epochs, "target", rounds))
        precision = ctx.precision if o.score_precision == "auto" else o.score_precision
        passes.append(Pass(f"tov: {2 * rounds} forward passes over the pool (before and after "
                           f"each round's target epochs, {precision})",
                           2 * rounds * sorted_tokens(pool_len, ctx.batch_size),
                           precision=precision, adapter=adapter))
        _, one = adapter_size(ctx.model, ctx.model_task, adapter, ctx.seed)
        states = 2 * rounds + 5 * trajectories  # checkpoints; trajectories: state + 2 x moments
        cost.memory[f"{states} adapter states (checkpoints, trajectories)"] = states * one
        cost.disk.update({"round checkpoints (resume file)": states * one,
                          "per-round scores (chunk store)":
                              8.0 * rounds * n + 128 * -(-n // o.chunk_size)})
        cost.score_columns = rounds
        return cost

    # -- helpers -------------------------------------------------------------------
    def _train(self, ctx, model, examples, *, lr, epochs, optimizer, seed, desc):
        o = self.options
        topts = TrainOptions(
            lr=lr, epochs=epochs, batch_size=o.batch_size, optimizer=o.optimizer,
            weight_decay=o.weight_decay, grad_clip=o.grad_clip,
        )
        if optimizer is None:
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = make_optimizer(params, topts, lr)
        res = train(
            model,
            ctx.task,
            examples,
            topts,
            lr=lr,
            optimizer=optimizer,
            seed=seed,
            precision=ctx.precision,
            device=ctx.device,
            progress=ctx.progress,
            desc=desc,
        )
        return res

    def _fingerprint(self, ctx: MethodContext) -> str:
        # a new head changes what warmup="auto" does
        tag = f"state-v{_STATE_VERSION}{'-new-head' if ctx.new_head else ''}"
        return run_fingerprint(tag, self.options, ctx)

    # -- resume --------------------------------------------------------------------
    def _work_prefix(self, ctx: MethodContext) -> Path | None:
        """``WORKDIR/tov-<fingerprint>``: the stem of this run's resume files (hashes
        every example once, so call it once per run)."""
        if ctx.workdir is None:
            return None
        return Path(ctx.workdir) / f"tov-{self._fingerprint(ctx)}"

    def _save(self, path: Path | None, prog: _Progress, trajs: dict[str, _Trajectory]) -> None:
        if path is None:
            return
        blob = {
            "done": prog.done,
            "checkpoints": [{"before": b, "after": a} for b, a in prog.checkpoints],
            "info": json.dumps(prog.info),
            "trajs": {
                k: {
                    "state": t.state,
                    "opt_base": t.opt_base.state_dict() if t.opt_base is not None else None,
                    "opt_val": t.opt_val.state_dict() if t.opt_val is not None else None,
                }
                for k, t in trajs.items()
            },
        }
        atomic_save_torch(path, blob)

    # -- main ----------------------------------------------------------------------
    def score(self, ctx: MethodContext) -> MethodResult:
        """Train the round checkpoints, then score the pool at each of them."""
        o = self.options
        o.validate()
        if ctx.model is None:
            raise OptionError("tov needs a model")
        model, proxy_info, blob = ctx.model, {}, None
        spec = parse_proxy(o.proxy)
        if spec is not None:
            # built once from the model as it is (no adapter yet); a new model, so
            # ctx.model is left as it was. Workers rebuild it from the blob.
            model, proxy_info = run_proxy(ctx, spec)
            if ctx.executor is not None:
                blob = proxy_blob(model)
        peft_wrapped = False
        if o.adapter == "lora":
            lora = o.lora()
            model = add_lora(model, ctx.model_task, lora, seed=ctx.seed)
            peft_wrapped = True
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        try:
            work = self._work_prefix(ctx)
            prog, base_idx = self._train_phase(ctx, model, work)
            t0 = time.perf_counter()
            per_round, rows = self._score_phase(ctx, model, prog.checkpoints, work, blob)
            score_seconds = time.perf_counter() - t0
            n_trainable = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
        finally:
            if peft_wrapped:
                model.unload()
        scores = per_round.mean(axis=0)
        columns = {f"score_round_{k + 1}": per_round[k] for k in range(per_round.shape[0])}
        info: dict[str, Any] = {
            "mode": o.mode,
            "rounds": prog.info,
            "trainable_parameters": n_trainable,
            "forward_passes_over_pool": 2 * per_round.shape[0],
            "seconds_scoring": round(score_seconds, 3),
            "seconds_training": round(sum(r["seconds_training"] for r in prog.info), 3),
        }
        if base_idx is not None:
            info["base_set_size"] = len(base_idx)
        info.update(proxy_info)
        return MethodResult(scores=scores, columns=columns, base_set=base_idx, info=info,
                            rows=rows if ctx.shard is not None else None)

    # -- phase 1: training ---------------------------------------------------------
    def _train_phase(
        self, ctx: MethodContext, model, work: Path | None
    ) -> tuple[_Progress, np.ndarray | None]:
        """Produce the (theta_before, theta_after) adapter pair of every round.

        Scoring never feeds back into training, so all rounds are trained first; the
        pool is then scored once per checkpoint (in resumable chunks).
        """
        o = self.options
        prog = _Progress()
        path = work.with_name(work.name + ".pt") if work is not None else None
        params = [p for p in model.parameters() if p.requires_grad]
        start = trainable_state(model)
        if o.mode == "basic":
            trajs: dict[str, _Trajectory] = {}
            base_idx = self._basic_base_set(ctx)
            rounds = 1
        else:
            n = len(ctx.pool)
            rng = np.random.default_rng([ctx.seed, 0x70F])
            base_idx = np.sort(rng.choice(n, size=min(o.base_size, n), replace=False))
            trajs = {"base": _Trajectory(state=start)}
            if o.mode == "parallel":
                trajs["val"] = _Trajectory(state={k: v.clone() for k, v in start.items()})
            rounds = o.rounds

        def new_opt(lr: float, weight_decay: float):
            return make_optimizer(
                params, TrainOptions(optimizer=o.optimizer, weight_decay=weight_decay), lr
            )

        for t in trajs.values():
            # the penalty belongs to the training objective, not to eps * L_target
            t.opt_base, t.opt_val = new_opt(o.lr, o.weight_decay), new_opt(o.lr * o.eps, 0.0)
        if path is not None and path.exists():
            blob = torch.load(path, weights_only=True)
            prog.done = int(blob["done"])
            prog.checkpoints = [(c["before"], c["after"]) for c in blob["checkpoints"]]
            prog.info = json.loads(blob["info"])
            for k, t in trajs.items():
                saved = blob["trajs"][k]
                t.state = saved["state"]
                load_trainable_state(model, t.state)
                if saved["opt_base"] is not None:
                    t.opt_base.load_state_dict(saved["opt_base"])
                if saved["opt_val"] is not None:
                    t.opt_val.load_state_dict(saved["opt_val"])
            if prog.done < rounds:
                ctx.log(f"tov: resuming after round {prog.done} of {rounds} from {path}")

        if o.mode == "basic" and prog.done == 0:
            load_trainable_state(model, start)
            t0 = time.perf_counter()
            warm: dict[str, Any] = {}
            if base_idx is not None:  # theta_base: after base_epochs on U
                torch.manual_seed(ctx.seed + 0x70F)
                rw = self._train(ctx, model, [ctx.pool[i] for i in base_idx], lr=o.lr,
                                 epochs=o.base_epochs, optimizer=None, seed=ctx.seed + 0x70F,
                                 desc="tov: warm-up on the base set")
                start = trainable_state(model)
                warm = {"warmup_examples": len(base_idx), "warmup_steps": rw["steps"],
                        "warmup_train_loss": rw["mean_loss"]}
                ctx.log(f"tov: warmed up on a base set of {len(base_idx)} pool examples "
                        f"({'new classification head' if ctx.new_head else 'warmup=on'})")
            torch.manual_seed(ctx.seed)
            res = self._train(ctx, model, ctx.target, lr=o.lr, epochs=o.val_epochs,
                              optimizer=None, seed=ctx.seed, desc="tov: fine-tune on target")
            prog.checkpoints.append((start, trainable_state(model)))
            prog.info.append({
                "round": 1, "target_lr": o.lr, "target_steps": res["steps"],
                "target_train_loss": res["mean_loss"], **warm,
                "seconds_training": round(time.perf_counter() - t0, 3),
            })
            prog.done = 1
            self._save(path, prog, trajs)
            return prog, base_idx

        U = [ctx.pool[i] for i in base_idx] if base_idx is not None else []
        for k in range(prog.done, rounds):
            eta = o.round_lr(k)
            seed_k = int(ctx.seed * 1000 + k)
            t_round = time.perf_counter()
            # base trajectory: one epoch on U -> theta_bas_k
            tr = trajs["base"]
            load_trainable_state(model, tr.state)
            # Dropout masks depend on (seed, round) only: a resumed run continues as an
            # uninterrupted one would, and both parallel trajectories get the same masks.
            torch.manual_seed(seed_k)
            rb = self._train(ctx, model, U, lr=eta, epochs=o.base_epochs, optimizer=tr.opt_base,
                             seed=seed_k, desc=f"tov round {k + 1}: train on U")
            theta_bas = trainable_state(model)
            if o.mode == "parallel":
                tv = trajs["val"]
                load_trainable_state(model, tv.state)
                torch.manual_seed(seed_k)
                self._train(ctx, model, U, lr=eta, epochs=o.base_epochs, optimizer=tv.opt_base,
                            seed=seed_k, desc=f"tov round {k + 1}: train val trajectory on U")
                opt_val = tv.opt_val
            else:
                opt_val = tr.opt_val
            torch.manual_seed(seed_k + 7919)
            rv = self._train(ctx, model, ctx.target, lr=eta * o.eps, epochs=o.val_epochs,
                             optimizer=opt_val, seed=seed_k + 7919,
                             desc=f"tov round {k + 1}: fine-tune on target")
            theta_val = trainable_state(model)
            prog.checkpoints.append((theta_bas, theta_val))
            if o.mode == "interleaved":
                tr.state = theta_val  # continue the base trajectory from theta_val_k
            else:
                tr.state = theta_bas
                trajs["val"].state = theta_val
            prog.info.append({
                "round": k + 1, "lr": eta, "target_lr": eta * o.eps,
                "base_train_loss": rb["mean_loss"], "target_train_loss": rv["mean_loss"],
                "seconds_training": round(time.perf_counter() - t_round, 3),
            })
            prog.done = k + 1
            self._save(path, prog, trajs)
            ctx.log(f"tov: round {k + 1}/{rounds} trained")
        return prog, base_idx

    def _basic_base_set(self, ctx: MethodContext) -> np.ndarray | None:
        """``basic`` mode's warm-up set U (drawn as interleaved mode draws it), or None
        when there is no warm-up."""
        o = self.options
        if o.warmup == "off" or (o.warmup == "auto" and not ctx.new_head):
            return None
        n = len(ctx.pool)
        rng = np.random.default_rng([ctx.seed, 0x70F])
        return np.sort(rng.choice(n, size=min(o.base_size, n), replace=False))

    # -- phase 2: scoring ----------------------------------------------------------
    def _score_phase(
        self, ctx: MethodContext, model, checkpoints, work: Path | None,
        proxy: dict[str, Any] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """phi_k for the pool examples this run scores and every round k: ``(values, rows)``
        with ``values`` of shape (L, len(rows)) and ``rows`` the sorted pool positions
        (every position, or the shard's in a shard run).

        The pool is cut into chunks of ``chunk_size`` examples in length order (the grid
        of :mod:`finesift.store.chunks`); each finished chunk is saved in the work folder
        and skipped when a killed run is resumed. Chunks are scored here one after the
        other or, with ``ctx.executor``, by its workers (e.g. Ray), through the same
        :class:`ToVChunkScorer` (:func:`~finesift.methods.base.score_chunks`); ``proxy``
        (:func:`~finesift.models.proxy.proxy_blob`) is how the workers rebuild the
        run's proxy.
        """
        o = self.options
        n, L = len(ctx.pool), len(checkpoints)
        precision = ctx.precision if o.score_precision == "auto" else o.score_precision
        lengths = np.array([ctx.task.length(e) for e in ctx.pool], dtype=np.int64)
        grid = chunk_grid(lengths, o.chunk_size)
        ids = shard_chunk_ids(len(grid), ctx.shard)
        rows = grid_rows(grid, ids)
        col = np.full(n, -1, dtype=np.int64)
        col[rows] = np.arange(len(rows))
        out = np.empty((L, len(rows)), dtype=np.float64)
        store = ChunkStore(work)
        bar = tqdm(total=len(rows) * 2 * L, desc="tov: scoring the pool", unit="ex",
                   disable=not ctx.progress, leave=False)

        def done(c: int, vals: np.ndarray, *, saved: bool) -> None:
            if not saved:
                store.save(c, vals)
            out[:, col[grid[c]]] = vals
            bar.update(len(grid[c]) * 2 * L)

        try:
            todo = []
            for c in ids:
                vals = store.load(c, (L, len(grid[c])))
                if vals is None:
                    todo.append(c)
                else:
                    done(c, vals, saved=True)
            if todo:
                scorer = ToVChunkScorer.from_run(self, ctx, checkpoints, precision, proxy)
                for c, vals in score_chunks(ctx, scorer, todo,
                                            lambda c: [ctx.pool[i] for i in grid[c]],
                                            model=model):
                    done(c, np.asarray(vals, dtype=np.float64), saved=False)
        finally:
            bar.close()
        return out, rows


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}
