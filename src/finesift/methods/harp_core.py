"""The model-free parts of HARP (Wang et al., arXiv 2606.07690), as plain numpy.

* :func:`build_tree`: region -> parent -> leaf hierarchy by nested k-means;
* :func:`representative_leaves`: which leaves to train-evaluate, parent by parent;
* :func:`eb_posterior`: empirical-Bayes posterior utilities of every leaf;
* :func:`envelope_value`, :func:`greedy_select`: the HARP-C / HARP-E set envelopes, the
  greedy order and the best-prefix rule.

Utilities are arrays over target domains: ``phi[g, d]`` is the change of the target
utility on domain d caused by fine-tuning on leaf g, ``b[d]`` the untouched model's
utility, both on a [0, 1] scale.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

VAR_FLOOR = 1e-12  # variances never drop below this (keeps the Gaussian algebra finite)


# --------------------------------------------------------------------------- hierarchy


@dataclass
class Tree:
    """A three-level partition of the pool.

    Attributes:
        leaf: leaf id of every example (0..n_leaves-1).
        leaf_parent: parent id of every leaf; ``parent_region``: region id of every parent.
        leaf_centres, parent_centres: mean embedding of each leaf / parent.
    """

    leaf: np.ndarray
    leaf_parent: np.ndarray
    parent_region: np.ndarray
    leaf_centres: np.ndarray
    parent_centres: np.ndarray

    @property
    def n_leaves(self) -> int:
        return len(self.leaf_parent)

    @property
    def parent(self) -> np.ndarray:
        return self.leaf_parent[self.leaf]

    @property
    def region(self) -> np.ndarray:
        return self.parent_region[self.parent]

    def leaf_sizes(self) -> np.ndarray:
        return np.bincount(self.leaf, minlength=self.n_leaves)


def _kmeans(x: np.ndarray, k: int, seed: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Labels 0..k'-1 (k' <= k, no empty cluster) of seeded k-means on the rows of x."""
    n = len(x)
    k = max(1, min(k, n))
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    if k == n:
        return np.arange(n, dtype=np.int64)
    from sklearn.cluster import KMeans, MiniBatchKMeans

    cls = MiniBatchKMeans if n > 20000 else KMeans
    kw = {"batch_size": 4096} if cls is MiniBatchKMeans else {}
    with warnings.catch_warnings():  # duplicate points: fewer distinct clusters than k
        warnings.simplefilter("ignore")
        km = cls(n_clusters=k, random_state=seed, n_init=3, **kw)
        labels = km.fit_predict(x, sample_weight=weights)
    _, labels = np.unique(labels, return_inverse=True)
    return labels.astype(np.int64)


def _centres(x: np.ndarray, labels: np.ndarray, k: int, weights: np.ndarray | None = None):
    w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    out = np.zeros((k, x.shape[1]), dtype=np.float64)
    np.add.at(out, labels, x * w[:, None])
    return out / np.maximum(np.bincount(labels, weights=w, minlength=k), 1e-12)[:, None]


def build_tree(
    emb: np.ndarray,
    *,
    leaf_size: int = 64,
    parent_leaves: int = 8,
    region_parents: int = 4,
    seed: int = 0,
) -> Tree:
    """Leaves by k-means on the examples (about ``leaf_size`` examples each), parents by
    k-means on the leaf centres (about ``parent_leaves`` leaves each, weighted by leaf
    size), regions by k-means on the parent centres (about ``region_parents`` each).
    Bottom-up, so the levels nest exactly."""
    emb = np.asarray(emb, dtype=np.float64)
    n = len(emb)
    leaf = _kmeans(emb, round(n / max(1, leaf_size)), seed)
    n_leaves = int(leaf.max()) + 1
    sizes = np.bincount(leaf, minlength=n_leaves).astype(np.float64)
    lc = _centres(emb, leaf, n_leaves)
    leaf_parent = _kmeans(lc, int(np.ceil(n_leaves / max(1, parent_leaves))), seed, sizes)
    n_parents = int(leaf_parent.max()) + 1
    pc = _centres(lc, leaf_parent, n_parents, sizes)
    psizes = np.bincount(leaf_parent, weights=sizes, minlength=n_parents)
    parent_region = _kmeans(pc, int(np.ceil(n_parents / max(1, region_parents))), seed, psizes)
    return Tree(leaf, leaf_parent, parent_region, lc, pc)


