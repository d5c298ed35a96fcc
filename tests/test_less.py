"""less and tracin: the projection keeps inner products (JL), batched per-example LoRA
gradients equal one-at-a-time autograd, the Adam direction matches a hand computation,
planted near-copies of the target rank first, a killed run resumes to the same scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_tov_planted import N_POOL, Data

import finesift.methods.less as less_module
from finesift.data.records import Record
from finesift.engine import projection as PR
from finesift.engine.train import LoraOptions, add_lora
from finesift.errors import OptionError
from finesift.methods import MethodContext, get_method
from finesift.methods import _gradients as G
from finesift.methods.less import aggregate
from finesift.testing import tiny_causal_lm

FAST = {"lr": 3e-3, "proj_dim": 512, "warmup_fraction": 0.1, "warmup_epochs": 2}


@pytest.fixture(scope="module")
def data() -> Data:
    return Data()


def ctx_for(data: Data, workdir=None, target_records=None, seed=0) -> MethodContext:
    return MethodContext(
        pool=data.pool, target=data.target, pool_records=[],
        target_records=target_records or [], task=data.task,
        model=tiny_causal_lm(len(data.tok)), precision="fp32", seed=seed, batch_size=32,
        workdir=workdir,
    )


# -- projection ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sparse"])
def test_projection_preserves_inner_products_within_the_jl_bound(kind):
    n_points, P, d = 20, 3000, 2048
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n_points, P))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[1] = 0.6 * x[0] + 0.8 * x[1]  # a correlated pair, so not every product is ~0
    x[1] /= np.linalg.norm(x[1])
    # small blocks: the matrix is generated in many seeded pieces
    proj = PR.Projector(P, d, kind, seed=3, block_elems=(8 if kind == "sparse" else d) * 256)
    assert proj.n_blocks == math.ceil(P / 256)
    y = proj(torch.from_numpy(x).float()).double().numpy()
    err = np.abs(y @ y.T - x @ x.T).max()
    assert err < PR.jl_eps(n_points, d)
    # and it is a real projection: a far too small d breaks the bound's spirit
    assert err > 1e-3
    # seeded and chunk-independent: the same rows projected alone give the same result
    again = PR.Projector(P, d, kind, seed=3, block_elems=(8 if kind == "sparse" else d) * 256,
                        cache_elems=0)
    np.testing.assert_allclose(again(torch.from_numpy(x[:3]).float()).numpy(), y[:3], atol=1e-5)
    other = PR.Projector(P, d, kind, seed=4, block_elems=d * 256)
    assert not np.allclose(other(torch.from_numpy(x[:3]).float()).numpy(), y[:3])


def test_sparse_projection_is_the_dense_matrix_it_describes():
    P, d, s = 50, 32, 4
    proj = PR.Projector(P, d, "sparse", seed=0, sparsity=s)
    pos, val = proj.sparse_block(0)
    R = torch.zeros(P, d)
    R[torch.arange(P)[:, None], pos] = val
    # one nonzero per block of d / s outputs, each +-1/sqrt(s): unit-norm rows
    assert torch.all((R != 0).reshape(P, s, d // s).sum(-1) == 1)
    np.testing.assert_allclose(R.norm(dim=1).numpy(), 1.0, rtol=1e-6)
    x = torch.randn(3, P)
    np.testing.assert_allclose(proj(x).numpy(), (x @ R).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(OptionError, match="multiple"):
        PR.Projector(P, 30, "sparse", sparsity=4)


def test_projection_entries_have_the_right_scale():
    R = PR.Projector(1000, 256, "rademacher", seed=0).block(0)
    np.testing.assert_allclose(np.unique(np.abs(R.numpy())), 1 / 16)
    Rg = PR.Projector(4000, 256, "gaussian", seed=0).block(0).numpy()
    assert abs(Rg.var() * 256 - 1) < 0.02


# -- per-example gradients -------------------------------------------------------------


def test_batched_per_example_grads_equal_one_at_a_time_autograd(data: Data):
    model = add_lora(tiny_causal_lm(len(data.tok), seed=5), "lm", LoraOptions(rank=4), seed=0)
    # move B off zero so both LoRA factors have non-zero gradients
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    params = G.trainable_linear_params(model)
    assert len(params) == 2 * 7 * 2  # A and B of 7 linear layers in 2 blocks
    # examples of different lengths, so batches are padded
    exs = [data.pool[0], data.target[1], data.pool[3]]
    exs[1] = type(exs[1])(1, exs[1].input_ids[:7], exs[1].labels[:7], 6)
    flat, losses = G.batched_grads(model, data.task, exs, params, batch_size=8)
    tracked = [getattr(m, a) for _, m, a in params]
    for i, ex in enumerate(exs):
        model.eval()
        batch = data.task.collate([ex])
        loss = G.per_example_loss(data.task, model, batch, 1)[0]
        grads = torch.autograd.grad(loss, tracked)
        ref = torch.cat([g.reshape(-1) for g in grads])
        assert abs(float(loss.detach()) - float(losses[i])) < 1e-5
        torch.testing.assert_close(flat[i], ref, atol=1e-6, rtol=1e-4)
        assert ref.abs().max() > 1e-4
    model.unload()


def test_a_non_linear_trainable_parameter_is_refused(data: Data):
    model = tiny_causal_lm(len(data.tok))
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)
    with pytest.raises(OptionError, match="nn.Linear"):
        G.trainable_linear_params(model)


# -- Adam preconditioning --------------------------------------------------------------


def test_adam_direction_matches_a_hand_computation():
    g = torch.tensor([[0.5, -2.0, 0.0]])
    m = torch.tensor([[0.1, 0.2, -0.3]])
    v = torch.tensor([[0.01, 0.04, 0.09]])
    step, (b1, b2), eps = 3, (0.9, 0.999), 1e-8
    paper = G.adam_direction(g, m, v, step, (b1, b2), eps, formula="paper")
    reference = G.adam_direction(g, m, v, step, (b1, b2), eps)  # the default
    for j in range(3):
        mj = 0.9 * float(m[0, j]) + 0.1 * float(g[0, j])
        vj = 0.999 * float(v[0, j]) + 0.001 * float(g[0, j]) ** 2
        mh, vh = mj / (1 - 0.9**4), vj / (1 - 0.999**4)
        assert math.isclose(float(paper[0, j]), mh / (math.sqrt(vh) + eps), rel_tol=1e-5)
        # LESS's code: no bias correction, eps inside the root
        assert math.isclose(float(reference[0, j]), mj / math.sqrt(vj + eps), rel_tol=1e-5)
    with pytest.raises(ValueError, match="reference, paper"):
        G.adam_direction(g, m, v, step, (b1, b2), eps, formula="adamw")


def test_reference_adam_direction_floors_the_denominator_at_sqrt_eps():
    """Coordinates whose second moment is far below eps are divided by about sqrt(eps)
    in LESS's code, by their own scale in the paper's formula."""
    g = torch.tensor([[1e-7, 1e-3]])
    m = torch.zeros(1, 2)
    v = torch.zeros(1, 2)
    ref = G.adam_direction(g, m, v, 100, (0.9, 0.999), 1e-8)
    paper = G.adam_direction(g, m, v, 100, (0.9, 0.999), 1e-8, formula="paper")
    # tiny coordinate: m = 1e-8, v = 1e-17 -> m / sqrt(v + 1e-8) ~ 1e-8 / 1e-4
    assert math.isclose(float(ref[0, 0]), 1e-8 / math.sqrt(1e-17 + 1e-8), rel_tol=1e-4)
    assert float(ref[0, 0]) < 1e-3 * float(paper[0, 0])
    # large coordinate: v = 1e-9 is below eps too, but the floor matters less
    assert float(ref[0, 1]) < float(paper[0, 1])


def test_adam_direction_is_torch_adams_next_update():
    """One step of torch's Adam from the same moments moves by -lr * our direction."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.Adam([p], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (p**3).sum().backward()
        opt.step()
    st = opt.state[p]
    m, v, step = st["exp_avg"].clone(), st["exp_avg_sq"].clone(), int(st["step"])
    g = torch.randn(5)
    before = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    want = G.adam_direction(g[None], m[None], v[None], step, (0.9, 0.999), 1e-8,
                            formula="paper")[0]
    torch.testing.assert_close((before - p.detach()) / 0.1, want, atol=1e-6, rtol=1e-5)


