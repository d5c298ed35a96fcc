"""``uncertainty``: max-uncertainty selection (the ToV paper's baseline).

For a pool example with label tokens t = 1..T and p_t the untouched model's probability
of label token t (one forward pass),

    psi(x) = (1/T) sum_t log[p_t (1 - p_t)],

which peaks at p_t = 1/2 (psi = log 1/4) and falls off both where the model is sure of
the token and where it finds it unlikely. Higher psi = more uncertain = selected first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finesift.engine.scoring import token_logprobs
from finesift.errors import OptionError
from finesift.methods.base import Method, MethodContext, MethodResult, register

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
    """

    precision: str = "run"

    def validate(self) -> None:
        if self.precision not in ("run", "auto", "bf16", "fp32"):
            raise OptionError(
                f"precision must be 'run', 'auto', 'bf16' or 'fp32', got {self.precision!r}"
            )


def forward_logprobs(ctx: MethodContext, precision: str, desc: str) -> list[np.ndarray]:
    """Label-token log-probs of every pool example under ``ctx.model`` (one pass)."""
    if ctx.model is None:
        raise OptionError(f"{desc} needs the model, but none was loaded")
    return token_logprobs(
        ctx.model,
        ctx.task,
        ctx.pool,
        batch_size=ctx.batch_size,
        precision=ctx.precision if precision == "run" else precision,
        device=ctx.device,
        progress=ctx.progress,
        desc=desc,
    )


@register
class Uncertainty(Method):
    name = "uncertainty"
    description = "max-uncertainty: mean over label tokens of log[p(1-p)] under the model"
    needs_model = True
    Options = UncertaintyOptions

    def score(self, ctx: MethodContext) -> MethodResult:
        logprobs = forward_logprobs(ctx, self.options.precision, self.name)
        psi = uncertainty_scores(logprobs)
        loss = np.array([-float(np.mean(lp)) if len(lp) else 0.0 for lp in logprobs])
        return MethodResult(scores=psi, columns={"loss": loss})