def representative_leaves(tree: Tree, per_parent: int, max_runs: int | None = None) -> np.ndarray:
    """The leaves to measure, in measuring order.

    Within a parent: the leaf nearest the parent's centre first, then farthest-point
    spread (each next leaf is the one farthest from those already picked). Across
    parents round-robin (every parent's first leaf, then every parent's second, ...),
    so a ``max_runs`` cap keeps the widest coverage.
    """
    per: list[list[int]] = []
    for p in range(len(tree.parent_centres)):
        members = np.flatnonzero(tree.leaf_parent == p)
        c = tree.leaf_centres[members]
        d_centre = np.linalg.norm(c - tree.parent_centres[p], axis=1)
        chosen = [int(np.argmin(d_centre))]
        dmin = np.linalg.norm(c - c[chosen[0]], axis=1)
        while len(chosen) < min(per_parent, len(members)):
            j = int(np.argmax(dmin))
            chosen.append(j)
            dmin = np.minimum(dmin, np.linalg.norm(c - c[j], axis=1))
        per.append([int(members[j]) for j in chosen])
    order = [lst[r] for r in range(max(map(len, per), default=0)) for lst in per if r < len(lst)]
    if max_runs is not None:
        order = order[:max_runs]
    return np.array(order, dtype=np.int64)


# --------------------------------------------------------------------------- empirical Bayes


@dataclass
class Posterior:
    """Posterior utilities of every leaf (arrays ``(n_leaves, D)``) and the fitted
    hierarchical prior (``mu_parent``, ``tau2_parent``: ``(n_parents, D)``;
    ``mu_region``: ``(n_regions, D)``)."""

    mean: np.ndarray
    var: np.ndarray
    mu_parent: np.ndarray
    tau2_parent: np.ndarray
    mu_region: np.ndarray
    between_parent_var: np.ndarray
    between_region_var: np.ndarray