def test_aggregate_is_max_over_subtasks_of_the_mean():
    sim = np.array([[1.0, 3.0, 0.0, 0.0], [0.0, 0.0, 5.0, -1.0]])
    assert aggregate(sim, np.array([0, 0, 1, 1])).tolist() == [2.0, 2.0]
    assert aggregate(sim, np.zeros(4, dtype=int)).tolist() == [1.0, 1.0]


# -- planted signal --------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(data: Data):
    return {name: get_method(name, FAST).score(ctx_for(data)) for name in ("less", "tracin")}


@pytest.mark.parametrize("name", ["less", "tracin"])
def test_planted_near_copies_rank_first(data: Data, runs, name):
    res = runs[name]
    assert res.scores.shape == (N_POOL,)
    assert np.isfinite(res.scores).all()
    for col in res.columns.values():
        assert col.shape == (N_POOL,) and np.isfinite(col).all()
    # chance: 2 of the top 20
    assert data.hits(res.scores) >= 14
    assert res.info["checkpoints"] == 2 and res.info["warmup_examples"] == 20


def test_less_cosines_are_bounded_and_tracin_differs(runs):
    lrs = [3e-3, 1.5e-3]  # linear schedule over 2 epochs
    assert np.all(np.abs(runs["less"].scores) <= sum(lrs) + 1e-9)
    assert not np.allclose(runs["less"].scores, runs["tracin"].scores)


