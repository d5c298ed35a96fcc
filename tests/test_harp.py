"""HARP: empirical Bayes beats raw measurements and parent means on planted utilities;
the envelopes and the best-prefix rule choose the right leaves; on a tiny real model the
chosen leaves come from the target's own region."""

from __future__ import annotations

import numpy as np
import pytest

from finesift.data.records import Example
from finesift.engine.tasks import CausalLMTask
from finesift.errors import OptionError
from finesift.methods import MethodContext, get_method
from finesift.methods.harp import Harp, HarpOptions, token_embeddings
from finesift.methods.harp_core import (
    build_tree,
    eb_posterior,
    envelope_value,
    greedy_select,
    representative_leaves,
)
from finesift.testing import tiny_causal_lm, tiny_tokenizer

# -- empirical Bayes ---------------------------------------------------------------------


def planted(seed: int, *, per_parent_measured: int = 3, noise: float = 0.5):
    """3 regions x 4 parents x 8 leaves; region, parent and leaf effects; noisy
    measurements of the first ``per_parent_measured`` leaves of every parent."""
    rng = np.random.default_rng(seed)
    R, PR, LP = 3, 4, 8
    parent_region = np.repeat(np.arange(R), PR)
    leaf_parent = np.repeat(np.arange(R * PR), LP)
    mu_p = rng.normal(0, 1, R)[parent_region] + rng.normal(0, 0.5, R * PR)
    phi = mu_p[leaf_parent] + rng.normal(0, 0.3, len(leaf_parent))
    measured = np.concatenate(
        [np.flatnonzero(leaf_parent == p)[:per_parent_measured] for p in range(R * PR)]
    )
    hat = phi[measured] + rng.normal(0, noise, len(measured))
    return phi, measured, hat, leaf_parent, parent_region


@pytest.mark.parametrize("per_parent_measured,noise", [(3, 0.5), (1, 0.5), (3, 0.1)])
def test_eb_posterior_beats_raw_and_parent_means(per_parent_measured, noise):
    errs = []
    for seed in range(100):
        phi, measured, hat, leaf_parent, parent_region = planted(
            seed, per_parent_measured=per_parent_measured, noise=noise
        )
        post = eb_posterior(measured, hat, noise**2, leaf_parent, parent_region)
        assert post.mean.shape == (len(phi), 1) and np.all(post.var > 0)
        par = leaf_parent[measured]
        parent_mean = np.array([hat[par == p].mean() for p in range(len(parent_region))])
        errs.append([
            np.mean((post.mean[measured, 0] - phi[measured]) ** 2),
            np.mean((hat - phi[measured]) ** 2),
            np.mean((parent_mean[par] - phi[measured]) ** 2),
            np.mean((post.mean[:, 0] - phi) ** 2),
            np.mean((parent_mean[leaf_parent] - phi) ** 2),
        ])
    e_post, e_raw, e_parent, e_post_all, e_parent_all = np.mean(errs, axis=0)
    assert e_post < 0.95 * e_raw or per_parent_measured == 1 and e_post < e_raw
    assert e_post < e_parent
    assert e_post_all < e_parent_all


def test_eb_measured_leaves_shrink_toward_parent():
    # one parent, measurements spread around 1.0 with large noise: the extremes move in
    leaf_parent = np.zeros(6, dtype=np.int64)
    hat = np.array([0.2, 1.0, 1.8, 1.1, 0.9])
    post = eb_posterior(np.arange(5), hat, 0.5, leaf_parent, np.array([0]))
    assert post.mean[0, 0] > 0.2 and post.mean[2, 0] < 1.8
    assert abs(post.mean[5, 0] - hat.mean()) < 0.2  # the unmeasured leaf: about the mean
    assert post.var[5, 0] > post.var[:5, 0].max()


# -- envelopes ---------------------------------------------------------------------------


