"""The ``proxy`` option of the methods that can run on an IProX proxy of the model
(``less``, ``tracin``, ``tov``, ``perplexity``, ``uncertainty``): checking it, building the
proxy for a run (cached as :mod:`finesift.models.proxy` describes) and its cost for
``--estimate``. Workers rebuild a proxy with :func:`finesift.models.proxy.proxy_from_blob`
from the coordinator's :func:`finesift.models.proxy.proxy_blob`.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from finesift.errors import OptionError
from finesift.methods.base import MethodContext, model_identity
from finesift.models.proxy import IProxOptions, build_proxy, parse_proxy, proxy_cache_roots


def check_proxy(value: Any, who: str = "") -> IProxOptions | None:
    """The parsed ``proxy`` option (``None`` for ``""``), or a clear :class:`OptionError`
    (``who``, e.g. ``"tov: "``, prefixes the message of a value that is not a string)."""
    if not isinstance(value, str):
        raise OptionError(f"{who}proxy must be a string such as 'iprox:0.7', got {value!r}")
    return parse_proxy(value)


def run_proxy(ctx: MethodContext, spec: IProxOptions) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The IProX proxy of ``ctx.model`` for this run and its manifest figures
    (:func:`finesift.models.proxy.build_proxy`): a new model (``ctx.model`` is left as it
    was: bench and the API reuse it), probed on the seeded probe set of the whole pool
    (every shard run builds the same proxy). A run that keeps state (a work folder) keeps
    and reuses the proxy too: finesift's cache, else the work folder."""
    cache = proxy_cache_roots(ctx.workdir) if ctx.workdir is not None else None
    return build_proxy(
        ctx.model, ctx.task, ctx.pool, spec, model_task=ctx.model_task, seed=ctx.seed,
        batch_size=ctx.batch_size, device=ctx.device, cache=cache,
        model_id=None if ctx.model_spec is None else model_identity(ctx.model_spec),
        log=ctx.log)