def test_subtasks_take_the_max_of_per_subtask_means(data: Data, runs):
    recs = [
        Record(id=f"t{i}", source="t", row=i, shape="text", raw={}, text="x",
               meta={"subtask": "a" if i < 8 else "b"})
        for i in range(len(data.target))
    ]
    res = get_method("less", FAST).score(ctx_for(data, target_records=recs))
    assert res.info["target_subtasks"] == 2
    # the max of two group means is at least the overall mean
    assert np.all(res.scores >= runs["less"].scores - 1e-9)
    assert data.hits(res.scores) >= 14


def test_bad_options_are_refused():
    for bad in ({"projection": "dense"}, {"proj_dim": 0}, {"warmup_fraction": 0},
                {"projection": "sparse", "proj_dim": 100, "sparsity": 8}):
        with pytest.raises(OptionError):
            get_method("less", bad)


def test_sparse_projection_keeps_the_planted_ranking(data: Data, runs):
    """``projection=sparse`` ranks the planted helpful examples like the dense default."""
    dense = runs["less"]
    sparse = get_method("less", {**FAST, "projection": "sparse"}).score(ctx_for(data))
    assert data.hits(sparse.scores) >= 14
    assert data.hits(dense.scores) >= 14


# -- resume ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["less", "tracin"])
def test_killed_run_resumes_to_the_same_scores(data: Data, runs, tmp_path, monkeypatch, name):
    opts = {**FAST, "chunk_size": 64}
    real = less_module._project_chunk
    calls = {"n": 0}

    def dying(projector, flat):
        calls["n"] += 1
        if calls["n"] == 5:  # checkpoint 1's pool is 4 chunks: die in the target's first
            raise RuntimeError("killed")
        return real(projector, flat)

    monkeypatch.setattr(less_module, "_project_chunk", dying)
    with pytest.raises(RuntimeError, match="killed"):
        get_method(name, opts).score(ctx_for(data, workdir=tmp_path))
    assert list(tmp_path.glob(f"{name}-*/warmup.pt"))

    counted = {"n": 0}

    def counting(projector, flat):
        counted["n"] += 1
        return real(projector, flat)

    monkeypatch.setattr(less_module, "_project_chunk", counting)
    resumed = get_method(name, opts).score(ctx_for(data, workdir=tmp_path))
    # 2 checkpoints x (4 pool + 1 target chunks) = 10; the first 4 were kept
    assert counted["n"] == 10 - 4
    fresh = get_method(name, opts).score(ctx_for(data))
    np.testing.assert_allclose(resumed.scores, fresh.scores, rtol=1e-6, atol=1e-12)
    # a finished run is read back entirely from its store
    counted["n"] = 0
    again = get_method(name, opts).score(ctx_for(data, workdir=tmp_path))
    assert counted["n"] == 0
    np.testing.assert_array_equal(again.scores, resumed.scores)


# -- through select() ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["less", "tracin"])
def test_select_end_to_end_picks_planted_records_and_reuses_its_store(
    lm_data, tiny_lm_dir, tmp_path, method
):
    import finesift

    budget = len(lm_data.planted)
    args = {"budget": budget, "method": method, "method_options": FAST,
            "model": str(tiny_lm_dir), "precision": "fp32", "batch_size": 32,
            "out": tmp_path / "run"}
    sel = finesift.select(lm_data.pool, lm_data.target, **args)
    assert sel.scores.shape == (len(lm_data.usable),) and np.isfinite(sel.scores).all()
    hits = len(set(sel.selected_ids) & lm_data.planted)
    assert hits >= budget * 0.7
    info = sel.manifest["method_info"]
    assert info["checkpoints"] == 2 and info["proj_dim"] == FAST["proj_dim"]
    assert info["store_bytes"] > 0 and info["seconds_projection"] > 0
    store = list((tmp_path / "run" / ".work").glob(f"{method}-*"))
    assert len(store) == 1
    names = {p.name for p in store[0].glob("ckpt*-*.npy")}
    assert {"ckpt0-target.npy", "ckpt1-target.npy"} <= names
    n_chunks = -(-len(lm_data.usable) // finesift.methods.less.GradInfluenceOptions().chunk_size)
    for k in (0, 1):  # one file per checkpoint and pool chunk
        assert sum(n.startswith(f"ckpt{k}-pool-chunk") for n in names) == n_chunks
    again = finesift.select(lm_data.pool, lm_data.target, **args)
    np.testing.assert_array_equal(again.scores, sel.scores)