def test_harp_c_skips_a_duplicate_leaf():
    # two domains; leaves 0 and 1 are duplicates helping domain 0, leaf 2 helps domain 1
    phi = np.array([[0.3, 0.0], [0.3, 0.0], [0.0, 0.1]])
    b = np.array([0.2, 0.2])
    g = greedy_select(phi, b, "c")
    assert sorted(g.chosen.tolist()) == [0, 2]
    assert g.values[g.n_best] == pytest.approx(envelope_value([0, 2], phi, b, "c"))
    assert envelope_value([0, 1, 2], phi, b, "c") == pytest.approx(envelope_value([0, 2], phi, b))


def test_harp_e_adds_complementary_leaves():
    phi = np.array([[0.3, 0.0], [0.3, 0.0], [0.0, 0.1]])
    b = np.array([0.2, 0.2])
    g = greedy_select(phi, b, "e")
    assert sorted(g.chosen.tolist()) == [0, 1, 2]
    assert envelope_value([0, 1, 2], phi, b, "e") == pytest.approx(0.2 + 0.35)
    # under E, a leaf whose help is already clipped at 1 adds nothing
    g = greedy_select(np.array([[0.5], [0.5]]), np.array([0.6]), "e")
    assert g.chosen.tolist() == [0]


def test_best_prefix_stops_before_a_harmful_leaf():
    phi = np.array([[0.2], [0.1], [-0.3], [0.05]])
    for kind in ("c", "e"):
        g = greedy_select(phi, np.array([0.3]), kind)
        assert len(g.order) == 4  # greedy ran on through the harmful leaf ...
        assert 2 not in g.chosen.tolist()  # ... but the kept prefix stops before it
        assert g.values[-1] < g.values[g.n_best]
    # a mixed leaf: helps one domain, harms the other more: never chosen
    phi = np.array([[0.2, -0.3], [0.05, 0.05]])
    assert greedy_select(phi, np.array([0.5, 0.5]), "e").chosen.tolist() == [1]
    # nothing helps: nothing is chosen
    assert len(greedy_select(np.array([[-0.1], [-0.2]]), np.array([0.5]), "c").chosen) == 0


def test_budget_caps_the_chosen_examples():
    phi = np.array([[0.3], [0.2], [0.1]])
    sizes = np.array([50, 40, 30])
    g = greedy_select(phi, np.array([0.1]), "e", sizes=sizes, budget=80)
    assert g.chosen.tolist() == [0, 2]  # leaf 1 would not fit after leaf 0
    assert sizes[g.chosen].sum() <= 80


# -- hierarchy ---------------------------------------------------------------------------