def proxy_cost(ctx: MethodContext, spec: Any, lora: Any, cost: Any) -> None:
    """Add the IProX build (:func:`finesift.models.proxy.build_proxy`) to ``cost``: the
    covariance passes over the probe set (a forward and backward pass per group of layers
    whose accumulators fit ``cov_memory_mb``), IPSVD of every factored layer (Cholesky
    factors, whitening, the rank-r SVD of ``svd``, triangular solves; timed once per
    layer shape) and ``align_epochs`` epochs of gradient alignment over the probe set
    (the full model's gradients and the proxy's with a double backward: counted as three
    training steps). ``lora``: the adapter the training passes are calibrated with (the
    method's LoRA settings). The later passes run on the proxy but are timed on the full
    model (an upper bound where the proxy is cheaper). A cached proxy (loaded, not built)
    costs none of this; the estimate does not look for one."""
    from collections import Counter

    from finesift.engine.cost import (
        Pass,
        Probe,
        ProbeResult,
        lengths_of,
        parameter_bytes,
        shuffled_tokens,
    )
    from finesift.engine.cost import sorted_tokens as sorted_padded
    from finesift.engine.cost import timed as time_it
    from finesift.models import proxy as ipx

    ranks, _ = ipx.plan_ranks(ctx.model, spec)
    layers = ipx.proxy_targets(ctx.model)
    probe_idx = ipx.probe_indices(len(ctx.pool), spec, ctx.seed)
    lengths = lengths_of(ctx.task, [ctx.pool[i] for i in probe_idx])
    used, groups = 0, 1 if ranks else 0
    for name in ranks:
        size = 4 * (layers[name].in_features ** 2 + layers[name].out_features ** 2)
        if used and used + size > spec.cov_memory_mb * (1 << 20):
            groups, used = groups + 1, 0
        used += size
    shapes = Counter((layers[nm].out_features, layers[nm].in_features, r)
                     for nm, r in ranks.items())

    def measure_ipsvd() -> ProbeResult:
        total = 0.0
        smallest = min(shapes, key=lambda x: x[0] * x[1])
        for (out_f, in_f, r), count in [(smallest, 0), *shapes.items()]:  # warm-up first
            def one(out_f: int = out_f, in_f: int = in_f, r: int = r) -> None:
                # what build_proxy does per layer: Cholesky factors of both covariances,
                # whitening, the rank-r SVD (spec.svd), two triangular solves
                cov = ipx.Covariances(torch.eye(in_f, dtype=torch.float64) + 0.01,
                                      torch.eye(out_f, dtype=torch.float64) + 0.01, 1)
                ipx.ipsvd_factors(torch.randn(out_f, in_f), cov, r, spec.damping,
                                  dtype=torch.float32, svd=spec.svd, niter=spec.svd_niter,
                                  oversample=spec.svd_oversample)
            if count:
                total += count * time_it(one)
            else:
                one()
        return ProbeResult(total, detail=f"{len(shapes)} layer shape(s), {len(ranks)} layers")

    opts_rank = f"rho={spec.rho:g}"
    if groups:
        cost.passes.append(Pass(
            f"iprox: covariance passes, {groups} x {len(probe_idx)} probe examples",
            groups * sorted_padded(lengths, ctx.batch_size), kind="train", adapter=lora))
        cost.passes.append(Pass(f"iprox: IPSVD of {len(ranks)} layers ({opts_rank})", 1,
                                kind="probe", probe=Probe(
                                    f"IPSVD, {len(shapes)} layer shape(s) timed once each",
                                    measure_ipsvd, "build")))
    aligns = bool(groups and spec.align_epochs)
    if aligns:
        # timed on this machine, one real alignment step on the heaviest of the build's own
        # batches (a double backward through the proxy's gradients: its activations, not
        # the factored copy, are what a too-large step runs out of memory on)
        probe_lengths = [len(ctx.pool[i].input_ids) for i in probe_idx]
        steps = [b for epoch in ipx.alignment_batches(probe_lengths, spec, ctx.seed)
                 for b in epoch]

        def padded(batch: list[int]) -> int:
            return len(batch) * max(probe_lengths[i] for i in batch)

        heaviest = max(steps, key=padded)

        def measure_alignment() -> ProbeResult:
            batch = [ctx.pool[probe_idx[i]] for i in heaviest]
            return _time_alignment_step(ctx, ranks, spec, batch)

        cost.passes.append(Pass(
            f"iprox: gradient alignment, {spec.align_epochs} epoch(s) on the probe set, "
            f"{len(steps)} step(s) of at most {spec.align_tokens} tokens",
            sum(padded(b) for b in steps), kind="probe",
            probe=Probe(f"iprox alignment step, {padded(heaviest)} tokens ({len(heaviest)} x "
                        f"{padded(heaviest) // len(heaviest)}), rho={spec.rho:g}",
                        measure_alignment, "token")))
    if groups and spec.align_eval:
        # alignment_loss on the probe set after IPSVD and again after the alignment: the
        # model's and the proxy's gradients, no double backward
        n_evals = 2 if spec.align_epochs else 1
        tokens = shuffled_tokens(lengths, spec.align_batch_size, 1, seed=ctx.seed)
        cost.passes.append(Pass(
            f"iprox: alignment figures (align_eval), {n_evals} pass(es) over the probe set "
            "(x2: full model, proxy)", 2 * n_evals * tokens, kind="train",
            batch_size=spec.align_batch_size, adapter=lora))
    factor = sum(r * (layers[nm].in_features + layers[nm].out_features) for nm, r in ranks.items())
    cost.disk["IProX proxy (cache)"] = 4.0 * factor
    if not aligns:  # else the alignment probe holds the copy, and its peak is measured
        _, model_bytes = parameter_bytes(ctx.model)
        cost.memory["IProX proxy (a factored copy of the model)"] = float(model_bytes)
    cost.notes.append("iprox: the passes on the proxy are timed on the full model")


def _time_alignment_step(ctx: MethodContext, ranks: dict[str, int], spec: Any,
                         batch: list[Any]) -> Any:
    """Seconds per padded token of one IProX alignment step on ``batch``: a factored copy
    of the model with seeded small random factors (the step's work and memory do not depend
    on their values, so no covariances or IPSVD are needed), one untimed step (warm-up, and
    the memory peak the estimate reads), then one timed. The model is left as it was."""
    from finesift.engine.cost import ProbeResult, synchronize
    from finesift.models import proxy as ipx

    model = ctx.model
    proxy = ipx.factorize(model, ranks, init="none")
    gen = torch.Generator().manual_seed(int(ctx.seed))
    with torch.no_grad():
        for mod in ipx.unwrap(proxy).modules():
            if isinstance(mod, ipx.FactoredLinear):
                for w in (mod.up.weight, mod.down.weight):
                    w.copy_(torch.randn(w.shape, generator=gen, dtype=torch.float32) * 0.02)
    pairs = ipx.factored_pairs(model, proxy)
    _, opt = ipx.alignment_optimizer(proxy, pairs, spec)
    was_training = model.training
    model.eval()
    tokens = len(batch) * max(len(ex.input_ids) for ex in batch)
    try:
        step = {"model_task": ctx.model_task, "opts": spec, "opt": opt, "device": ctx.device}
        ipx.align_step(model, proxy, pairs, ctx.task, batch, **step)
        synchronize(ctx.device)
        t0 = time.perf_counter()
        ipx.align_step(model, proxy, pairs, ctx.task, batch, **step)
        synchronize(ctx.device)
        took = time.perf_counter() - t0
    finally:
        model.train(was_training)
        del proxy, opt, pairs
    return ProbeResult(took / tokens, detail=f"one step of {tokens} tokens, {took:.2f} s "
                                             "(a factored copy with random factors)")
