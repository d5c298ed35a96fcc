"""``perplexity``: the untouched model's token-averaged loss on each pool example.

loss(x) = -(1/T) sum_t log p_t over the label tokens t = 1..T (the loss fine-tuning on x
would minimise; perplexity = exp(loss)). ``order`` decides which end is selected first:

* ``lowest`` (default): the examples the model already finds most likely. The classic
  perplexity quality filter (e.g. CCNet's): garbled text, boilerplate dumps and text in
  a language or format the model does not know have high loss, so this end is the safe
  default for a noisy pool.
* ``highest``: the hardest examples first (the most to learn, but also the noisiest).
* ``middle``: closest to the pool's median loss first (Marion et al., arXiv 2309.04564,
  found middle-perplexity subsets competitive for pruning).

``proxy="iprox:RHO"`` (``--proxy``) takes the losses from an IProX proxy of the model
(:mod:`finesift.models.proxy`; built once, cached as for ``less``) instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from finesift.engine.scoring import mean_losses
from finesift.errors import OptionError, check_choice
from finesift.methods._proxy import check_proxy
from finesift.methods.base import Method, MethodContext, MethodResult, register
from finesift.methods.uncertainty import LogprobChunkScorer, forward_cost, forward_logprobs

ORDERS = ("lowest", "highest", "middle")


@dataclass
class PerplexityOptions:
    """Options of ``perplexity``.

    Attributes:
        order: ``lowest`` (default): lowest loss first; ``highest``: highest loss first;
            ``middle``: closest to the pool's median loss first.
        precision: precision of the forward pass: ``run`` (default: the run's
            ``--precision``), ``auto``, ``bf16`` or ``fp32``.
        proxy: ``""`` (default: the model itself) or ``iprox:RHO[,KEY=VALUE...]``: the
            forward pass runs on an IProX proxy of the model (see ``less``'s ``proxy``).
    """

    #: left out of benchmark records while unset (see ``option_identity``)
    unkeyed_defaults: ClassVar[tuple[str, ...]] = ("proxy",)

    order: str = "lowest"
    precision: str = "run"
    proxy: str = ""

    def validate(self) -> None:
        check_choice(self.order, ORDERS, "perplexity: order")
        if self.precision not in ("run", "auto", "bf16", "fp32"):
            raise OptionError(
                f"precision must be 'run', 'auto', 'bf16' or 'fp32', got {self.precision!r}"
            )
        check_proxy(self.proxy, "perplexity: ")


def order_scores(loss: np.ndarray, order: str) -> np.ndarray:
    """Scores (higher = first) from losses for ``order``."""
    if order == "lowest":
        return -loss
    if order == "highest":
        return loss.copy()
    if order == "middle":
        return -np.abs(loss - np.median(loss))
    raise ValueError(order)


@register
class Perplexity(Method):
    name = "perplexity"
    description = "the model's token-averaged loss on each example; lowest (default) or highest first"
    needs_model = True
    Options = PerplexityOptions
    shardable = True  # the loss of x depends on x and the untouched model only
    # workers run the forward pass over pool chunks; the coordinator turns the losses
    # into scores (order=middle's median of the whole pool included)
    chunk_scorer = LogprobChunkScorer
    cli_flags: ClassVar[dict[str, str]] = {"proxy": "proxy"}  # --proxy iprox:RHO

    def check_shardable(self) -> None:
        if self.options.order == "middle":
            raise OptionError(
                "perplexity with order=middle cannot score the pool in shards: its scores "
                "are distances to the median loss of the whole pool; use order=lowest or "
                "highest, or run it without --num-shards"
            )

    def cost(self, ctx: MethodContext):
        """One forward pass of the untouched model (or its proxy) over the pool."""
        self.options.validate()
        return forward_cost(ctx, self.options.precision, self.name, self.options.proxy)

    def score(self, ctx: MethodContext) -> MethodResult:
        self.options.validate()
        info: dict[str, Any] = {}
        logprobs, rows = forward_logprobs(ctx, self.options.precision, self.name,
                                          proxy=self.options.proxy, info=info)
        loss = mean_losses(logprobs)
        loss = np.nan_to_num(loss, nan=0.0)  # no label tokens: never produced by encoders
        return MethodResult(
            scores=order_scores(loss, self.options.order),
            columns={"loss": loss},
            info={"mean_loss": float(loss.mean()) if len(loss) else None, **info},
            rows=rows,
        )
