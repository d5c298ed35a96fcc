"""``random``: uniform, seeded selection (the baseline every method must beat)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finesift.methods.base import Method, MethodContext, MethodResult, register
from finesift.store import chunks
from finesift.store.chunks import shard_rows


@dataclass
class RandomOptions:
    """``random`` has no options; the run's seed decides."""


@register
class RandomMethod(Method):
    name = "random"
    description = "uniform random scores (seeded); the baseline"
    needs_model = False
    Options = RandomOptions
    shardable = True  # a shard takes its rows of the one seeded draw for the whole pool
    not_distributable_reason = "it does no per-example work (one seeded uniform draw)"

    def cost(self, ctx: MethodContext):
        """Nothing beyond one seeded draw."""
        from finesift.engine.cost import Cost

        return Cost()

    def score(self, ctx: MethodContext) -> MethodResult:
        rng = np.random.default_rng([ctx.seed, 0x5E1EC7])
        scores = rng.random(len(ctx.pool))
        if ctx.shard is None:
            return MethodResult(scores=scores)
        lengths = [ctx.task.length(e) for e in ctx.pool]
        rows = shard_rows(lengths, chunks.DEFAULT_CHUNK, ctx.shard)
        return MethodResult(scores=scores[rows], rows=rows)
