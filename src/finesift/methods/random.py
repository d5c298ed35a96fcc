"""``random``: uniform, seeded selection (the baseline every method must beat)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finesift.methods.base import Method, MethodContext, MethodResult, register


@dataclass
class RandomOptions:
    """``random`` has no options; the run's seed decides."""


@register
class RandomMethod(Method):
    name = "random"
    description = "uniform random scores (seeded); the baseline"
    needs_model = False
    Options = RandomOptions

    def score(self, ctx: MethodContext) -> MethodResult:
        rng = np.random.default_rng([ctx.seed, 0x5E1EC7])
        return MethodResult(scores=rng.random(len(ctx.pool)))
