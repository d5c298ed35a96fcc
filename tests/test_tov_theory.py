"""ToV's theory result, checked against finesift's own ToV code.

For an M-estimator theta* = argmin (1/n) sum_i l(x_i; theta) + (lambda/2) |theta|^2, the
``parallel`` mode with full-batch gradient descent runs two trajectories from theta*: the
base one (epochs on U only) stays at theta*, the val one (epochs on U plus eps-scaled
epochs on the target) converges to argmin L_U + penalty + eps * L_val. The log-prob
change of a pool point x therefore tends to

    l(x; theta*) - l(x; theta_eps) ~ eps * grad l(x)^T H^{-1} grad L_val(theta*),

eps times the influence function, with H the Hessian of the regularised training
objective. The ``basic`` mode (a few small steps on the target from theta*) instead
tends to lr * grad l(x)^T grad L_val(theta*): a gradient dot product, no Hessian.

The penalty belongs to the training objective only: if the eps-scaled target epochs
applied the weight decay too, the val trajectory would minimise
L_U + (1 + eps) * penalty + eps * L_val and the scores would carry a target-independent
term eps * lambda * grad l^T H^{-1} theta* (on this problem Spearman vs the influence
function then drops to 0.75).

The model is an L2-regularised logistic regression (``torch.nn.Linear(d, 1)`` without
bias) behind a custom :class:`Task`, trained with ``adapter="full"`` and plain SGD.
The problem is ill-conditioned, so H is far from a multiple of the identity and the two
limits rank pool points differently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from finesift.engine.tasks import Task
from finesift.methods import MethodContext, get_method

D = 6  # features
N = 300  # pool points (= the base set U, full batch)
N_VAL = 30  # target points, from a shifted distribution
LAM = 0.01  # L2 penalty lambda (SGD weight_decay)
EPS = 0.02  # small: the limit is exact as eps -> 0, with O(eps) relative corrections
LR = 5.0  # lr * h_max ~ 0.75 (GD is stable below 2): small steps relative to the curvature
ROUNDS = 600  # rounds * lr * h_min ~ 30: the val trajectory has converged for most rounds



@dataclass(frozen=True)
class Point:
    """A logistic-regression example: features x and label y in {-1, +1}."""

    x: np.ndarray
    y: float


class LogRegTask(Task):
    """log p(y | x) = log sigmoid(y * <theta, x>) for a bias-free ``Linear(d, 1)``."""

    def length(self, example: Point) -> int:
        return 1

    def n_labels(self, example: Point) -> int:
        return 1

    def collate(self, examples):
        return {
            "x": torch.tensor(np.stack([e.x for e in examples]), dtype=torch.float32),
            "y": torch.tensor([e.y for e in examples], dtype=torch.float32),
        }

    def label_logprobs(self, model, batch):
        margin = model(batch["x"]).squeeze(-1) * batch["y"]
        # log sigmoid(m) = -softplus(-m); torch's logsigmoid kernel is oddly slow on
        # small multi-threaded CPU tensors, softplus is the same function.
        return -torch.nn.functional.softplus(-margin), torch.arange(len(margin))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _grads(X: np.ndarray, Y: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Per-example gradients of l = -log sigmoid(y <theta, x>), shape (n, d)."""
    return (-Y * _sigmoid(-Y * (X @ theta)))[:, None] * X


