"""IProX influence-preserving proxies (Chen et al., arXiv 2602.17835, ICLR 2026).

A proxy is a low-rank factorisation of the target model itself, on which ``less`` or
``tracin`` then run (``--proxy iprox:RHO``):

* every ``nn.Linear`` of the attention and MLP blocks, W (m x n), becomes a
  :class:`FactoredLinear` ``A (m x r) @ B (r x n)`` (+ the original bias), with
  r = round((1 - rho) * m * n / (m + n)) rounded up to a multiple of ``block_size``
  (:func:`proxy_rank`); embeddings, the LM head and classification heads stay as they are.
* Stage 1, IPSVD (:func:`ipsvd_factors`): A and B minimise
  ||C_delta^{1/2} (W - A B) C_h^{1/2}||_F, with C_h = E[h h^T] over the layer's inputs
  and C_delta = E[delta delta^T] over the gradients of the model's loss w.r.t. the
  layer's outputs, both estimated on a seeded probe set drawn from the pool
  (:func:`layer_covariances`). The covariances are damped (+ ``damping`` x their mean
  eigenvalue), W is whitened, W~ = C_delta^{1/2} W C_h^{1/2} = P S Q^T (truncated SVD),
  and A = C_delta^{-1/2} P_r S_r^{1/2}, B = S_r^{1/2} Q_r^T C_h^{-1/2} (singular values
  split symmetrically, as in the reference code). By Eckart-Young this is the exact
  minimiser of the damped weighted error. The square roots can be taken by
  eigendecomposition (``whitening="eigh"``); by default Cholesky factors are used, which
  give the same A and B (see :func:`ipsvd_factors`) for far less work. The rank-r SVD of
  the whitened matrix is randomized by default (``svd="randomized"``: a seeded range
  finder with ``svd_niter`` power iterations, :func:`randomized_svd`), whose weighted
  error is within a few per cent of the exact one (``svd="exact"``; 1.002-1.021x on
  SmolLM2's layer shapes with synthetic covariances) and which costs less the smaller r
  is (one core: 576 x 576 at rho 0.5, 41 against 90 ms; at rho 0.9, 22 against 79 ms;
  the 1536-wide layers, where the whitening product and the 1536 x 1536 Cholesky factor
  weigh as much as the SVD, 0.6-1x). The Cholesky factors (tens of ms at d = 1536) are
  kept. The factored copy is no longer initialised by a full SVD of every W before IPSVD
  overwrites it (:func:`factorize` ``init="none"``), which was more than half of the
  stage's former cost.
* Stage 2, gradient alignment (:func:`align_proxy`): ``align_epochs`` epochs of AdamW on
  the factors only, over the probe set, minimising
  mean over factored layers of 0.5 * [(1 - cos(grad_A, grad_W B^T)) + (1 - cos(grad_B, A^T grad_W))]
  + lambda * tau^2 * KL(target || proxy) on the label-position logits at temperature tau,
  where grad_A, grad_B are the proxy's factor gradients (kept in the graph: a double
  backward) and grad_W the full model's weight gradient on the same batch.

Where this differs from the reference code (csr16/IProX):

* Rank rule: a layer is kept full where r >= min(m, n) (as in the reference) **and also**
  where the factors would not have fewer parameters than W (r (m + n) >= m n), and every
  layer is kept full at rho = 0. Without this, rho = 0 would factor every layer at about
  half its rank for no saving; with it, rho = 0 reproduces the model exactly. Ranks are
  rounded up to the block multiple, as in the reference.
* Covariances: the reference whitens with thin SVDs of the probe matrices, which restricts
  W to the span of at most ``max_probes`` probe tokens, with an absolute ridge of 1e-3.
  Here the full covariances are used (no restriction to the probe span) and the damping
  is relative to the mean eigenvalue (scale-free: the loss scale does not change the
  product A B). The split of A B between A and B is not scale-free: A carries
  C_delta^{-1/2} and B C_h^{-1/2}, so where output gradients are small against inputs A
  is large and B small, by a ratio that varies from layer to layer (0.1 to 3e4 on the
  tiny test Llama). ``split`` (:func:`split_factors`) can re-split the product after
  IPSVD (``symmetric`` or ``adapted``); the default ``ipsvd`` keeps IPSVD's factors.
* Probe tokens: the reference samples k tokens per sequence from the non-padding ones and
  caps each layer at ``max_probes`` columns; so does this (``probe_tokens``), seeded.
* One probe set (``probe_examples`` pool examples) serves both stages; the reference
  draws a 1% sample of the training data and uses a 10% split of it for IPSVD and the
  rest for alignment.
* Stage 2 defaults: the reference's AdamW (lr 1e-4, weight decay 0.01) and tau = 2;
  2 epochs instead of its 5 (CPU cost; ``align_epochs``); lambda = 0.1 (its function's
  default; its script's default is 0). The proxy runs in eval mode (no dropout).
* The model's loss is finesift's: the mean over examples of each example's token-averaged
  label NLL (the loss ``less`` differentiates). The KL term is averaged over label tokens,
  as in the reference.
* LoRA on the proxy (decided here; the reference repository does not show its LESS
  step): the warm-up adapter goes on ONE factor of each factored layer and on every
  kept-full linear, so the proxy has exactly one adapted linear per adapted linear of
  the model. The adapted factor is the one whose adapter is smaller: ``down`` (B,
  r x n) where the layer widens (n < m: gate/up projections), else ``up`` (A, m x r;
  square and narrowing layers, the output factor on ties), i.e. rank x (min(m, n) + r)
  LoRA parameters instead of the model's rank x (m + n) (r < min(m, n), so always fewer),
  and per-example gradients and projections cost less in proportion. Only that factor
  is an ``nn.Linear`` (the other is a :class:`Factor`), so LoRA's ``all-linear`` and
  the per-example gradient code see one linear per layer. The LoRA gradients of a
  factor are linear images of that factor's gradient, which Stage 2 aligns with the
  full model's (grad_A ~ grad_W B^T, grad_B ~ A^T grad_W; both are aligned, as in the
  reference, since both shape the proxy's forward pass).
* Cache: a built proxy is kept (atomically) as ``iprox-<key>.pt`` in finesift's cache
  (``$FINESIFT_CACHE/iprox``), or in the run's work folder where that is not writable,
  keyed by the model (its identity and a digest of its weights), the options that
  change the result, the seed, the batch size and the probe examples' tokens
  (:func:`proxy_key`); a run with the same inputs loads it instead of building it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from finesift.engine.batching import shuffled_batches, sorted_batches
from finesift.engine.tasks import Task, task_class, unwrap
from finesift.errors import OptionError, check_choice
from finesift.store.files import atomic_save_torch

_CACHE_VERSION = 2  # 2: one adapted factor per layer (Factor), keyed by model and probe
#: how IPSVD takes the rank-r SVD of the whitened layer
SVD_MODES = ("randomized", "exact")
#: how the rank-r product A B is split between the factors (:func:`split_factors`)
SPLITS = ("ipsvd", "symmetric", "adapted")
#: names of heads that are never factored (they are not part of the attention/MLP blocks)
_HEAD_NAMES = ("lm_head", "classifier", "score", "pooler", "cls", "qa_outputs")


# -- options ---------------------------------------------------------------------------


@dataclass
class IProxOptions:
    """How an IProX proxy is built.

    Attributes:
        rho: compression ratio in [0, 1): a factored layer keeps about (1 - rho) of W's
            parameters (default 0.5). 0 keeps every layer full (the proxy is the model).
        block_size: ranks are rounded up to a multiple of this (default 8).
        probe_examples: pool examples drawn (seeded) for the probe set of both stages
            (default 64).
        probe_tokens: at most this many tokens per layer enter the covariance estimates
            (sampled per sequence among non-padding tokens; default 4096).
        damping: added to every eigenvalue of C_h and C_delta, relative to their mean
            eigenvalue, before the square roots (default 0.01).
        align_epochs: Stage 2 epochs over the probe set (default 2; 0 = IPSVD only).
        align_lr: AdamW learning rate of Stage 2 (default 1e-4, the reference's).
        align_weight_decay: AdamW weight decay of Stage 2 (default 0.01, the reference's).
        align_batch_size: probe examples per Stage 2 step (default 8).
        align_tokens: a Stage 2 step also holds at most this many tokens (rows x longest
            example; default 1024, at least one example a step). Stage 2 differentiates
            through the proxy's gradients, which keeps several copies of the activations:
            8 examples of 256 tokens of SmolLM2-135M ran a 24 GB machine out of memory,
            8 of 128 tokens peaked at 12 GB.
        kl_weight: lambda, the weight of tau^2 KL(target || proxy) (default 0.1).
        tau: the KL temperature (default 2).
        cov_memory_mb: covariance accumulators of at most this size are held at once;
            layers are split into groups, one probe pass each (default 2048; does not
            change the proxy, so it is not part of the cache key).
        svd: the rank-r SVD of the whitened layer in IPSVD: ``randomized`` (default; a
            seeded randomized range finder, :func:`randomized_svd`) or ``exact``.
        svd_niter: power iterations of the randomized SVD (default 2).
        svd_oversample: extra sketch columns of the randomized SVD (default 16); where
            r + this reaches min(m, n) the exact SVD is used (it is then as cheap).
        split: how each factored layer's product A B is split between A and B after
            IPSVD (:func:`split_factors`): ``ipsvd`` (default; as IPSVD gives them, with
            the covariances' scales), ``symmetric`` (U Sigma^1/2, Sigma^1/2 V^T) or
            ``adapted`` (the factor with the LoRA adapter carries Sigma, the other is
            orthonormal). Does not change the proxy's outputs; changes its adapter's
            gradients and Stage 2.
        align_eval: also evaluate the Stage 2 objective on the probe set right after
            IPSVD and after the alignment (:func:`alignment_loss` with its per-layer
            breakdown; ``proxy_align_before`` / ``proxy_align_after`` in the build's
            figures). Costs one pass over the probe set each (the model's and the proxy's
            gradients, no double backward; one pass in all when ``align_epochs`` is 0);
            does not change the proxy, so it is not part of the cache key (default off).
    """

    rho: float = 0.5
    block_size: int = 8
    probe_examples: int = 64
    probe_tokens: int = 4096
    damping: float = 0.01
    align_epochs: int = 2
    align_lr: float = 1e-4
    align_weight_decay: float = 0.01
    align_batch_size: int = 8
    align_tokens: int = 1024
    kl_weight: float = 0.1
    tau: float = 2.0
    cov_memory_mb: int = 2048
    svd: str = "randomized"
    svd_niter: int = 2
    svd_oversample: int = 16
    split: str = "ipsvd"
    align_eval: bool = False

    def validate(self) -> None:
        if not 0 <= self.rho < 1:
            raise OptionError(f"iprox: rho must be in [0, 1), got {self.rho}")
        if min(self.block_size, self.probe_examples, self.probe_tokens,
               self.align_batch_size, self.align_tokens, self.cov_memory_mb) < 1:
            raise OptionError(
                "iprox: block_size, probe_examples, probe_tokens, align_batch_size, "
                "align_tokens and cov_memory_mb must be >= 1"
            )
        if self.align_epochs < 0:
            raise OptionError("iprox: align_epochs must be >= 0")
        check_choice(self.svd, SVD_MODES, "iprox: svd")
        check_choice(self.split, SPLITS, "iprox: split")
        if self.svd_niter < 0 or self.svd_oversample < 0:
            raise OptionError("iprox: svd_niter and svd_oversample must be >= 0")
        if not self.damping > 0:
            raise OptionError("iprox: damping must be > 0")
        if not (self.align_lr > 0 and self.tau > 0 and self.kl_weight >= 0
                and self.align_weight_decay >= 0):
            raise OptionError("iprox: align_lr and tau must be > 0, kl_weight and "
                              "align_weight_decay >= 0")


def parse_proxy(spec: str) -> IProxOptions | None:
    """Parse a ``proxy`` option: ``""`` (no proxy) or ``iprox:RHO[,KEY=VALUE...]`` with KEY
    an :class:`IProxOptions` field, e.g. ``iprox:0.7``, ``iprox:0.5,align_epochs=1,block_size=16``
    or ``iprox:0.5,svd=exact``."""
    spec = (spec or "").strip()
    if not spec:
        return None
    usage = "expected iprox:RHO with 0 <= RHO < 1, e.g. iprox:0.7 (or iprox:0.7,align_epochs=1)"
    kind, sep, rest = spec.partition(":")
    if kind.strip().lower() != "iprox" or not sep or not rest.strip():
        raise OptionError(f"proxy {spec!r}: {usage}")
    parts = [p.strip() for p in rest.split(",")]
    try:
        rho = float(parts[0])
    except ValueError:
        raise OptionError(f"proxy {spec!r}: RHO {parts[0]!r} is not a number; {usage}") from None
    if not math.isfinite(rho):
        raise OptionError(f"proxy {spec!r}: {usage}")
    known = {f.name: f for f in fields(IProxOptions)}
    values: dict[str, Any] = {"rho": rho}
    defaults = IProxOptions()
    for item in parts[1:]:
        key, eq, val = item.partition("=")
        key = key.strip()
        if not eq or key not in known or key == "rho":
            raise OptionError(
                f"proxy {spec!r}: {item!r} is not KEY=VALUE with KEY one of "
                f"{', '.join(k for k in known if k != 'rho')}"
            )
        typ = type(getattr(defaults, key))
        val = val.strip()
        if typ is bool:  # bool("0") is True: spell the flags out
            flag = {"1": True, "true": True, "yes": True, "on": True,
                    "0": False, "false": False, "no": False, "off": False}.get(val.lower())
            if flag is None:
                raise OptionError(f"proxy {spec!r}: {key}={val!r} is not a flag (1 or 0)")
            values[key] = flag
            continue
        try:
            values[key] = typ(float(val)) if typ is int and "." not in val else typ(val)
        except ValueError:
            raise OptionError(f"proxy {spec!r}: {key}={val!r} is not a number") from None
    opts = IProxOptions(**values)
    try:
        opts.validate()
    except OptionError as e:
        raise OptionError(f"proxy {spec!r}: {e}") from None
    return opts


# -- the factored layer ----------------------------------------------------------------


def proxy_rank(m: int, n: int, rho: float, block_size: int = 8) -> int | None:
    """The rank of W (m x n) in a proxy of compression ``rho``, or ``None`` where the
    layer stays full.

    r = round((1 - rho) m n / (m + n)), rounded up to a multiple of ``block_size``
    (at least one block); ``None`` where r >= min(m, n) or the factors would not be
    smaller than W (r (m + n) >= m n), and always for rho = 0 (no compression: rounding
    r to the nearest integer could otherwise factor a layer for a saving of a few
    parameters).
    """
    if rho <= 0:
        return None
    raw = round((1 - rho) * m * n / (m + n))
    r = max(1, math.ceil(raw / block_size)) * block_size
    if r >= min(m, n) or r * (m + n) >= m * n:
        return None
    return r


def lora_factor(out_features: int, in_features: int) -> str:
    """The factor of a factored W (m x n) that carries the LoRA adapter: ``"down"`` (B,
    r x n; an adapter of rank k has k (n + r) parameters) where n < m, else ``"up"``
    (A, m x r; k (r + m) parameters). Either way fewer than the k (m + n) of an adapter
    on W, and the smaller of the two; on ties (square layers) the output factor, whose
    adapter writes to the layer's own output space, as the model's does."""
    return "down" if in_features < out_features else "up"


class Factor(torch.nn.Module):
    """A factor that takes no LoRA adapter: ``x W^T (+ b)`` like ``nn.Linear``, but not
    one, so LoRA's target lists and the per-example gradient code pass it by."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 dtype: torch.dtype = torch.float32, device: Any = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=dtype,
                                                     device=device))
        self.bias = (torch.nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class FactoredLinear(torch.nn.Module):
    """``y = A (B x) + b``: ``down`` (B, r x n, no bias) then ``up`` (A, m x r, with
    the original layer's bias). The factor named by :func:`lora_factor` (``adapted``) is
    an ``nn.Linear``, so LoRA and the per-example gradient code see it as an ordinary
    linear layer; the other is a :class:`Factor`."""

    finesift_factored = True

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool,
                 dtype: torch.dtype = torch.float32, device: Any = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.adapted = lora_factor(out_features, in_features)
        down = torch.nn.Linear if self.adapted == "down" else Factor
        up = torch.nn.Linear if self.adapted == "up" else Factor
        self.down = down(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = up(rank, out_features, bias=bias, dtype=dtype, device=device)

    @property
    def A(self) -> torch.nn.Parameter:
        return self.up.weight

    @property
    def B(self) -> torch.nn.Parameter:
        return self.down.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, adapted={self.adapted}")


def proxy_targets(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The linears of the attention and MLP blocks: every ``nn.Linear`` except the
    output embeddings (LM head) and heads (classifier, score, pooler)."""
    base = unwrap(model)
    out_emb = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    out: dict[str, torch.nn.Linear] = {}
    for name, mod in base.named_modules():
        if not isinstance(mod, torch.nn.Linear) or mod is out_emb:
            continue
        if any(part in _HEAD_NAMES for part in name.split(".")):
            continue
        out[name] = mod
    return out


def _set_module(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def proxy_tag(model: torch.nn.Module) -> str:
    """The cache-format version and the model's class, size and config, for the name of a
    cached proxy (so another model never loads it)."""
    import hashlib

    cfg = getattr(unwrap(model), "config", None)
    text = cfg.to_json_string(use_diff=False) if hasattr(cfg, "to_json_string") else ""
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"iprox-v{_CACHE_VERSION}|{type(unwrap(model)).__name__}|{param_count(model)}|{digest}"


def param_count(model: torch.nn.Module) -> int:
    """Parameters of a model (shared/tied tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


# -- batches and losses ----------------------------------------------------------------


def label_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], model_task: Any):
    """``(logits, targets, row)`` at every label position: the task's own
    :meth:`~finesift.engine.tasks.CausalLMTask.label_logits` (the LM head only on positions
    that predict a label) or the token classifier's."""
    return task_class(model_task).label_logits(model, batch)


def batch_loss(logits: torch.Tensor, targets: torch.Tensor, row: torch.Tensor, n: int):
    """Mean over the ``n`` rows of each row's token-averaged label NLL."""
    nll = F.cross_entropy(logits, targets, reduction="none")
    counts = torch.bincount(row, minlength=n).clamp_min(1).float()
    per = torch.zeros(n, device=nll.device).index_add(0, row, nll) / counts
    return per.mean()


def _math_sdpa():
    """Scaled-dot-product attention on the math backend (it has a double backward)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # pragma: no cover - old torch
        import contextlib

        return contextlib.nullcontext()


class _grads_on:
    """Temporarily set ``requires_grad`` on some parameters (restored on exit)."""

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.params = list(params)

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(True)
        return self

    def __exit__(self, *exc):
        for p, f in zip(self.params, self.flags, strict=True):
            p.requires_grad_(f)


# -- Stage 1: covariances and IPSVD ----------------------------------------------------


@dataclass
class Covariances:
    """E[h h^T] (n x n) over a layer's inputs and E[delta delta^T] (m x m) over its
    output gradients, with the number of tokens each was estimated from."""

    c_h: torch.Tensor
    c_delta: torch.Tensor
    tokens: int


def _probe_positions(batch: dict[str, torch.Tensor], k: int, gen: torch.Generator):
    """A (B, T) mask of at most ``k`` random non-padding positions per row."""
    mask = batch["attention_mask"].bool()
    out = torch.zeros_like(mask)
    for i in range(mask.shape[0]):
        valid = torch.nonzero(mask[i], as_tuple=True)[0]
        if len(valid) > k:
            valid = valid[torch.randperm(len(valid), generator=gen)[:k]]
        out[i, valid] = True
    return out


def layer_covariances(
    model: torch.nn.Module,
    task: Task,
    examples: Sequence[Any],
    layers: dict[str, torch.nn.Linear],
    *,
    model_task: str,
    probe_tokens: int = 4096,
    batch_size: int = 8,
    seed: int = 0,
    memory_mb: int = 2048,
    device: str = "cpu",
) -> dict[str, Covariances]:
    """C_h and C_delta of every layer in ``layers`` on ``examples``.

    delta is the gradient of :func:`batch_loss` (times the batch size: the sum of
    per-example losses, so every example weighs the same) w.r.t. the layer output. At
    most ``probe_tokens`` tokens per layer are used (k = ceil(probe_tokens / n) random
    non-padding tokens per sequence, seeded). Layers that read the same input tensor
    (q/k/v, gate/up) share one C_h. Accumulators of at most ``memory_mb`` are held at
    once; more layers mean more passes over the examples. ``model`` is not changed
    (``requires_grad`` flags are restored).
    """
    names = list(layers)
    k = max(1, math.ceil(probe_tokens / max(1, len(examples))))
    # groups of layers whose accumulators fit the memory budget (float32)
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        mod = layers[name]
        size = 4 * (mod.in_features**2 + mod.out_features**2)
        if groups[-1] and used + size > memory_mb * (1 << 20):
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    lengths = [task.length(e) for e in examples]
    order = sorted_batches(examples, lengths, batch_size=batch_size, max_tokens=4096)
    result: dict[str, Covariances] = {}
    was_training = model.training
    model.eval()
    try:
        for group in groups:
            result.update(_covariance_pass(model, task, examples, order, layers, group, k,
                                           probe_tokens, seed, model_task, device))
    finally:
        model.train(was_training)
    return result


def _covariance_pass(model, task, examples, order, layers, group, k, probe_tokens, seed,
                     model_task, device) -> dict[str, Covariances]:
    gen = torch.Generator().manual_seed(seed)
    sh: dict[str, torch.Tensor] = {}
    sd: dict[str, torch.Tensor] = {}
    count = {n: 0 for n in group}
    alias: dict[str, str] = {}  # layer -> the layer whose C_h it shares
    state: dict[str, Any] = {}
    handles = []

    def make_hook(name: str):
        def fwd(mod, inputs, output):
            x = inputs[0]
            key = (x.data_ptr(), tuple(x.shape))
            first = state["inputs"].setdefault(key, name)
            if state["first_batch"] and first != name:
                alias[name] = first
            take = min(state["n_pos"], probe_tokens - count[name])
            if take <= 0:
                return
            if name not in alias:
                h = x.detach()[state["pos"]][:take].float()
                acc = sh.get(name)
                sh[name] = h.T @ h if acc is None else acc.addmm_(h.T, h)
            if output.requires_grad:
                state["outputs"].append((name, output, take))
            count[name] += take
        return fwd

    for name in group:
        handles.append(layers[name].register_forward_hook(make_hook(name)))
    weights = [layers[n].weight for n in group]
    try:
        with _grads_on(weights), torch.enable_grad():
            for b, idx in enumerate(order):
                if all(count[n] >= probe_tokens for n in group):
                    break
                batch = {kk: v.to(device) for kk, v in task.collate([examples[i] for i in idx]).items()}
                pos = _probe_positions(batch, k, gen).to(device)
                state.update(pos=pos, n_pos=int(pos.sum()), inputs={}, outputs=[],
                             first_batch=b == 0)
                logits, tgt, row = label_logits(model, batch, model_task)
                loss = batch_loss(logits, tgt, row, len(idx)) * len(idx)
                outs = state.pop("outputs")
                if not outs:
                    continue
                # gradients w.r.t. the layer outputs only (no weight gradients computed)
                deltas = torch.autograd.grad(loss, [o for _, o, _ in outs], allow_unused=True)
                for (name, out, take), g in zip(outs, deltas, strict=True):
                    g = torch.zeros_like(out) if g is None else g
                    d = g.detach()[pos][:take].float()
                    acc = sd.get(name)
                    sd[name] = d.T @ d if acc is None else acc.addmm_(d.T, d)
                del outs, deltas, loss, logits
    finally:
        for h in handles:
            h.remove()
    out = {}
    c_h: dict[str, torch.Tensor] = {}
    for name in group:
        toks = count[name]
        src = alias.get(name, name)
        if toks == 0 or (src not in sh and src not in c_h) or name not in sd:
            raise OptionError(f"iprox: no probe tokens reached layer {name!r}")
        if src not in c_h:  # layers reading the same input share one tensor
            c_h[src] = sh.pop(src).double() / count[src]
        out[name] = Covariances(c_h[src], sd.pop(name).double() / toks, toks)
    return out


def damped_sqrt(c: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S^-1)``: the symmetric square root of ``c + damping * mean_eig(c) I`` and its
    inverse, by eigendecomposition (float64)."""
    c = c.double()
    c = 0.5 * (c + c.T)
    lam = damping * max(float(torch.diagonal(c).mean()), 1e-30)  # mean eigenvalue
    s, U = torch.linalg.eigh(c)
    s = s.clamp_min(0) + lam
    r = s.sqrt()
    return (U * r) @ U.T, (U / r) @ U.T


def damped_cholesky(c: torch.Tensor, damping: float,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The Cholesky factor L (lower) of ``c + damping * mean_eig(c) I`` (in ``dtype``);
    the mean eigenvalue is trace / n."""
    c = c.to(dtype)
    c = 0.5 * (c + c.T)
    lam = damping * max(float(torch.diagonal(c).mean()), 1e-30)
    return torch.linalg.cholesky(c + lam * torch.eye(len(c), dtype=c.dtype))


def ipsvd_factors(W: torch.Tensor, cov: Covariances, rank: int, damping: float = 0.01,
                  roots: dict[int, Any] | None = None, whitening: str = "cholesky",
                  dtype: torch.dtype = torch.float64, *, svd: str = "exact", niter: int = 2,
                  oversample: int = 16, seed: int = 0,
                  timing: dict[str, float] | None = None):
    """IPSVD: ``(A, B)`` of rank ``rank`` minimising ||S_delta (W - A B) S_h||_F with S the
    damped symmetric square roots of the covariances (float64).

    ``whitening="eigh"`` whitens with the square roots themselves (eigendecomposition):
    W~ = S_d W S_h = P Sigma Q^T, A = S_d^-1 P_r Sigma_r^1/2, B = Sigma_r^1/2 Q_r^T S_h^-1.
    ``"cholesky"`` (default) whitens with the Cholesky factors of the same damped
    covariances, C = L L^T. L^T = U S for an orthogonal U, so L_d^T W L_h = U_d W~ U_h^T
    has the singular values of W~ and singular vectors U_d P, U_h Q, and
    A = L_d^-T U_d P_r Sigma_r^1/2 = S_d^-1 P_r Sigma_r^1/2: the same factors (up to the
    signs of singular vectors), at a fraction of the cost (no eigendecompositions of the
    up to 1536 x 1536 covariances of SmolLM2's MLP). ``roots`` caches the whitening
    factors by covariance tensor (layers that share an input share C_h). ``dtype``: the
    precision of the Cholesky path (:func:`build_proxy` uses float32, twice as fast; the
    damping bounds the condition number).

    ``svd``: how the rank-r SVD of the whitened matrix is taken on the Cholesky path:
    ``"exact"`` (default here; :func:`top_svd`, float64) or ``"randomized"``
    (:func:`randomized_svd` in ``dtype`` with ``niter`` power iterations, ``oversample``
    extra columns and the sketch seeded by ``seed``; what :func:`build_proxy` uses by
    default). ``timing``: seconds of the steps (``cholesky``, ``whiten``, ``svd``,
    ``solve``) are added to it.
    """
    roots = {} if roots is None else roots
    W = W.detach()
    if whitening not in ("cholesky", "eigh"):
        raise OptionError(f"whitening must be 'cholesky' or 'eigh', got {whitening!r}")
    check_choice(svd, SVD_MODES, "svd")
    clock = _StepClock(timing)
    for c in (cov.c_h, cov.c_delta):
        if (id(c), whitening) not in roots:
            roots[(id(c), whitening)] = (damped_cholesky(c, damping, dtype)
                                         if whitening == "cholesky" else damped_sqrt(c, damping))
    clock("cholesky")
    Wd = W.double() if whitening == "eigh" else W.to(dtype)
    if whitening == "eigh":
        S_h, S_h_inv = roots[(id(cov.c_h), "eigh")]
        S_d, S_d_inv = roots[(id(cov.c_delta), "eigh")]
        P, sv, Qh = torch.linalg.svd(S_d @ Wd @ S_h, full_matrices=False)
        root = sv[:rank].sqrt()
        return S_d_inv @ (P[:, :rank] * root), (root[:, None] * Qh[:rank]) @ S_h_inv
    L_h = roots[(id(cov.c_h), "cholesky")]
    L_d = roots[(id(cov.c_delta), "cholesky")]
    M = L_d.T @ Wd @ L_h
    clock("whiten")
    if svd == "randomized" and rank + oversample < min(M.shape):
        P, sv, Qh = randomized_svd(M, rank, niter=niter, oversample=oversample, seed=seed)
    else:  # exact, or a sketch as wide as M (then the exact SVD costs no more)
        P, sv, Qh = top_svd(M, rank)
    clock("svd")
    root = sv.sqrt()
    # A = L_d^-T P_r Sigma^1/2 (solve L_d^T A = .), B = Sigma^1/2 Q_r^T L_h^-1 (B L_h = .)
    A = torch.linalg.solve_triangular(L_d.T, (P * root).to(dtype), upper=True)
    B = torch.linalg.solve_triangular(L_h, (root[:, None] * Qh).to(dtype), upper=False,
                                      left=False)
    clock("solve")
    return A, B


class _StepClock:
    """``clock(step)`` adds the seconds since the previous call to ``timing[step]`` (a
    no-op without ``timing``)."""

    def __init__(self, timing: dict[str, float] | None) -> None:
        self.timing = timing
        self.last = time.perf_counter()

    def __call__(self, step: str) -> None:
        if self.timing is not None:
            now = time.perf_counter()
            self.timing[step] = self.timing.get(step, 0.0) + now - self.last
            self.last = now


def randomized_svd(M: torch.Tensor, rank: int, *, niter: int = 2, oversample: int = 16,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``rank`` leading singular triplets ``(P_r, s_r, Q_r^T)`` of M (m x n),
    approximately, by a randomized range finder (Halko, Martinsson and Tropp 2011, Alg.
    4.4 with Alg. 5.1): an orthonormal basis Q of M Omega for a seeded Gaussian Omega of
    rank + ``oversample`` columns, refined by ``niter`` power iterations (re-orthonormalised
    at each half step, so small singular values are not lost to rounding), then the exact
    SVD of the small matrix Q^T M. Costs about (2 niter + 2) m n (rank + oversample) FLOPs
    against O(m n min(m, n)) for a full SVD. Computed in M's dtype; the sketch comes from
    its own generator (the global RNG is not touched)."""
    m, n = M.shape
    width = min(rank + oversample, m, n)
    gen = torch.Generator(device=M.device).manual_seed(int(seed))
    omega = torch.randn(n, width, generator=gen, dtype=M.dtype, device=M.device)
    Q = torch.linalg.qr(M @ omega).Q
    for _ in range(niter):
        Q = torch.linalg.qr(M.T @ Q).Q
        Q = torch.linalg.qr(M @ Q).Q
    U, s, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
    return Q @ U[:, :rank], s[:rank], Vh[:rank]


def top_svd(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``rank`` leading singular triplets ``(P_r, s_r, Q_r^T)`` of M, from the
    eigendecomposition of the Gram matrix of its smaller side (float64): a few times
    faster than a full SVD on CPU, and exact up to rounding for the leading triplets
    (error ~ eps * (s_1 / s_i)^2 with eps = 1e-16)."""
    M = M.double()
    tall = M.shape[0] >= M.shape[1]
    G = M.T @ M if tall else M @ M.T
    e, V = torch.linalg.eigh(G)  # ascending
    e, V = e.flip(0)[:rank], V.flip(1)[:, :rank]
    s = e.clamp_min(0).sqrt()
    inv = 1.0 / s.clamp_min(1e-12 * max(float(s[0]) if len(s) else 1.0, 1e-300))
    if tall:  # V = Q_r, P_r = M Q_r / s
        return (M @ V) * inv, s, V.T
    return V, s, (V.T @ M) * inv[:, None]  # V = P_r, Q_r^T = P_r^T M / s


def weighted_error(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, cov: Covariances,
                   damping: float | None = None) -> float:
    """||C_delta^{1/2} (W - A B) C_h^{1/2}||_F^2 = tr(E^T C_delta E C_h) (damped as in
    :func:`damped_sqrt` when ``damping`` is given)."""
    E = W.double() - A.double() @ B.double()
    c_h, c_d = cov.c_h.double(), cov.c_delta.double()
    if damping is not None:
        c_h = c_h + damping * torch.diagonal(c_h).mean() * torch.eye(len(c_h), dtype=c_h.dtype)
        c_d = c_d + damping * torch.diagonal(c_d).mean() * torch.eye(len(c_d), dtype=c_d.dtype)
    return float(torch.trace(E.T @ c_d @ E @ c_h))


def split_factors(A: torch.Tensor, B: torch.Tensor, split: str, adapted: str = "up"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A', B')`` with ``A' B' = A B`` (up to rounding), split between the two factors
    as ``split`` says (float64 inside, returned in A's dtype):

    * ``ipsvd``: ``(A, B)`` unchanged. IPSVD's factors carry the covariances' scales,
      A = C_delta^{-1/2} P S^{1/2} and B = S^{1/2} Q^T C_h^{-1/2}: where the output
      gradients are small against the inputs (a loss gradient against activations of
      order one), A is large and B small, by a ratio that differs from layer to layer
      (about 0.1 to 3e4 on the tiny test Llama).
    * ``symmetric``: A' = U Sigma^{1/2}, B' = Sigma^{1/2} V^T for the SVD U Sigma V^T of
      A B (as plain truncated SVD splits W).
    * ``adapted``: the factor that carries the LoRA adapter (``adapted``, see
      :func:`lora_factor`) carries Sigma, the other is orthonormal: A' = U Sigma,
      B' = V^T for ``"up"``; A' = U, B' = Sigma V^T for ``"down"``. An adapter on A'
      then sees the layer's input projected onto V (B' x = V^T x), one on B' the output
      gradient projected onto U (A'^T delta = U^T delta): its gradients are those of an
      adapter on A B restricted to those subspaces, at the model's scale.

    The split changes neither the proxy's outputs nor its gradient w.r.t. A B, but it
    changes the per-example gradients of the adapter (their scale per layer, hence the
    weight of each layer in ``less``'s features), the Stage 2 cosines (grad_A vs
    grad_W B^T is not invariant to A -> A D, B -> D^-1 B) and the relative size of
    Stage 2's fixed-size AdamW steps.
    """
    check_choice(split, SPLITS, "split")
    if split == "ipsvd":
        return A, B
    dtype = A.dtype
    Qa, Ra = torch.linalg.qr(A.double())
    Qb, Rb = torch.linalg.qr(B.double().T)
    U, sv, Vh = torch.linalg.svd(Ra @ Rb.T)
    U, Vh = Qa @ U, Vh @ Qb.T  # A B = U diag(sv) Vh
    if split == "symmetric":
        root = sv.sqrt()
        return (U * root).to(dtype), (root[:, None] * Vh).to(dtype)
    if adapted == "up":
        return (U * sv).to(dtype), Vh.to(dtype)
    return U.to(dtype), (sv[:, None] * Vh).to(dtype)


# -- Stage 2: gradient alignment -------------------------------------------------------


def factored_pairs(target: torch.nn.Module, proxy: torch.nn.Module):
    """``[(name, target nn.Linear, proxy FactoredLinear)]`` for every factored layer."""
    tmods = dict(unwrap(target).named_modules())
    return [(name, tmods[name], mod) for name, mod in unwrap(proxy).named_modules()
            if isinstance(mod, FactoredLinear)]


def _cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """cos(x, y) of the flattened tensors, in float64 and scale-free: only a zero norm is
    guarded (``F.cosine_similarity`` clamps each norm at its eps, 1e-8, which pulls the
    cosine of smaller gradients towards 0; IPSVD's factors can make them that small)."""
    x, y = x.reshape(-1).double(), y.reshape(-1).double()
    den = x.norm() * y.norm()
    ok = den > 0  # a zero gradient: cos 0, no gradient (rather than a division by ~0)
    return torch.where(ok, (x * y).sum() / torch.where(ok, den, torch.ones_like(den)),
                       torch.zeros_like(den)).float()


def _alignment_terms(target, proxy, pairs, batch, n, model_task, tau, create_graph,
                     per_layer: list[tuple[float, float, float]] | None = None):
    """``(align, kl)`` on one batch; ``align`` stays in the graph of the factors when
    ``create_graph``. Both gradients are of :func:`batch_loss` on the same batch: the
    model's w.r.t. W, the proxy's w.r.t. A and B. ``per_layer``: ``(1 - cos_A, 1 - cos_B,
    the smallest norm of the four gradients compared)`` of every pair is appended to it
    (in the order of ``pairs``; the cosine is scale-free, :func:`_cosine`)."""
    weights = [t.weight for _, t, _ in pairs]
    with _grads_on(weights), torch.enable_grad():
        t_logits, tgt, row = label_logits(target, batch, model_task)
        g_w = torch.autograd.grad(batch_loss(t_logits, tgt, row, n), weights)
    t_logits = t_logits.detach()
    factors = [f for _, _, p in pairs for f in (p.A, p.B)]
    with _math_sdpa(), _grads_on(factors), torch.enable_grad():
        p_logits, tgt, row = label_logits(proxy, batch, model_task)
        p_loss = batch_loss(p_logits, tgt, row, n)
        g_p = torch.autograd.grad(p_loss, factors, create_graph=create_graph, allow_unused=True)
        terms = []
        for j, (_, _, p) in enumerate(pairs):
            gA, gB = g_p[2 * j], g_p[2 * j + 1]
            gW = g_w[j].detach().to(p.A.dtype)
            gA = torch.zeros_like(p.A) if gA is None else gA
            gB = torch.zeros_like(p.B) if gB is None else gB
            # the full model's gradient projected onto the factors; A and B stay in the
            # graph here too, as in the reference code
            cos_a = _cosine(gA, gW @ p.B.T)
            cos_b = _cosine(gB, p.A.T @ gW)
            terms.append(0.5 * ((1 - cos_a) + (1 - cos_b)))
            if per_layer is not None:
                norms = [float(v.detach().norm()) for v in (gA, gW @ p.B.T, gB, p.A.T @ gW)]
                per_layer.append((1 - float(cos_a.detach()), 1 - float(cos_b.detach()),
                                  min(norms)))
        align = torch.stack(terms).mean() if terms else p_loss.new_zeros(())
        t_logp = F.log_softmax(t_logits / tau, dim=-1)
        p_logp = F.log_softmax(p_logits / tau, dim=-1)
        kl = (t_logp.exp() * (t_logp - p_logp)).sum(-1).mean() * tau**2
    return align, kl


def alignment_loss(target, proxy, task: Task, examples: Sequence[Any], *, model_task: str,
                   opts: IProxOptions, device: str = "cpu", per_layer: bool = False
                   ) -> dict[str, Any]:
    """The Stage 2 objective over ``examples`` (no update), in batches of
    ``opts.align_batch_size`` examples, each batch weighted by its size:

    * ``align``: mean over factored layers of 0.5 [(1 - cos_A) + (1 - cos_B)];
    * ``kl``: tau^2 KL(target || proxy), averaged over label tokens (tau^2 included);
    * ``total``: ``align + kl_weight * kl``, the loss :func:`align_proxy` minimises.

    ``per_layer``: also ``align_A`` and ``align_B`` (the mean 1 - cos of each factor),
    ``layers`` ({layer: mean 1 - cos}), ``by_block`` ({block index: mean 1 - cos over its
    layers}, the block index being the first number in the layer's name, e.g. 3 for
    ``model.layers.3.mlp.up_proj``) and ``by_kind`` ({the rest of the name, e.g.
    ``mlp.up_proj``: mean 1 - cos over the blocks}), ``min_grad_norm`` (the smallest
    norm of a compared gradient, grad_A, grad_W B^T, grad_B or A^T grad_W, over layers
    and batches) and ``layers_tiny_grad`` (layers where one fell below 1e-7; before the
    cosine was made scale-free, :func:`_cosine`, ``F.cosine_similarity`` clamped norms
    at 1e-8, which made 1 - cos near 1 there whatever the directions). A layer whose proxy
    gradient is 0 has 1 - cos = 1. Both models are evaluated in eval mode (no dropout; restored
    after)."""
    pairs = factored_pairs(target, proxy)
    lengths = [task.length(e) for e in examples]
    sums = {"align": 0.0, "kl": 0.0}
    layer_sums = np.zeros((len(pairs), 2))
    layer_min = np.full(len(pairs), np.inf)
    total = 0
    t_training, p_training = target.training, proxy.training
    target.eval()
    proxy.eval()
    try:
        for idx in sorted_batches(examples, lengths, batch_size=opts.align_batch_size,
                                  max_tokens=4096):
            batch = {k: v.to(device)
                     for k, v in task.collate([examples[i] for i in idx]).items()}
            terms: list[tuple[float, float, float]] | None = [] if per_layer else None
            align, kl = _alignment_terms(target, proxy, pairs, batch, len(idx), model_task,
                                         opts.tau, create_graph=False, per_layer=terms)
            sums["align"] += float(align.detach()) * len(idx)
            sums["kl"] += float(kl.detach()) * len(idx)
            if terms:
                arr = np.asarray(terms)
                layer_sums += arr[:, :2] * len(idx)
                layer_min = np.minimum(layer_min, arr[:, 2])
            total += len(idx)
    finally:
        target.train(t_training)
        proxy.train(p_training)
    out: dict[str, Any] = {k: v / max(1, total) for k, v in sums.items()}
    out["total"] = out["align"] + opts.kl_weight * out["kl"]
    if per_layer:
        both = layer_sums / max(1, total)
        mean = both.mean(axis=1) if len(pairs) else np.zeros(0)
        out["align_A"] = float(both[:, 0].mean()) if len(pairs) else 0.0
        out["align_B"] = float(both[:, 1].mean()) if len(pairs) else 0.0
        out["layers"] = {name: float(v) for (name, _, _), v in zip(pairs, mean, strict=True)}
        out["min_grad_norm"] = float(layer_min.min()) if len(pairs) and total else 0.0
        out["layers_tiny_grad"] = int((layer_min < 1e-7).sum())
        blocks: dict[str, list[float]] = {}
        kinds: dict[str, list[float]] = {}
        for (name, _, _), v in zip(pairs, mean, strict=True):
            parts = name.split(".")
            at = next((i for i, part in enumerate(parts) if part.isdigit()), None)
            block = "-" if at is None else parts[at]
            kind = name if at is None else ".".join(parts[at + 1:]) or name
            blocks.setdefault(block, []).append(float(v))
            kinds.setdefault(kind, []).append(float(v))
        order = sorted(blocks, key=lambda b: (not b.isdigit(), int(b) if b.isdigit() else 0))
        out["by_block"] = {b: float(np.mean(blocks[b])) for b in order}
        out["by_kind"] = {k: float(np.mean(v)) for k, v in kinds.items()}
    return out


def alignment_batches(lengths: Sequence[int], opts: IProxOptions, seed: int = 0
                      ) -> list[list[list[int]]]:
    """Stage 2's batches, epoch by epoch: random batches of ``align_batch_size`` probe
    examples, each also capped at ``align_tokens`` (rows x longest), drawn with ``seed``.
    :func:`align_proxy` trains on exactly these; the estimate counts their tokens."""
    rng = np.random.default_rng([seed, 0x1970])
    return [list(shuffled_batches(len(lengths), batch_size=opts.align_batch_size, rng=rng,
                                  lengths=list(lengths), max_tokens=opts.align_tokens))
            for _ in range(opts.align_epochs)]


def alignment_optimizer(proxy: torch.nn.Module, pairs, opts: IProxOptions
                        ) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """Stage 2 trains the factors of ``pairs`` only: every other parameter of ``proxy`` is
    frozen. Returns the factors and their AdamW."""
    for p in proxy.parameters():
        p.requires_grad_(False)
    factors = [f for _, _, p in pairs for f in (p.A, p.B)]
    for f in factors:
        f.requires_grad_(True)
    return factors, torch.optim.AdamW(factors, lr=opts.align_lr,
                                      weight_decay=opts.align_weight_decay)


def align_step(target, proxy, pairs, task: Task, batch_examples: Sequence[Any], *,
               model_task: str, opts: IProxOptions, opt: torch.optim.Optimizer,
               device: str = "cpu") -> tuple[float, float, float]:
    """One Stage 2 step on one batch: the alignment objective (``1 - cos`` of the proxy's
    factor gradients against the model's projected ones, plus ``kl_weight`` x tau^2 KL),
    differentiated through the proxy's gradients (a double backward), and ``opt``'s step
    on the factors. Returns ``(loss, 1 - cos, tau^2 KL)`` of the batch. The estimate times
    this on the heaviest batch (``methods._proxy.proxy_cost``)."""
    batch = {k: v.to(device) for k, v in task.collate(list(batch_examples)).items()}
    align, kl = _alignment_terms(target, proxy, pairs, batch, len(batch_examples), model_task,
                                 opts.tau, create_graph=True)
    loss = align + opts.kl_weight * kl
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach()), float(align.detach()), float(kl.detach())


def align_proxy(target, proxy, task: Task, examples: Sequence[Any], *, model_task: str,
                opts: IProxOptions, seed: int = 0, device: str = "cpu",
                log: Callable[[str], None] = lambda m: None,
                terms: list[dict[str, float]] | None = None) -> list[float]:
    """Stage 2: ``opts.align_epochs`` epochs of AdamW on the proxy's factors (only).
    Returns the mean training loss of each epoch; ``terms``, if given, receives each
    epoch's mean ``{"align": 1 - cos, "kl": tau^2 KL}`` (running means over the epoch's
    steps, as the factors moved). ``target`` is not changed."""
    pairs = factored_pairs(target, proxy)
    if not pairs or opts.align_epochs == 0:
        return []
    factors, opt = alignment_optimizer(proxy, pairs, opts)
    epochs = alignment_batches([len(ex.input_ids) for ex in examples], opts, seed)
    t_training, p_training = target.training, proxy.training
    target.eval()
    proxy.eval()  # no dropout: the proxy's gradients should match the model's as it is used
    losses = []
    try:
        for epoch, batches in enumerate(epochs):
            tot, cnt, tot_align, tot_kl = 0.0, 0, 0.0, 0.0
            for idx in batches:
                loss, align, kl = align_step(target, proxy, pairs, task,
                                             [examples[i] for i in idx], model_task=model_task,
                                             opts=opts, opt=opt, device=device)
                tot += loss * len(idx)
                tot_align += align * len(idx)
                tot_kl += kl * len(idx)
                cnt += len(idx)
            losses.append(tot / max(1, cnt))
            if terms is not None:
                terms.append({"align": tot_align / max(1, cnt), "kl": tot_kl / max(1, cnt)})
            log(f"iprox: alignment epoch {epoch + 1}/{opts.align_epochs}: loss "
                f"{losses[-1]:.4f} (1 - cos {tot_align / max(1, cnt):.4f}, "
                f"tau^2 KL {tot_kl / max(1, cnt):.4f})")
    finally:
        for f in factors:
            f.requires_grad_(False)
            f.grad = None
        target.train(t_training)
        proxy.train(p_training)
    return losses


# -- building a proxy ------------------------------------------------------------------


def factorize(model: torch.nn.Module, ranks: dict[str, int], init: str = "svd"
              ) -> torch.nn.Module:
    """A deep copy of ``model`` whose layers in ``ranks`` are :class:`FactoredLinear`.

    ``init="svd"``: the factors are the plain truncated SVD of W (a full SVD per layer);
    ``"none"``: they are left as zeros (only the bias is copied), for callers that
    overwrite them (IPSVD, a cached proxy, a worker given the trained factors).
    """
    if init not in ("svd", "none"):
        raise ValueError(f"init must be 'svd' or 'none', got {init!r}")
    proxy = copy.deepcopy(model)
    base = unwrap(proxy)
    for name, r in ranks.items():
        old = base.get_submodule(name)
        new = FactoredLinear(old.in_features, old.out_features, r, old.bias is not None,
                             dtype=old.weight.dtype, device=old.weight.device)
        with torch.no_grad():
            if init == "svd":
                U, s, Vh = torch.linalg.svd(old.weight.double(), full_matrices=False)
                root = s[:r].sqrt()
                new.up.weight.copy_(U[:, :r] * root)
                new.down.weight.copy_(root[:, None] * Vh[:r])
            else:
                new.up.weight.zero_()
                new.down.weight.zero_()
            if old.bias is not None:
                new.up.bias.copy_(old.bias)
        _set_module(base, name, new)
    proxy.eval()
    return proxy


def plan_ranks(model: torch.nn.Module, opts: IProxOptions) -> tuple[dict[str, int], list[str]]:
    """``({layer: rank} for factored layers, [layers kept full])``."""
    ranks, full = {}, []
    for name, mod in proxy_targets(model).items():
        r = proxy_rank(mod.out_features, mod.in_features, opts.rho, opts.block_size)
        if r is None:
            full.append(name)
        else:
            ranks[name] = r
    return ranks, full


def probe_indices(n_pool: int, opts: IProxOptions, seed: int) -> np.ndarray:
    """The probe set: ``probe_examples`` pool indices drawn with the run's seed."""
    rng = np.random.default_rng([seed, 0x1B50])
    return np.sort(rng.choice(n_pool, size=min(n_pool, opts.probe_examples), replace=False))


# -- the cache -------------------------------------------------------------------------


def weights_digest(model: torch.nn.Module, sample: int = 4096) -> str:
    """A cheap digest of a model's weights: every state-dict entry's name, shape, dtype,
    sum and ``sample`` evenly strided elements (any real change of the weights, such as
    a fine-tune, moves them; hashing all 135M parameters of SmolLM2 would cost seconds)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in unwrap(model).state_dict().items():
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if flat.numel():
            h.update(flat[::step][:sample].float().cpu().numpy().tobytes())
            h.update(np.float64(flat.sum(dtype=torch.float64).item()).tobytes())
    return h.hexdigest()[:24]


#: options that do not change the proxy (not part of its cache key)
_NOT_IN_KEY = ("cov_memory_mb", "align_eval")


def proxy_key(model: torch.nn.Module, opts: IProxOptions, probe: Sequence[Any], *,
              model_task: str, seed: int, batch_size: Any, model_id: str | None = None) -> str:
    """The cache key of a proxy: the cache format and the model's class, size and config
    (:func:`proxy_tag`), ``model_id`` (the run's model identity, e.g. its folder and weight
    files, see :func:`finesift.methods.base.model_identity`) and a digest of the weights
    themselves (:func:`weights_digest`), the options that change the result, the task,
    seed and batch size (they fix the probe tokens) and every probe example's tokens and
    labels (fingerprint scheme ``v1``, :mod:`finesift.store.work`)."""
    from finesift.store.work import fingerprint

    identity = {
        "tag": proxy_tag(model),
        "model": model_id,
        "weights": weights_digest(model),
        "options": {k: v for k, v in asdict(opts).items() if k not in _NOT_IN_KEY},
        "model_task": model_task,
        "seed": int(seed),
        "batch_size": str(batch_size),
    }
    blobs = (np.asarray(a, dtype=np.int64) for ex in probe for a in (ex.input_ids, ex.labels))
    return fingerprint(identity, version="v1", blobs=blobs)


def proxy_cache_roots(workdir: str | Path | None = None) -> list[Path]:
    """Where proxies are kept, in order of preference: finesift's cache
    (``$FINESIFT_CACHE/iprox``, shared by every run) and, where that cannot be written,
    the run's work folder."""
    from finesift.models.loader import cache_dir

    roots = [cache_dir() / "iprox"]
    if workdir is not None:
        roots.append(Path(workdir))
    return roots


def _load_cached(roots: Sequence[Path], key: str, log: Callable[[str], None]):
    for root in roots:
        path = root / f"iprox-{key}.pt"
        if not path.is_file():
            continue
        try:
            blob = torch.load(path, weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged file is rebuilt, not fatal
            log(f"iprox: ignoring the unreadable cached proxy {path} ({e})")
            continue
        if blob.get("version") == _CACHE_VERSION and blob.get("key") == key:
            return path, blob
    return None, None


def _save_cached(roots: Sequence[Path], key: str, blob: dict[str, Any],
                 log: Callable[[str], None]) -> Path | None:
    for root in roots:
        path = root / f"iprox-{key}.pt"
        try:
            atomic_save_torch(path, blob)
        except OSError as e:
            log(f"iprox: cannot write the proxy cache {root} ({e.strerror or e}); "
                "trying the next place")
            continue
        return path
    log("iprox: the proxy was not cached (no writable place)")
    return None


def _copy_factors(proxy: torch.nn.Module, factors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        pm = dict(unwrap(proxy).named_parameters())
        for k, v in factors.items():
            pm[k].copy_(v)


def build_proxy(
    model: torch.nn.Module,
    task: Task,
    pool: Sequence[Any],
    opts: IProxOptions,
    *,
    model_task: str = "lm",
    seed: int = 0,
    batch_size: int = 8,
    device: str = "cpu",
    cache: Path | Sequence[Path] | None = None,
    model_id: str | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """An IProX proxy of ``model`` (a new model; ``model`` is left as it was) and figures
    for the manifest: parameter counts and ratio, layers factored and kept, seconds of
    each stage (IPSVD split into its steps), alignment losses (``proxy_align_epoch_losses``
    and, per epoch, ``proxy_align_epoch_terms``: running means of 1 - cos and tau^2 KL).

    ``opts.align_eval``: also ``proxy_align_before`` (right after IPSVD) and
    ``proxy_align_after`` (after the alignment; the same figures when ``align_epochs`` is
    0), :func:`alignment_loss` with its per-layer breakdown on the probe set, and
    ``proxy_seconds_align_eval`` (not part of ``proxy_seconds_align``).

    ``cache``: a folder, or folders in order of preference (:func:`proxy_cache_roots`).
    A proxy built before with the same inputs (:func:`proxy_key`; ``model_id`` joins the
    key) is loaded from the first folder that holds it, without a probe pass, IPSVD or
    alignment (its build's figures come with it); a new one is saved atomically in the
    first writable folder. With ``align_eval``, a cached proxy whose figures lack the
    before/after evaluation (built without it) is built again (the same factors) and the
    cache entry replaced.
    """
    opts.validate()
    if not callable(getattr(task_class(model_task), "label_logits", None)):
        raise OptionError(f"iprox needs a task with label logits (lm, ner), not {model_task!r}")
    ranks, full = plan_ranks(model, opts)
    info: dict[str, Any] = {"proxy": f"iprox:{opts.rho:g}", "proxy_options": asdict(opts),
                            "proxy_layers_factored": len(ranks), "proxy_layers_full": len(full)}
    probe = [pool[i] for i in probe_indices(len(pool), opts, seed)]
    roots = [] if cache is None else [Path(cache)] if isinstance(cache, (str, Path)) \
        else [Path(c) for c in cache]
    key = None
    if roots:
        t = time.perf_counter()
        key = proxy_key(model, opts, probe, model_task=model_task, seed=seed,
                        batch_size=batch_size, model_id=model_id)
        path, blob = _load_cached(roots, key, log)
        if blob is not None and opts.align_eval and ranks \
                and "proxy_align_before" not in blob.get("info", {}):
            log(f"iprox: the cached proxy {path} was built without align_eval; building it "
                "again for the before/after alignment figures")
            blob = None
        if blob is not None:
            proxy = factorize(model, blob["ranks"], init="none")
            _copy_factors(proxy, blob["factors"])
            for p in proxy.parameters():
                p.requires_grad_(False)
            info.update(blob["info"])
            info.update(proxy_options=asdict(opts), proxy_cached=True, proxy_cache_file=str(path),
                        proxy_seconds_load=round(time.perf_counter() - t, 3))
            log(f"iprox: proxy loaded from the cache {path} (key {key}; no probe pass, "
                "IPSVD or alignment)")
            return proxy, info
    t0 = time.perf_counter()
    layers = proxy_targets(model)
    covs = {}
    if ranks:
        log(f"iprox: probe pass for {len(ranks)} layers on {len(probe)} examples")
        covs = layer_covariances(model, task, probe, {n: layers[n] for n in ranks},
                                 model_task=model_task, probe_tokens=opts.probe_tokens,
                                 batch_size=batch_size, seed=seed,
                                 memory_mb=opts.cov_memory_mb, device=device)
    t1 = time.perf_counter()
    proxy = factorize(model, ranks, init="none")
    t_copy = time.perf_counter() - t1
    pmods = dict(unwrap(proxy).named_modules())
    roots_: dict[Any, Any] = {}
    steps: dict[str, float] = {}
    with torch.no_grad():
        for j, (name, r) in enumerate(ranks.items()):
            if (id(covs[name].c_h), "cholesky") not in roots_:
                roots_.clear()  # layers sharing an input are consecutive (q/k/v, gate/up)
            A, B = ipsvd_factors(layers[name].weight, covs[name], r, opts.damping, roots_,
                                 dtype=torch.float32, svd=opts.svd, niter=opts.svd_niter,
                                 oversample=opts.svd_oversample, seed=seed * 100003 + j,
                                 timing=steps)
            roots_.pop((id(covs[name].c_delta), "cholesky"), None)
            A, B = split_factors(A, B, opts.split, pmods[name].adapted)
            pmods[name].up.weight.copy_(A)
            pmods[name].down.weight.copy_(B)
    del covs, roots_
    t2 = time.perf_counter()
    log(f"iprox: covariances {t1 - t0:.1f} s, IPSVD ({opts.svd}) of {len(ranks)} layers "
        f"{t2 - t1:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in steps.items()) + ")")
    evals: dict[str, Any] = {}
    t_eval = 0.0

    def rounded(x: Any) -> Any:  # figures for the manifest
        if isinstance(x, dict):
            return {k: rounded(v) for k, v in x.items()}
        return float(f"{x:.6g}") if isinstance(x, float) else x

    def evaluate(when: str) -> None:
        nonlocal t_eval
        te = time.perf_counter()
        res = alignment_loss(model, proxy, task, probe, model_task=model_task, opts=opts,
                             device=device, per_layer=True)
        t_eval += time.perf_counter() - te
        evals[when] = rounded(res)
        blocks = res["by_block"]
        shown = ", ".join(f"{b}: {v:.3f}" for b, v in blocks.items())
        log(f"iprox: alignment objective {when} alignment on {len(probe)} probe examples: "
            f"1 - cos {res['align']:.4f} (A {res['align_A']:.4f}, B {res['align_B']:.4f}), "
            f"tau^2 KL {res['kl']:.4f}, total {res['total']:.4f}; smallest compared gradient "
            f"norm {res['min_grad_norm']:.2e} ({res['layers_tiny_grad']} layers below 1e-7); "
            f"1 - cos by block {shown}")

    if ranks and opts.align_eval:
        evaluate("before")
    epoch_terms: list[dict[str, float]] = []
    t_align = time.perf_counter()
    losses = align_proxy(model, proxy, task, probe, model_task=model_task, opts=opts,
                         seed=seed, device=device, log=log, terms=epoch_terms) if ranks else []
    t_align = time.perf_counter() - t_align
    if ranks and opts.align_eval:
        if losses:
            evaluate("after")
        else:  # no alignment step: the proxy is the one evaluated before
            evals["after"] = evals["before"]
    for p in proxy.parameters():
        p.requires_grad_(False)
    full_params, proxy_params = param_count(model), param_count(proxy)
    info.update({
        "proxy_parameters": proxy_params,
        "full_parameters": full_params,
        "proxy_param_ratio": round(proxy_params / full_params, 4),
        "proxy_probe_examples": len(probe),
        "proxy_seconds_probe": round(t1 - t0, 3),
        "proxy_seconds_ipsvd": round(t2 - t1, 3),
        "proxy_seconds_copy": round(t_copy, 3),
        **{f"proxy_seconds_ipsvd_{k}": round(v, 3) for k, v in steps.items()},
        "proxy_seconds_align": round(t_align, 3),
        "proxy_align_epoch_losses": [round(x, 6) for x in losses],
        "proxy_align_epoch_terms": [rounded(x) for x in epoch_terms],
        "proxy_cached": False,
    })
    if evals:
        info.update({"proxy_align_before": evals["before"], "proxy_align_after": evals["after"],
                     "proxy_seconds_align_eval": round(t_eval, 3)})
    if roots and key is not None:
        factors = {k: v.detach().cpu().clone() for k, v in unwrap(proxy).named_parameters()
                   if k.rsplit(".", 2)[0] in ranks}
        path = _save_cached(roots, key, {
            "version": _CACHE_VERSION, "key": key, "ranks": ranks, "factors": factors,
            "info": {k: v for k, v in info.items() if k != "proxy_cached"}}, log)
        if path is not None:
            info["proxy_cache_file"] = str(path)
            log(f"iprox: proxy saved to the cache {path}")
    return proxy, info


# -- shipping a proxy to another process -----------------------------------------------


def proxy_blob(proxy: torch.nn.Module) -> dict[str, Any]:
    """A built proxy as another process rebuilds it (:func:`proxy_from_blob`): the rank
    of every factored layer and the factors' trained values, on the CPU (what the proxy
    cache holds). Everything else of the proxy is the model's own and is loaded with it."""
    base = unwrap(proxy)
    ranks = {n: m.rank for n, m in base.named_modules() if isinstance(m, FactoredLinear)}
    factors = {k: v.detach().cpu().clone() for k, v in base.named_parameters()
               if k.rsplit(".", 2)[0] in ranks}
    return {"ranks": ranks, "factors": factors}


def proxy_from_blob(model: torch.nn.Module, blob: dict[str, Any]) -> torch.nn.Module:
    """The proxy of ``blob`` (:func:`proxy_blob`) rebuilt on ``model`` (the same model
    the proxy was built from, loaded again, e.g. by a worker): a factored copy with the
    trained factors copied in, every parameter frozen, in eval mode."""
    proxy = factorize(model, blob["ranks"], init="none")
    _copy_factors(proxy, blob["factors"])
    for p in proxy.parameters():
        p.requires_grad_(False)
    return proxy