def test_tree_nests_and_representatives_spread():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (4, 5))
    emb = np.concatenate([c + rng.normal(0, 1, (60, 5)) for c in centres])
    tree = build_tree(emb, leaf_size=10, parent_leaves=3, region_parents=2, seed=0)
    assert tree.n_leaves == 24 and tree.leaf_sizes().sum() == 240
    # every leaf lies inside one blob
    for g in range(tree.n_leaves):
        assert len(set((np.flatnonzero(tree.leaf == g) // 60).tolist())) == 1
    reps = representative_leaves(tree, 2)
    n_parents = len(tree.parent_centres)
    assert len(set(reps.tolist())) == len(reps)
    # the first pass covers every parent once, with its leaf nearest the parent's centre
    first = reps[:n_parents]
    assert sorted(tree.leaf_parent[first].tolist()) == list(range(n_parents))
    for g in first:
        p = tree.leaf_parent[g]
        sib = np.flatnonzero(tree.leaf_parent == p)
        d = np.linalg.norm(tree.leaf_centres[sib] - tree.parent_centres[p], axis=1)
        assert sib[np.argmin(d)] == g
    assert len(representative_leaves(tree, 2, max_runs=5)) == 5
    # a leaf size above the pool size gives one leaf
    assert build_tree(emb[:7], leaf_size=64).n_leaves == 1


def test_options_are_checked():
    with pytest.raises(OptionError, match="envelope"):
        get_method("harp", {"envelope": "x"})
    with pytest.raises(OptionError, match="embedder"):
        get_method("harp", {"embedder": "nope"})
    assert get_method("harp", {"budget": "100"}).options.budget == 100


# -- tiny real model -----------------------------------------------------------------------

PATTERN = ["alpha", "beta", "gamma", "delta", "zeta", "theta", "kappa", "sigma", "omega", "lambda"]
FRUIT = ["apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "peach", "pear", "plum"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
SEQ = 12
PER_REGION = 32


def make_tiny():
    """Pool: three regions of 32 sequences (region 0 = the target's pattern, 1 = fruit
    words, 2 = number words), shuffled; target: 16 pattern sequences."""
    tok = tiny_tokenizer()
    rng = np.random.default_rng(0)

    def enc(words, i):
        ids = np.array([tok.bos_token_id, *tok.convert_tokens_to_ids(words)], dtype=np.int64)
        labels = ids.copy()
        labels[0] = -100
        return Example(i, ids, labels, len(ids) - 1)

    def pattern():
        s = int(rng.integers(0, len(PATTERN)))
        return [PATTERN[(s + j) % len(PATTERN)] for j in range(SEQ)]

    pool, region = [], []
    for r, make in enumerate([pattern, lambda: list(rng.choice(FRUIT, SEQ)),
                              lambda: list(rng.choice(NUMBERS, SEQ))]):
        for _ in range(PER_REGION):
            pool.append(enc([str(w) for w in make()], len(pool)))
            region.append(r)
    order = rng.permutation(len(pool))  # no help from the pool's order
    pool = [pool[i] for i in order]
    region = np.array(region)[order]
    target = [enc(pattern(), i) for i in range(16)]
    return tok, pool, region, target


@pytest.fixture(scope="module")
def tiny():
    return make_tiny()  # (conftest runs torch on one thread)


def run_tiny(tiny, workdir=None, **options):
    tok, pool, _, target = tiny
    ctx = MethodContext(pool=pool, target=target, pool_records=[], target_records=[],
                        task=CausalLMTask(tok.pad_token_id), model=tiny_causal_lm(len(tok)),
                        precision="fp32", batch_size=32, workdir=workdir)
    opts = {"embedder": "tokens", "leaf_size": 8, "parent_leaves": 3, "region_parents": 2,
            "leaves_per_parent": 2, "repeats": 1, "steps": 4, "lr": 3e-3, **options}
    return get_method("harp", opts).score(ctx)


@pytest.mark.parametrize("envelope", ["c", "e"])
def test_tiny_model_chooses_the_target_region(tiny, envelope):
    _, pool, region, _ = tiny
    res = run_tiny(tiny, envelope=envelope)
    info = res.info
    leaf = res.columns["harp_leaf"]
    assert res.scores.shape == (len(pool),) and np.all(np.isfinite(res.scores))
    assert info["train_evaluate_runs"] == len([m for m in info["leaves"]["measured"] if m]) + 1
    chosen = res.scores > 1
    assert chosen.sum() == info["n_selected_by_harp"] > 0
    assert set(leaf[chosen].tolist()) == set(info["leaves_chosen"])
    # the selection is the union of the chosen leaves, in greedy order
    assert sorted(res.chosen.tolist()) == np.flatnonzero(chosen).tolist()
    assert leaf[res.chosen[0]] == info["leaves_chosen"][0]
    # mostly from the target's own region
    assert np.mean(region[chosen] == 0) >= 0.75, (envelope, region[chosen])
    # the scores put chosen examples first, then posterior order
    pm = res.columns["harp_posterior_mean"]
    rest = ~chosen
    assert np.all(np.diff(res.scores[rest][np.argsort(pm[rest])]) >= 0)
    # leaf-level agreement of the per-example columns
    for g in np.unique(leaf):
        assert len(set(res.columns["harp_parent"][leaf == g].tolist())) == 1


def test_tiny_model_budget_cap(tiny):
    res = run_tiny(tiny, envelope="e", budget=8)
    assert 0 < res.info["n_selected_by_harp"] <= 8
    assert res.info["budget"] == 8


def test_tiny_model_resumes_from_its_workdir(tiny, tmp_path, monkeypatch):
    import finesift.methods.harp as harp_module

    first = run_tiny(tiny, workdir=tmp_path, envelope="e")
    assert first.info["runs_reused_from_workdir"] == 0
    assert len(list(tmp_path.glob("harp_runs-*.json"))) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(harp_module, "train", no_training)
    again = run_tiny(tiny, workdir=tmp_path, envelope="e")
    assert again.info["runs_reused_from_workdir"] == first.info["train_evaluate_runs"]
    np.testing.assert_array_equal(again.scores, first.scores)
    # another envelope and budget do not change the measurements: all reused
    other = run_tiny(tiny, workdir=tmp_path, envelope="c", budget=8)
    assert other.info["runs_reused_from_workdir"] == first.info["train_evaluate_runs"]
    # other training options: nothing reused (and so, here, training is attempted)
    with pytest.raises(AssertionError, match="trained again"):
        run_tiny(tiny, workdir=tmp_path, envelope="e", steps=3)


def test_token_embeddings_are_unit_norm(tiny):
    _, pool, _, _ = tiny
    e = token_embeddings(pool[:5])
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0)
    assert isinstance(Harp(HarpOptions(), embed_fn=lambda ctx: e).embed_fn(None), np.ndarray)


# -- through select() ----------------------------------------------------------------------


def test_select_runs_harp_and_writes_its_tables(tmp_path, tiny_lm_dir):
    import json

    import pandas as pd

    import finesift

    model_dir = tiny_lm_dir
    rng = np.random.default_rng(1)

    def pattern():
        s = int(rng.integers(0, len(PATTERN)))
        return " ".join(PATTERN[(s + j) % len(PATTERN)] for j in range(SEQ))

    pool = [{"id": f"p{i}", "text": pattern()} for i in range(10)]
    pool += [{"id": f"f{i}", "text": " ".join(rng.choice(FRUIT, SEQ))} for i in range(20)]
    target = [{"text": pattern()} for _ in range(8)]
    for name, rows in (("pool", pool), ("target", target)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = {"embedder": "tokens", "leaf_size": 5, "steps": 4, "lr": 3e-3, "repeats": 1}
    sel = finesift.select(  # the budget reaches HARP without -o budget=
        tmp_path / "pool.jsonl", tmp_path / "target.jsonl", budget=12, method="harp",
        method_options=opts, model=str(model_dir), out=tmp_path / "out", precision="fp32",
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    info = manifest["method_info"]
    assert 0 < info["n_selected_by_harp"] <= 12 and info["budget"] == 12
    # the selection is HARP's own choice, possibly fewer than the budget
    assert len(sel.selected) == info["n_selected_by_harp"] == manifest["selected"]["count"]
    assert manifest["budget"]["count"] == 12
    filled = finesift.select(
        tmp_path / "pool.jsonl", tmp_path / "target.jsonl", budget=12, method="harp",
        method_options={**opts, "fill": True}, model=str(model_dir), out=tmp_path / "filled",
        precision="fp32", workdir=tmp_path / "out" / ".work",
    )
    assert len(filled.selected) == 12
    assert filled.manifest["method_info"]["runs_reused_from_workdir"] == \
        info["train_evaluate_runs"]
    sel = filled
    assert info["train_evaluate_runs"] >= 2
    assert len(info["leaves"]["posterior_mean"]) == info["tree"]["n_leaves"]
    table = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    for col in ("harp_leaf", "harp_parent", "harp_region", "harp_posterior_mean"):
        assert col in table.columns
    # HARP's own choice comes first in the selection
    first = sel.selected_ids[: info["n_selected_by_harp"]]
    assert sum(i.startswith("p") for i in first) >= 0.75 * len(first)


def test_fixed_envelope_methods_and_the_cli_flag(tmp_path):
    from finesift.cli import main
    from finesift.methods.base import available

    assert {"harp", "harp-c", "harp-e"} <= set(available())
    assert get_method("harp-e").options.envelope == "e"
    assert get_method("harp-c").options.envelope == "c"
    with pytest.raises(OptionError, match="fixed"):
        get_method("harp-e", {"envelope": "c"}).options.validate()
    (tmp_path / "p.jsonl").write_text('{"text": "a b"}\n')
    code = main(["select", "--method", "tov", "--envelope", "e", "--pool",
                 str(tmp_path / "p.jsonl"), "--target", str(tmp_path / "p.jsonl"),
                 "--budget", "1", "--out", str(tmp_path / "o")])
    assert code == 2