def _hessian(X: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Hessian of (1/n) sum l_i + (lambda/2) |theta|^2."""
    p = _sigmoid(X @ theta)
    return (X * (p * (1 - p))[:, None]).T @ X / len(X) + LAM * np.eye(X.shape[1])


@dataclass
class Problem:
    pool: list[Point]
    target: list[Point]
    theta: np.ndarray  # theta*, float64
    grad_norm: float  # |grad of the regularised objective| at theta*
    H: np.ndarray
    influence: np.ndarray  # grad L_val^T H^{-1} grad l(x), per pool point
    dot: np.ndarray  # grad L_val^T grad l(x), per pool point


@pytest.fixture(scope="module")
def problem() -> Problem:
    rng = np.random.default_rng(0)
    # ill-conditioned features: x = A z, A with singular values spread over a factor 20
    Q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    scales = np.geomspace(1.0, 1.0 / 20.0, D) * 2.0
    A = Q * scales
    w_true = rng.normal(size=D) * 2.0 / scales.mean()

    def sample(k: int, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        X = (rng.normal(size=(k, D)) + shift) @ A.T
        Y = np.where(rng.random(k) < _sigmoid(X @ w_true), 1.0, -1.0)
        return X, Y

    X, Y = sample(N, np.zeros(D))
    Xv, Yv = sample(N_VAL, 0.7 * rng.normal(size=D))

    theta = np.zeros(D)
    for _ in range(100):  # Newton's method, float64
        g = _grads(X, Y, theta).mean(0) + LAM * theta
        if np.linalg.norm(g) < 1e-10:
            break
        theta = theta - np.linalg.solve(_hessian(X, theta), g)
    g = _grads(X, Y, theta).mean(0) + LAM * theta
    H = _hessian(X, theta)
    g_val = _grads(Xv, Yv, theta).mean(0)
    G = _grads(X, Y, theta)
    # Up-weighting x by w in the training objective moves theta* by
    # d theta / dw = -H^{-1} grad l(x), so the validation loss changes by
    # dL_val/dw = -grad L_val^T H^{-1} grad l(x). The issue writes the influence as that
    # derivative; we use its negative, the *reduction* of validation loss, so that
    # higher = more useful, as for ToV scores (log-prob gains).
    influence = G @ np.linalg.solve(H, g_val)
    return Problem(
        pool=[Point(X[i], float(Y[i])) for i in range(N)],
        target=[Point(Xv[i], float(Yv[i])) for i in range(N_VAL)],
        theta=theta,
        grad_norm=float(np.linalg.norm(g)),
        H=H,
        influence=influence,
        dot=G @ g_val,
    )


def _run_tov(problem: Problem, **options):
    model = torch.nn.Linear(D, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(problem.theta[None, :], dtype=torch.float32))
    opts = {
        "adapter": "full",
        "optimizer": "sgd",
        "batch_size": N,  # full-batch gradient descent
        "base_size": N,  # U = the whole pool
        "grad_clip": 0.0,
    }
    opts.update(options)
    ctx = MethodContext(
        pool=problem.pool,
        target=problem.target,
        pool_records=[],
        target_records=[],
        task=LogRegTask(),
        model=model,
        precision="fp32",
        batch_size=N,
    )
    return get_method("tov", opts).score(ctx)


@pytest.fixture(scope="module")
def parallel(problem: Problem):
    return _run_tov(problem, mode="parallel", weight_decay=LAM, lr=LR, eps=EPS, rounds=ROUNDS)


@pytest.fixture(scope="module")
def basic(problem: Problem):
    # No weight decay here: from theta* a step on the target alone with an L2 penalty
    # would add lambda * theta* to the target gradient, and the limit would no longer
    # be grad l^T grad L_val.
    return _run_tov(problem, mode="basic", weight_decay=0.0, lr=1e-2, val_epochs=1)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(spearmanr(a, b).statistic)


def test_problem_is_exact_and_ill_conditioned(problem: Problem):
    assert problem.grad_norm < 1e-10
    ev = np.linalg.eigvalsh(problem.H)
    assert ev[-1] / ev[0] > 10  # H is far from a multiple of the identity ...
    # ... so the influence function and the plain gradient dot product disagree
    assert _spearman(problem.influence, problem.dot) < 0.85
    assert LR * ev[-1] < 1.0  # gradient descent well inside its stable range
    assert ROUNDS * LR * ev[0] > 25  # and run long enough to converge


def test_parallel_mode_converges_to_influence_function(problem: Problem, parallel):
    # The score averages all rounds, early (unconverged) ones included.
    assert _spearman(parallel.scores, problem.influence) >= 0.95
    # The last round, long after convergence, has the right scale as well:
    # Delta(x) = eps * influence(x) + O(eps^2). (Measured: slope/eps = 1 - 1.7 eps,
    # i.e. 0.97 at eps = 0.02, and 0.92, 0.85 at eps = 0.05, 0.1.)
    last = parallel.columns[f"score_round_{ROUNDS}"]
    slope = float(last @ problem.influence / (problem.influence @ problem.influence))
    assert slope == pytest.approx(EPS, rel=0.1)
    assert np.corrcoef(last, problem.influence)[0, 1] > 0.999
    assert _spearman(last, problem.influence) >= 0.99


def test_basic_mode_is_gradient_dot_product(problem: Problem, basic):
    assert _spearman(basic.scores, problem.dot) >= 0.99


def test_parallel_beats_basic_at_influence(problem: Problem, parallel, basic):
    rho_parallel = _spearman(parallel.scores, problem.influence)
    rho_basic = _spearman(basic.scores, problem.influence)
    assert rho_parallel > rho_basic + 0.1


# -- exact recursions: token mean, and interleaved rounds ---------------------------------
#
# The tests above use one label token per example and check limits, so they could not
# tell a per-example token *sum* from the token mean, nor an interleaved run that
# continues each round from the base-trained weights from one that continues from the
# target-tuned weights. The two below replay ToV's recursion by hand in float64.


@dataclass(frozen=True)
class Tokens:
    """An example of several label tokens: features x_t (rows) and labels y_t."""

    x: np.ndarray  # (T, D)
    y: np.ndarray  # (T,)


class MultiTokenLogRegTask(Task):
    """Token t of an example: log p = log sigmoid(y_t <theta, x_t>)."""

    def length(self, example: Tokens) -> int:
        return len(example.y)

    def n_labels(self, example: Tokens) -> int:
        return len(example.y)

    def collate(self, examples):
        return {
            "x": torch.tensor(np.concatenate([e.x for e in examples]), dtype=torch.float32),
            "y": torch.tensor(np.concatenate([e.y for e in examples]), dtype=torch.float32),
            "row": torch.tensor(np.repeat(np.arange(len(examples)),
                                          [len(e.y) for e in examples])),
        }

    def label_logprobs(self, model, batch):
        margin = model(batch["x"]).squeeze(-1) * batch["y"]
        return -torch.nn.functional.softplus(-margin), batch["row"]


def _token_examples(rng, n: int, shift: float) -> list[Tokens]:
    out = []
    for _ in range(n):
        t = int(rng.integers(1, 7))  # 1 to 6 label tokens
        x = rng.normal(size=(t, D)) + shift
        out.append(Tokens(x, np.where(rng.random(t) < 0.5, 1.0, -1.0)))
    return out


def _logsig(z: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -z)


def _mean_token_logp(ex: Tokens, theta: np.ndarray) -> float:
    return float(_logsig(ex.y * (ex.x @ theta)).mean())


def _loss_grad(examples: list[Tokens], theta: np.ndarray) -> np.ndarray:
    """Gradient of the training loss: the mean over examples of each example's mean
    token log-loss."""
    g = np.zeros_like(theta)
    for e in examples:
        s = -e.y * _sigmoid(-e.y * (e.x @ theta))  # d(-log sigmoid(y m)) / dm
        g += (s[:, None] * e.x).mean(0)
    return g / len(examples)


def _run(pool, target, theta0, new_head=False, **options):
    model = torch.nn.Linear(D, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(theta0[None, :], dtype=torch.float32))
    opts = {"adapter": "full", "optimizer": "sgd", "grad_clip": 0.0,
            "batch_size": max(len(pool), len(target)), "base_size": len(pool)}
    ctx = MethodContext(pool=pool, target=target, pool_records=[], target_records=[],
                        task=MultiTokenLogRegTask(), model=model, precision="fp32",
                        batch_size=len(pool), new_head=new_head)
    return get_method("tov", {**opts, **options}).score(ctx)


def test_basic_scores_are_the_token_mean_of_log_prob_changes():
    rng = np.random.default_rng(1)
    pool, target = _token_examples(rng, 40, 0.0), _token_examples(rng, 10, 0.8)
    theta0 = rng.normal(size=D) * 0.3
    lr = 0.5
    res = _run(pool, target, theta0, mode="basic", lr=lr, val_epochs=1)
    theta1 = theta0 - lr * _loss_grad(target, theta0)  # one full-batch SGD step
    want = np.array([_mean_token_logp(e, theta1) - _mean_token_logp(e, theta0) for e in pool])
    np.testing.assert_allclose(res.scores, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    # a per-example token sum would be far off: the examples have 1 to 6 tokens
    sums = want * np.array([len(e.y) for e in pool])
    assert np.abs(sums - want).max() > 100 * (1e-4 * np.abs(want).max())


def test_interleaved_continues_each_round_from_the_target_tuned_weights():
    rng = np.random.default_rng(2)
    pool, target = _token_examples(rng, 30, 0.0), _token_examples(rng, 8, 1.0)
    theta0 = rng.normal(size=D) * 0.3
    lr, eps, wd, rounds = 0.4, 0.5, 0.01, 3
    res = _run(pool, target, theta0, mode="interleaved", lr=lr, eps=eps, weight_decay=wd,
               rounds=rounds)

    def replay(continue_from_target: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        theta, per_round = theta0.copy(), []
        for _ in range(rounds):
            bas = theta - lr * (_loss_grad(pool, theta) + wd * theta)  # SGD weight decay
            val = bas - lr * eps * _loss_grad(target, bas)  # no penalty on target epochs
            per_round.append(np.array([_mean_token_logp(e, val) - _mean_token_logp(e, bas)
                                       for e in pool]))
            theta = val if continue_from_target else bas
        return np.mean(per_round, axis=0), per_round

    want, want_rounds = replay(True)
    wrong, _ = replay(False)
    tol = 1e-4 * np.abs(want).max()
    for k in range(rounds):
        np.testing.assert_allclose(res.columns[f"score_round_{k + 1}"], want_rounds[k],
                                   rtol=1e-4, atol=tol)
    np.testing.assert_allclose(res.scores, want, rtol=1e-4, atol=tol)
    # continuing from the base-trained weights gives other scores, far beyond the tolerance
    assert np.abs(wrong - want).max() > 100 * tol


def test_basic_warmup_measures_the_target_fine_tune_from_the_base_trained_weights():
    """With a new head (or warmup=on), basic mode first trains on the base set U, and the
    scores are the log-prob changes of the target fine-tune from there."""
    rng = np.random.default_rng(3)
    pool, target = _token_examples(rng, 30, 0.0), _token_examples(rng, 8, 1.0)
    theta0 = rng.normal(size=D) * 0.3
    lr = 0.4
    warm = theta0 - lr * _loss_grad(pool, theta0)  # base_size >= pool: U is the pool
    val = warm - lr * _loss_grad(target, warm)
    want = np.array([_mean_token_logp(e, val) - _mean_token_logp(e, warm) for e in pool])
    tol = 1e-4 * np.abs(want).max()
    on = _run(pool, target, theta0, mode="basic", lr=lr, warmup="on")
    np.testing.assert_allclose(on.scores, want, rtol=1e-4, atol=tol)
    assert on.info["rounds"][0]["warmup_examples"] == len(pool)
    assert on.base_set is not None and len(on.base_set) == len(pool)
    new_head = _run(pool, target, theta0, new_head=True, mode="basic", lr=lr)  # auto
    np.testing.assert_array_equal(new_head.scores, on.scores)
    # auto without a new head, and off: no warm-up
    cold = theta0 - lr * _loss_grad(target, theta0)
    want_cold = np.array([_mean_token_logp(e, cold) - _mean_token_logp(e, theta0)
                          for e in pool])
    for res in (_run(pool, target, theta0, mode="basic", lr=lr),
                _run(pool, target, theta0, new_head=True, mode="basic", lr=lr, warmup="off")):
        np.testing.assert_allclose(res.scores, want_cold, rtol=1e-4, atol=tol)
        assert "warmup_examples" not in res.info["rounds"][0] and res.base_set is None
    assert np.abs(want - want_cold).max() > 100 * tol


def test_the_loader_says_when_a_token_classification_head_is_new(tiny_lm_dir, tiny_ner_dir,
                                                                 tiny_tagger_dir):
    """``warmup=auto`` follows this flag (through ``MethodContext.new_head``)."""
    from finesift.models.loader import load_model

    assert load_model(str(tiny_ner_dir), "ner", labels=["O", "B-PER", "I-PER"]).new_head
    assert not load_model(str(tiny_tagger_dir), "ner", labels=["O", "B-PER", "I-PER"]).new_head
    assert not load_model(str(tiny_lm_dir), "lm").new_head
