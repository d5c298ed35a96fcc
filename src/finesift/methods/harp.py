"""``harp``: hierarchical active region pruning (Wang et al., arXiv 2606.07690).

HARP spends a few real train-evaluate runs on small clusters ("leaves") of the pool
instead of scoring every example, and selects a *set of leaves*, possibly far fewer
examples than the budget.

1. Hierarchy: every pool example is embedded (``embedder``: all-MiniLM-L6-v2 by default,
   the model's own mean-pooled states, or hashed token counts) and partitioned by
   nested k-means into regions -> parents -> leaves of about ``leaf_size`` examples
   (:func:`finesift.methods.harp_core.build_tree`).
2. Measured utilities: for ``leaves_per_parent`` representative leaves per parent (the
   leaf nearest the parent's centre first, then spread out; at most ``max_runs`` runs in
   all), a fresh LoRA adapter is fine-tuned on the leaf for ``steps`` steps and the
   target is measured. The utility of a model on target domain d is
   ``u_d = mean_{t in d} exp(-loss_t)``, the mean over the domain's target examples of
   the geometric-mean probability of their label tokens (in [0, 1]; ``loss_t`` the
   token-averaged log-loss, in fp32). ``b_d`` is the untouched model's ``u_d`` and the
   leaf's measured utility is ``phi_hat[g, d] = u_d(after g) - b_d``. Domains are the
   target records' ``domain`` (else ``subtask``) field; one domain otherwise. The noise
   variance ``sigma2`` of a measurement is the sampling variance of that mean over the
   target examples (what a bootstrap over them estimates) plus the run-to-run variance
   from ``repeats`` leaves measured a second time with another seed. The number of
   train-evaluate runs is the method's cost (``info["train_evaluate_runs"]``).
3. Empirical Bayes (:func:`finesift.methods.harp_core.eb_posterior`): posterior mean and
   variance of every leaf's utility from a hierarchical Gaussian model fitted by method
   of moments (measured leaves are shrunk too).
4. Envelopes (:func:`finesift.methods.harp_core.greedy_select`): ``envelope=c`` (HARP-C,
   only the best helpful leaf counts per domain, every harm counts) or ``e`` (HARP-E,
   effects add up), on the posterior means minus ``risk`` posterior standard deviations;
   greedy by marginal gain, then the best-prefix rule, capped at ``budget`` examples.

Scores. HARP chooses leaves, not a ranking; to fit the score interface every example of a
chosen leaf scores in (1, 2] (earlier in the greedy order = higher), every other example
below 1: ``sigmoid`` of its leaf's posterior mean utility (averaged over domains, divided
by the spread of those means), so within each group the order is the posterior order.

Budget. HARP selects the union of its chosen leaves, capped at the run's budget: the
budget of ``finesift select --budget N`` (or ``finesift.select(budget=N)``) reaches HARP
through :meth:`Method.bind_budget` unless ``-o budget=M`` sets a cap of its own. HARP may
choose far fewer examples than the budget (it stops where the predicted utility peaks);
the selection is then smaller than the budget, and the manifest's ``selected.count`` and
``method_info.n_selected_by_harp`` say how many it chose next to ``budget.count``. With
``fill=true`` the rest of the budget is filled in posterior-utility order instead. Per
example, ``scores.parquet`` gets ``harp_leaf``, ``harp_parent``, ``harp_region`` and
``harp_posterior_mean``; the manifest gets the tree and the measured and posterior
utilities of every leaf. ``harp-c`` and ``harp-e`` are ``harp`` with the envelope fixed.

Resume: each finished train-evaluate run is saved in the run's work folder
(``OUT/.work/harp_runs-<fingerprint>.json``, shared by runs that differ only in
the envelope, budget or risk); the same command started again after a crash trains only
the runs still missing (``info["runs_reused_from_workdir"]``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from finesift.config import LoraFields
from finesift.engine.scoring import example_losses
from finesift.engine.train import (
    TrainOptions,
    add_lora,
    load_trainable_state,
    train,
    trainable_state,
)
from finesift.errors import OptionError, check_choice
from finesift.methods._text import texts_of
from finesift.methods.base import Method, MethodContext, MethodResult, register
from finesift.methods.harp_core import (
    ENVELOPES,
    build_tree,
    eb_posterior,
    greedy_select,
    representative_leaves,
)
from finesift.store.work import fingerprint

EMBEDDERS = ("minilm", "model", "tokens")
_TOKEN_DIM = 512


@dataclass
class HarpOptions(LoraFields):
    """Options of ``harp``.

    The LoRA adapter's ``lora_rank``, ``lora_alpha`` and ``lora_dropout`` are declared once,
    in :class:`finesift.config.LoraFields` (defaults 16, 32, 0.05).

    Attributes:
        envelope: ``c`` (HARP-C, default: redundancy-controlled) or ``e`` (HARP-E:
            complementary leaves add up).
        budget: cap on the examples HARP chooses (default 0 = the run's budget).
        fill: fill the rest of the budget in posterior-utility order when HARP chooses
            fewer examples (default false: the selection is HARP's choice alone).
        embedder: ``minilm`` (default), ``model`` (the scoring model's mean-pooled last
            hidden states) or ``tokens`` (hashed counts of the encoded token ids,
            L2-normalised; no encoder needed).
        leaf_size: examples per leaf, about (default 64; clamped to the pool size).
        parent_leaves: leaves per parent, about (default 8).
        region_parents: parents per region, about (default 4).
        leaves_per_parent: representative leaves measured per parent (default 2).
        max_runs: cap on measured leaves (default 64); parents are covered round-robin.
        repeats: leaves measured a second time, with another seed, to estimate the
            run-to-run noise (default 2; 0 = target sampling noise only).
        steps: optimiser steps per leaf fine-tune (default 8).
        lr: learning rate of the leaf fine-tunes (default 2e-4).
        batch_size: training batch size (default 8).
        max_target: target examples measured per run, a seeded subsample if there are
            more (default 256).
        risk: greedy on posterior mean minus ``risk`` x posterior sd (default 0).
        max_length, embed_batch_size: for ``embedder=minilm``.
    """

    envelope: str = "c"
    budget: int = 0
    fill: bool = False
    embedder: str = "minilm"
    leaf_size: int = 64
    parent_leaves: int = 8
    region_parents: int = 4
    leaves_per_parent: int = 2
    max_runs: int = 64
    repeats: int = 2
    steps: int = 8
    lr: float = 2e-4
    batch_size: int = 8
    max_target: int = 256
    risk: float = 0.0
    max_length: int = 256
    embed_batch_size: int = 32

    def validate(self) -> None:
        check_choice(self.envelope, ENVELOPES, "harp: envelope")
        check_choice(self.embedder, EMBEDDERS, "harp: embedder")
        for name in ("leaf_size", "parent_leaves", "region_parents", "leaves_per_parent",
                     "max_runs", "steps", "batch_size", "lora_rank", "max_target",
                     "max_length", "embed_batch_size"):
            if getattr(self, name) < 1:
                raise OptionError(f"harp: {name} must be >= 1")
        if self.budget < 0 or self.repeats < 0 or self.risk < 0:
            raise OptionError("harp: budget, repeats and risk must be >= 0")
        if not self.lr > 0:
            raise OptionError("harp: lr must be > 0")


def token_embeddings(examples: Sequence[Any], dim: int = _TOKEN_DIM) -> np.ndarray:
    """Hashed bag-of-token-ids of each encoded example, L2-normalised ``(n, dim)``."""
    out = np.zeros((len(examples), dim), dtype=np.float32)
    for i, e in enumerate(examples):
        ids = np.asarray(e.input_ids, dtype=np.int64)
        np.add.at(out[i], (ids * 2654435761) % dim, 1.0)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def target_domains(records: Sequence[Any], n: int) -> tuple[np.ndarray, list[str]]:
    """Domain index of each target example (``domain``, else ``subtask``) and the names."""
    if len(records) != n:
        return np.zeros(n, dtype=np.int64), ["all"]
    names = []
    for r in records:
        meta = getattr(r, "meta", {}) or {}
        v = meta.get("domain", meta.get("subtask"))
        names.append("all" if v is None else str(v))
    uniq = sorted(set(names))
    return np.array([uniq.index(x) for x in names], dtype=np.int64), uniq


def domain_utility(losses: np.ndarray, dom: np.ndarray, n_dom: int) -> tuple[np.ndarray, ...]:
    """Per-example ``exp(-loss)``, and its per-domain mean."""
    u = np.exp(-np.asarray(losses, dtype=np.float64))
    return u, np.array([u[dom == d].mean() for d in range(n_dom)])


@register
class Harp(Method):
    name = "harp"
    description = "hierarchical active region pruning: train a few leaves, EB the rest, HARP-C/E"
    needs_model = True
    uses_budget = True
    Options = HarpOptions
    not_shardable_reason = "it chooses whole leaves of a k-means tree of the whole pool"
    not_distributable_reason = ("it chooses whole leaves of a k-means tree of the whole "
                                "pool; its cost is a few short fine-tunes on chosen leaves, "
                                "each depending on the tree and the last, not pool chunks "
                                "scored independently")
    cli_flags: ClassVar[dict[str, str]] = {"envelope": "envelope"}  # --envelope c|e
    trains = True  # a short LoRA fine-tune per measured leaf
    report_columns: ClassVar[dict[str, str]] = {
        "n_selected_by_harp": "examples HARP chose",
        "train_evaluate_runs": "train-eval runs in selection"}

    def bind_budget(self, k: int) -> None:
        if not self.options.budget:
            self.options.budget = int(k)

    def __init__(self, options: HarpOptions,
                 embed_fn: Callable[[MethodContext], np.ndarray] | None = None) -> None:
        """``embed_fn`` (library use and tests): returns the pool embeddings ``(n, dim)``
        instead of the ``embedder`` option."""
        super().__init__(options)
        self.embed_fn = embed_fn

    # -- cost ----------------------------------------------------------------------
    def cost(self, ctx: MethodContext):
        """HARP's passes: the pool's embeddings (``embedder``: MiniLM, a forward pass of
        the model, or token counts at no cost); one fp32 forward pass over the measured
        target examples (at most ``max_target``) with the fresh adapter; then per
        train-evaluate run ``steps`` LoRA steps of ``batch_size`` rows of one leaf and a
        forward pass over the measured target. The runs are ``leaves_per_parent`` leaves
        of each parent (round-robin, at most ``max_runs``) plus ``repeats``; the tree is
        not built yet, so its size is the k-means targets: round(n / ``leaf_size``)
        leaves, ceil(leaves / ``parent_leaves``) parents. A leaf's batches are drawn from
        random pool examples (a leaf's lengths are not known before the tree)."""
        from finesift.engine.cost import Cost, Pass, lengths_of, shuffled_tokens, sorted_tokens

        o: HarpOptions = self.options
        o.validate()
        n = len(ctx.pool)
        pool_len = lengths_of(ctx.task, ctx.pool)
        cost = Cost(score_columns=4)
        if self.embed_fn is None and o.embedder == "model":
            cost.passes.append(Pass("harp: model embeddings of the pool",
                                    sorted_tokens(pool_len, ctx.batch_size)))
        elif self.embed_fn is None and o.embedder == "minilm":
            from finesift.methods.embed import minilm_pass

            texts = texts_of(ctx.pool_records, n, "pool", self.name)
            cost.passes.append(minilm_pass(ctx, [texts], max_length=o.max_length,
                                           batch_size=o.embed_batch_size,
                                           what="harp: all-MiniLM-L6-v2 embeddings of the pool"))
        n_leaves = max(1, min(n, round(n / max(1, min(o.leaf_size, n)))))
        n_parents = int(np.ceil(n_leaves / o.parent_leaves))
        measured = min(o.max_runs, n_leaves, n_parents * o.leaves_per_parent)
        runs = measured + min(o.repeats, measured)
        leaf = max(1, round(n / n_leaves))
        rng = np.random.default_rng(ctx.seed)
        samples = [pool_len[rng.choice(n, size=min(leaf, n), replace=False)] for _ in range(8)]
        per_run = float(np.mean([shuffled_tokens(x, o.batch_size, float(o.steps),
                                                 max_steps=o.steps, seed=ctx.seed + 1)
                                 for x in samples]))
        lora = o.lora()
        target_len = lengths_of(ctx.task, ctx.target)
        if len(target_len) > o.max_target:
            target_len = target_len[np.sort(rng.choice(len(target_len), o.max_target,
                                                       replace=False))]
        cost.passes.append(Pass(f"harp: {runs} train-evaluate run(s) x {o.steps} step(s) on a "
                                f"leaf of ~{leaf} examples ({n_leaves} leaves, {n_parents} "
                                "parent(s))", runs * per_run, kind="train",
                                batch_size=o.batch_size, adapter=lora))
        cost.passes.append(Pass(f"harp: {runs + 1} forward pass(es) over {len(target_len)} target "
                                "examples (fp32)",
                                (runs + 1) * sorted_tokens(target_len, ctx.batch_size),
                                data="target", precision="fp32", adapter=lora))
        cost.disk["train-evaluate runs (json)"] = 256.0 * runs
        return cost

    # -- step 1 --------------------------------------------------------------------
    def _embed(self, ctx: MethodContext) -> tuple[np.ndarray, str]:
        o: HarpOptions = self.options
        if self.embed_fn is not None:
            return np.asarray(self.embed_fn(ctx), dtype=np.float64), "custom"
        if o.embedder == "tokens":
            return token_embeddings(ctx.pool), "tokens"
        from finesift.methods import embed as emb

        if o.embedder == "model":
            return emb.model_embeddings(ctx.model, ctx.task, ctx.pool, batch_size=ctx.batch_size,
                                        precision=ctx.precision, device=ctx.device,
                                        progress=ctx.progress, desc="harp: embedding"), "model"
        texts = texts_of(ctx.pool_records, len(ctx.pool), "pool", self.name)
        return emb.minilm_embeddings(texts, max_length=o.max_length,
                                     batch_size=o.embed_batch_size, progress=ctx.progress,
                                     device=ctx.device,
                                     desc="harp: embedding"), "all-MiniLM-L6-v2"

    # -- step 2 --------------------------------------------------------------------
    def _measure(self, ctx, model, init_state, leaf_members, target, dom, n_dom, u0, seed):
        o: HarpOptions = self.options
        load_trainable_state(model, init_state)
        torch.manual_seed(seed)
        examples = [ctx.pool[i] for i in leaf_members]
        topts = TrainOptions(lr=o.lr, epochs=float(o.steps), batch_size=o.batch_size,
                             max_steps=o.steps)
        res = train(model, ctx.task, examples, topts, seed=seed, precision=ctx.precision,
                    device=ctx.device)
        losses = example_losses(model, ctx.task, target, batch_size=ctx.batch_size,
                                precision="fp32", device=ctx.device)
        u, _ = domain_utility(losses, dom, n_dom)
        delta = u - u0
        phi = np.array([delta[dom == d].mean() for d in range(n_dom)])
        # squared standard error of the mean over the domain's target examples
        samp = np.array([delta[dom == d].var(ddof=1) / (dom == d).sum()
                         if (dom == d).sum() > 1 else 0.0 for d in range(n_dom)])
        return phi, samp, res["steps"]

    def score(self, ctx: MethodContext) -> MethodResult:
        o: HarpOptions = self.options
        o.validate()
        if ctx.model is None:
            raise OptionError("harp needs a model (it fine-tunes on leaves)")
        n = len(ctx.pool)
        t0 = time.perf_counter()
        emb, embedder = self._embed(ctx)
        tree = build_tree(emb, leaf_size=min(o.leaf_size, n), parent_leaves=o.parent_leaves,
                          region_parents=o.region_parents, seed=ctx.seed)
        t_tree = time.perf_counter() - t0
        sizes = tree.leaf_sizes()
        members = [np.flatnonzero(tree.leaf == g) for g in range(tree.n_leaves)]
        ctx.log(f"harp: {tree.n_leaves} leaves, {len(tree.parent_centres)} parents, "
                f"{int(tree.parent_region.max()) + 1} regions")

        # target subsample and domains
        rng = np.random.default_rng(ctx.seed)
        t_idx = np.arange(len(ctx.target))
        if len(t_idx) > o.max_target:
            t_idx = np.sort(rng.choice(len(t_idx), o.max_target, replace=False))
        target = [ctx.target[i] for i in t_idx]
        dom_all, dom_names = target_domains(ctx.target_records, len(ctx.target))
        dom = dom_all[t_idx]
        present = sorted(set(dom.tolist()))
        dom = np.array([present.index(x) for x in dom])
        dom_names = [dom_names[i] for i in present]
        D = len(dom_names)

        measured = representative_leaves(tree, o.leaves_per_parent, o.max_runs)
        t1 = time.perf_counter()
        lora = o.lora()
        model = add_lora(ctx.model, ctx.model_task, lora, seed=ctx.seed)
        steps = 0
        try:
            init_state = trainable_state(model)
            base_losses = example_losses(model, ctx.task, target, batch_size=ctx.batch_size,
                                         precision="fp32", device=ctx.device)
            u0, b = domain_utility(base_losses, dom, D)
            phi_hat = np.zeros((len(measured), D))
            samp = np.zeros((len(measured), D))
            cache = _RunCache(ctx.workdir, o, ctx.seed, base_losses, dom, dtype=ctx.dtype)
            n_cached = 0

            def measure(g: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
                nonlocal n_cached
                key = cache.key([ctx.pool[i] for i in members[g]], seed)
                hit = cache.get(key)
                if hit is not None:
                    n_cached += 1
                    return hit
                out = self._measure(ctx, model, init_state, members[g], target, dom, D, u0, seed)
                cache.put(key, *out)
                return out

            for j, g in enumerate(measured):
                ctx.log(f"harp: train-evaluate leaf {g} ({j + 1}/{len(measured)})")
                phi_hat[j], samp[j], s = measure(int(g), ctx.seed + 1)
                steps += s
            rep = []
            for j in range(min(o.repeats, len(measured))):
                g = measured[j]
                ctx.log(f"harp: repeat leaf {g} ({j + 1}/{o.repeats})")
                again, _, s = measure(int(g), ctx.seed + 1001 + j)
                steps += s
                rep.append((phi_hat[j], again))
        finally:
            model.unload()
        t_measure = time.perf_counter() - t1
        run_var = (np.mean([(a - c) ** 2 / 2 for a, c in rep], axis=0) if rep else np.zeros(D))
        for j, (a, c) in enumerate(rep):  # the measurement is the mean of the two runs
            phi_hat[j] = (a + c) / 2
        sigma2 = samp + run_var
        if rep:
            sigma2[: len(rep)] = samp[: len(rep)] + run_var / 2
        n_runs = len(measured) + len(rep)

        # steps 3 and 4
        post = eb_posterior(measured, phi_hat, sigma2, tree.leaf_parent, tree.parent_region)
        util = post.mean - o.risk * np.sqrt(post.var)
        greedy = greedy_select(util, b, o.envelope, sizes=sizes,
                               budget=o.budget if o.budget > 0 else None)
        chosen = greedy.chosen
        k = len(chosen)
        if o.budget and int(sizes.min()) > o.budget:
            ctx.log(f"harp: warning: every leaf is larger than budget={o.budget} examples, so "
                    "HARP chose none; lower leaf_size")

        leaf_mean = post.mean.mean(axis=1)
        spread = float(leaf_mean.std()) or 1.0
        leaf_score = 1.0 / (1.0 + np.exp(-np.clip(leaf_mean / spread, -30, 30)))
        leaf_score = np.minimum(leaf_score, 1.0 - 1e-9)
        for r, g in enumerate(chosen):
            leaf_score[g] = 1.0 + (k - r) / k
        scores = leaf_score[tree.leaf]
        n_chosen = int(sizes[chosen].sum())
        chosen_examples = (np.concatenate([members[g] for g in chosen]).astype(np.int64)
                           if k else np.zeros(0, dtype=np.int64))

        measured_table: list[Any] = [None] * tree.n_leaves
        for j, g in enumerate(measured):
            measured_table[int(g)] = _r(phi_hat[j])
        info: dict[str, Any] = {
            "envelope": o.envelope,
            "embedder": embedder,
            "n_selected_by_harp": n_chosen,
            "budget": o.budget or None,
            "fill": o.fill,
            "leaves_chosen": [int(g) for g in chosen],
            "train_evaluate_runs": n_runs,
            "train_steps": int(steps),
            "runs_reused_from_workdir": n_cached,
            "domains": dom_names,
            "target_examples_measured": len(target),
            "base_utility": _r(b),
            "sigma2_run_to_run": _r(run_var),
            "sigma2_mean": _r(sigma2.mean(axis=0)),
            "greedy_values": _r(greedy.values[: max(k + 5, 10)]),
            "tree": {
                "n_regions": int(tree.parent_region.max()) + 1,
                "n_parents": len(tree.parent_centres),
                "n_leaves": tree.n_leaves,
                "leaf_parent": tree.leaf_parent.tolist(),
                "parent_region": tree.parent_region.tolist(),
                "leaf_size": sizes.tolist(),
            },
            "leaves": {
                "measured": measured_table,
                "posterior_mean": [_r(x) for x in post.mean],
                "posterior_sd": [_r(x) for x in np.sqrt(post.var)],
            },
            "parents": {"mu": [_r(x) for x in post.mu_parent],
                        "tau2": [_r(x) for x in post.tau2_parent]},
            "seconds_tree": round(t_tree, 3),
            "seconds_measuring": round(t_measure, 3),
        }
        columns = {
            "harp_leaf": tree.leaf.astype(np.int64),
            "harp_parent": tree.parent.astype(np.int64),
            "harp_region": tree.region.astype(np.int64),
            "harp_posterior_mean": leaf_mean[tree.leaf],
        }
        return MethodResult(scores=scores, columns=columns, info=info,
                            chosen=None if o.fill else chosen_examples)


def _fixed_envelope(name: str, envelope: str) -> type[Harp]:
    """``harp`` with the envelope fixed: a method name of its own (``harp-c``, ``harp-e``),
    so benchmarks and the CLI can list both envelopes side by side."""

    def validate(self: HarpOptions) -> None:
        if self.envelope != envelope:
            raise OptionError(f"{name}: the envelope is fixed to {envelope!r}; use "
                              f"--method harp --envelope {self.envelope} instead")
        HarpOptions.validate(self)

    opts = dataclass(type(f"Harp{envelope.upper()}Options", (HarpOptions,), {
        "__annotations__": {"envelope": str}, "envelope": envelope, "validate": validate,
        "__doc__": HarpOptions.__doc__}))
    cls = type(f"Harp{envelope.upper()}", (Harp,), {
        "name": name, "Options": opts, "__module__": __name__,
        "description": f"harp with the HARP-{envelope.upper()} envelope"})
    return register(cls)


HarpC = _fixed_envelope("harp-c", "c")
HarpE = _fixed_envelope("harp-e", "e")


class _RunCache:
    """Finished train-evaluate runs in ``workdir/harp_runs-<fingerprint>.json``, so a killed
    run started again resumes, and runs with other envelopes or budgets (which do not change
    the measurements) reuse them. A run's key hashes the leaf's token ids and the run's seed; the file is
    only reused when the training options, the seed, the target and the untouched model's
    target losses (which identify the model) are the same."""

    def __init__(self, workdir, o: HarpOptions, seed: int, base_losses: np.ndarray,
                 dom: np.ndarray, *, dtype: str = "fp32") -> None:
        fp = {k: getattr(o, k) for k in ("steps", "lr", "batch_size", "lora_rank",
                                         "lora_alpha", "lora_dropout", "max_target")}
        # the model's dtype when not fp32 (fp32 runs keep the keys they had)
        extra = {} if dtype == "fp32" else {"dtype": dtype}
        self.fingerprint = fingerprint(
            {"o": fp, "seed": seed, **extra}, version="harp-runs-v0",
            blobs=[np.round(np.asarray(base_losses, dtype=np.float64), 5),
                   np.asarray(dom, dtype=np.int64)])
        self.path = (None if workdir is None
                     else Path(workdir) / f"harp_runs-{self.fingerprint[:16]}.json")
        self.runs: dict[str, Any] = {}
        if self.path is not None and self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
            except (OSError, ValueError):
                saved = {}
            if saved.get("fingerprint") == self.fingerprint:
                self.runs = saved.get("runs", {})

    @staticmethod
    def key(examples: Sequence[Any], seed: int) -> str:
        blobs = (b for e in examples for b in (np.asarray(e.input_ids, dtype=np.int64), b"|"))
        return fingerprint({"seed": seed}, version="harp-leaf-v0", blobs=blobs)

    def get(self, key: str):
        r = self.runs.get(key)
        if r is None:
            return None
        return np.array(r["phi"]), np.array(r["samp"]), int(r["steps"])

    def put(self, key: str, phi: np.ndarray, samp: np.ndarray, steps: int) -> None:
        if self.path is None:
            return
        from finesift.store import write_json

        self.runs[key] = {"phi": phi.tolist(), "samp": samp.tolist(), "steps": int(steps)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"fingerprint": self.fingerprint, "runs": self.runs})


def _r(x) -> list[float]:
    """A compact JSON list (6 significant digits)."""
    return [float(f"{v:.6g}") for v in np.asarray(x, dtype=np.float64).reshape(-1)]