def _col(x, m: int, d: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.broadcast_to(x, (m, d)).copy()


def eb_posterior(
    measured: np.ndarray,
    phi_hat: np.ndarray,
    sigma2: np.ndarray | float,
    leaf_parent: np.ndarray,
    parent_region: np.ndarray,
    *,
    var_prior_strength: float = 2.0,
) -> Posterior:
    """Empirical-Bayes posterior of every leaf's utility, each domain separately.

    Model: ``phi_hat_g = phi_g + e_g``, ``e_g ~ N(0, sigma2_g)``;
    ``phi_g ~ N(mu_p, tau2_p)`` for leaf g in parent p; ``mu_p ~ N(mu_r, A)`` for parent p
    in region r; ``mu_r ~ N(mu_global, A_G)``.

    Method of moments, bottom-up:

    * ``tau2`` pooled = within-parent variance of the measurements minus the mean noise
      variance (floored); each parent's own ``tau2_p`` is its within-parent estimate
      shrunk toward the pooled one with ``var_prior_strength`` pseudo-degrees of freedom
      (so a parent with one or two measurements takes the pooled value). Without any
      parent measured twice the split is not identified: half the spread goes to ``tau2``.
    * ``A`` = variance of the parent means within regions minus their sampling variance;
      ``A_G`` likewise for region means around the global mean.
    * ``mu_r`` = the region's mean of parent means, shrunk toward the global mean with
      the normal-normal weight ``A_G / (A_G + v_r)``; ``mu_p`` = the parent's mean of
      measurements, shrunk toward ``mu_r`` with weight ``A / (A + (tau2_p + s2)/n_p)``.
      A parent (region) without measurements takes its region's (the global) mean.

    Posterior of a measured leaf: the precision-weighted mean of ``mu_p`` (precision
    ``1/tau2_p``) and ``phi_hat`` (``1/sigma2``); of an unmeasured leaf: ``mu_p`` with
    variance ``tau2_p`` plus the uncertainty of ``mu_p``.

    Args:
        measured: leaf ids with a measurement, ``(m,)`` (distinct).
        phi_hat: their measured utilities, ``(m, D)`` (or ``(m,)``).
        sigma2: measurement noise variance: scalar, ``(D,)``, ``(m,)`` or ``(m, D)``.
        leaf_parent: parent of every leaf; parent_region: region of every parent.
    """
    measured = np.asarray(measured, dtype=np.int64)
    phi_hat = np.asarray(phi_hat, dtype=np.float64)
    if phi_hat.ndim == 1:
        phi_hat = phi_hat[:, None]
    m, D = phi_hat.shape
    s2 = np.asarray(sigma2, dtype=np.float64)
    if s2.ndim == 1 and s2.shape[0] == m and m != D:
        s2 = s2[:, None]
    s2 = np.maximum(_col(s2, m, D), VAR_FLOOR)
    leaf_parent = np.asarray(leaf_parent, dtype=np.int64)
    parent_region = np.asarray(parent_region, dtype=np.int64)
    L, P, R = len(leaf_parent), len(parent_region), int(parent_region.max()) + 1
    k0 = float(var_prior_strength)

    if m == 0:
        z = np.zeros((L, D))
        return Posterior(z, np.full((L, D), np.inf), np.zeros((P, D)), np.full((P, D), np.inf),
                         np.zeros((R, D)), np.full(D, np.inf), np.full(D, np.inf))

    par = leaf_parent[measured]
    n_p = np.bincount(par, minlength=P).astype(np.float64)
    s2bar = s2.mean(axis=0)
    mu_global = phi_hat.mean(axis=0)
    total_var = phi_hat.var(axis=0, ddof=1) if m > 1 else np.zeros(D)

    # within-parent spread -> tau2 (pooled, then per parent)
    ybar_p = np.zeros((P, D))
    np.add.at(ybar_p, par, phi_hat)
    has_p = n_p > 0
    ybar_p[has_p] /= n_p[has_p, None]
    resid2 = (phi_hat - ybar_p[par]) ** 2
    ss_p = np.zeros((P, D))
    np.add.at(ss_p, par, resid2)
    dof_p = np.maximum(n_p - 1, 0)
    if dof_p.sum() > 0:
        tau2_pool = np.maximum(ss_p.sum(axis=0) / dof_p.sum() - s2bar, VAR_FLOOR)
    else:  # no parent measured twice: the split of the spread between leaves and
        # parents is not identified; give each half
        tau2_pool = np.maximum(0.5 * (total_var - s2bar), VAR_FLOOR)
    with np.errstate(invalid="ignore", divide="ignore"):
        tau2_own = np.where(dof_p[:, None] > 0, ss_p / np.maximum(dof_p, 1)[:, None] - s2bar, 0)
    tau2_own = np.maximum(tau2_own, VAR_FLOOR)
    tau2_p = (dof_p[:, None] * tau2_own + k0 * tau2_pool) / (dof_p[:, None] + k0)

    # sampling variance of each measured parent's mean
    s2_p = np.zeros((P, D))
    np.add.at(s2_p, par, s2)
    s2_p[has_p] /= n_p[has_p, None]
    v_p = np.where(has_p[:, None], (tau2_p + s2_p) / np.maximum(n_p, 1)[:, None], np.inf)

    # between-parent (within region) spread -> A; region means
    reg_of_p = parent_region
    A_num, A_den = np.zeros(D), 0.0
    ybar_r = np.zeros((R, D))
    n_r = np.zeros(R)
    vbar_r = np.zeros((R, D))
    for r in range(R):
        ps = np.flatnonzero((reg_of_p == r) & has_p)
        n_r[r] = len(ps)
        if len(ps) == 0:
            continue
        ybar_r[r] = ybar_p[ps].mean(axis=0)
        vbar_r[r] = v_p[ps].mean(axis=0)
        if len(ps) > 1:
            A_num += ((ybar_p[ps] - ybar_r[r]) ** 2).sum(axis=0) - (len(ps) - 1) * vbar_r[r]
            A_den += len(ps) - 1
    if A_den > 0:
        A = np.maximum(A_num / A_den, VAR_FLOOR)
    else:
        A = np.maximum(total_var - tau2_pool - s2bar, VAR_FLOOR)

    # between-region spread -> A_G; region means shrunk toward the global mean
    has_r = n_r > 0
    v_r = np.where(has_r[:, None], (A + vbar_r) / np.maximum(n_r, 1)[:, None], np.inf)
    if has_r.sum() > 1:
        yr = ybar_r[has_r]
        AG = np.maximum(yr.var(axis=0, ddof=1) - v_r[has_r].mean(axis=0), VAR_FLOOR)
        mu_global = yr.mean(axis=0)
    else:
        AG = np.maximum(total_var, VAR_FLOOR)
    w_r = np.where(has_r[:, None], AG / (AG + np.where(np.isinf(v_r), 1.0, v_r)), 0.0)
    mu_r = w_r * ybar_r + (1 - w_r) * mu_global
    var_mu_r = np.where(has_r[:, None], 1.0 / (1.0 / AG + 1.0 / np.where(np.isinf(v_r), 1.0, v_r)),
                        AG)

    # parent means shrunk toward their region
    vp_safe = np.where(np.isinf(v_p), 1.0, v_p)
    w_p = np.where(has_p[:, None], A / (A + vp_safe), 0.0)
    mu_p = w_p * ybar_p + (1 - w_p) * mu_r[reg_of_p]
    var_mu_p = np.where(has_p[:, None], 1.0 / (1.0 / A + 1.0 / vp_safe),
                        A + var_mu_r[reg_of_p])

    # leaves
    mean = mu_p[leaf_parent].copy()
    var = tau2_p[leaf_parent] + var_mu_p[leaf_parent]
    prior_var = tau2_p[par]
    post_var = 1.0 / (1.0 / prior_var + 1.0 / s2)
    mean[measured] = post_var * (mu_p[par] / prior_var + phi_hat / s2)
    var[measured] = post_var
    return Posterior(mean, var, mu_p, tau2_p, mu_r, A, AG)


# --------------------------------------------------------------------------- envelopes

ENVELOPES = ("c", "e")


def envelope_value(S, phi: np.ndarray, b: np.ndarray, kind: str = "c") -> float:
    """Mean over domains of the predicted utility y_d(S) of fine-tuning on leaves S.

    * ``c``: ``clip01(b_d + max_{g in S} phi+_g(d) - sum_{g in S} phi-_g(d))``: only the
      best helpful leaf counts per domain, every harm counts;
    * ``e``: ``clip01(b_d + sum_{g in S} phi_g(d))``: effects add up.
    """
    phi = np.asarray(phi, dtype=np.float64).reshape(len(phi), -1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    S = list(S)
    if not S:
        return float(np.clip(b, 0, 1).mean())
    sub = phi[S]
    if kind == "c":
        y = b + np.maximum(sub, 0).max(axis=0) - np.maximum(-sub, 0).sum(axis=0)
    elif kind == "e":
        y = b + sub.sum(axis=0)
    else:
        raise ValueError(kind)
    return float(np.clip(y, 0, 1).mean())


@dataclass
class GreedyResult:
    """``order``: leaves in greedy order (the whole run); ``values``: envelope value after
    each prefix, ``values[0]`` = empty set; ``n_best``: length of the best prefix (the
    shortest prefix at which the value peaks); ``chosen = order[:n_best]``."""

    order: np.ndarray
    values: np.ndarray
    n_best: int

    @property
    def chosen(self) -> np.ndarray:
        return self.order[: self.n_best]


def greedy_select(
    phi: np.ndarray,
    b: np.ndarray,
    kind: str = "c",
    *,
    sizes: np.ndarray | None = None,
    budget: int | None = None,
    tol: float = 1e-12,
) -> GreedyResult:
    """Greedy by marginal envelope gain, then the best-prefix rule.

    Every step adds the leaf with the largest marginal gain among those that still fit
    in ``budget`` examples (``sizes``: examples per leaf), even when that gain is
    negative, until none fits; the kept prefix is the shortest one whose value is within
    ``tol`` of the maximum, so zero-gain (redundant) and harmful leaves after the peak
    are dropped.
    """
    phi = np.asarray(phi, dtype=np.float64).reshape(len(phi), -1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    L, D = phi.shape
    sizes = np.ones(L, dtype=np.int64) if sizes is None else np.asarray(sizes, dtype=np.int64)
    cap = np.inf if budget is None else float(budget)
    plus, minus = np.maximum(phi, 0), np.maximum(-phi, 0)
    best_plus, sum_minus, total = np.zeros(D), np.zeros(D), np.zeros(D)
    available = np.ones(L, dtype=bool)
    used = 0
    order: list[int] = []
    values = [float(np.clip(b, 0, 1).mean())]
    while True:
        ok = available & (used + sizes <= cap)
        if not ok.any():
            break
        if kind == "c":
            y = b + np.maximum(best_plus, plus) - (sum_minus + minus)
        elif kind == "e":
            y = b + total + phi
        else:
            raise ValueError(kind)
        val = np.clip(y, 0, 1).mean(axis=1)
        val[~ok] = -np.inf
        g = int(np.argmax(val))  # ties: the lowest leaf id
        order.append(g)
        values.append(float(val[g]))
        available[g] = False
        used += int(sizes[g])
        best_plus = np.maximum(best_plus, plus[g])
        sum_minus += minus[g]
        total += phi[g]
    v = np.array(values)
    n_best = int(np.flatnonzero(v >= v.max() - tol)[0])
    return GreedyResult(np.array(order, dtype=np.int64), v, n_best)
