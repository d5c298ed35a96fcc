"""``tov --proxy iprox:RHO`` (and ``perplexity``/``uncertainty``): rho = 0 gives the plain
scores bit for bit; a compressing proxy trains and scores on the factored copy (fewer LoRA
parameters, other but correlated scores, the planted records still first) and reports
itself in the result; the CLI runs it end to end and a second run loads the cached proxy;
the resume state of a proxy run is kept apart from a full-model run's; executor workers
rebuild the proxy from its blob; ``--estimate`` counts the proxy build; bad specs are
refused when the options are read."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy.stats import spearmanr
from test_tov_planted import Data

from finesift.errors import OptionError
from finesift.executors import LocalExecutor
from finesift.methods import MethodContext, get_method
from finesift.methods.base import option_identity
from finesift.methods.tov import ToVOptions
from finesift.models import proxy as I
from finesift.testing import tiny_causal_lm

# two short interleaved rounds on a base set of 50 (about 15 s a run on one busy core)
TOV = {"mode": "interleaved", "rounds": 2, "base_size": 50, "lr": 3e-3, "eps": 0.5}
# the tiny Llama's 32 x 32, 16 x 32 and 64 x 32 linears: block 4 factors all 14 of them
SPEC = "iprox:0.5,block_size=4,probe_examples=32,align_epochs=1"
# tov's options for lm_data through select() / the CLI (79 pool examples)
LM_TOV = {"mode": "interleaved", "rounds": 2, "base_size": 16, "lr": 3e-3, "chunk_size": 16}
LM_SPEC = "iprox:0.5,block_size=4,probe_examples=16,align_epochs=1"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """finesift's cache (where runs with a work folder keep their proxies) in a temporary
    folder for the module."""
    path = tmp_path_factory.mktemp("fscache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINESIFT_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def data() -> Data:
    return Data()


def ctx_for(data: Data, workdir=None, **kw) -> MethodContext:
    return MethodContext(pool=data.pool, target=data.target, pool_records=[],
                         target_records=[], task=data.task,
                         model=tiny_causal_lm(len(data.tok)), precision="fp32", seed=0,
                         batch_size=64, workdir=workdir, **kw)


def run(data: Data, method: str, options: dict, workdir=None):
    ctx = ctx_for(data, workdir)
    return get_method(method, options).score(ctx), ctx


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One work folder shared by the plain run and a proxy run (resume safety)."""
    return tmp_path_factory.mktemp("tov-work")


@pytest.fixture(scope="module")
def plain(data: Data, work: Path, cache):
    """A plain ``tov`` run, keeping its state in ``work``."""
    return run(data, "tov", TOV, workdir=work)[0]


@pytest.fixture(scope="module")
def proxied(data: Data, cache):
    """A ``tov`` run on a rho = 0.5 proxy (no work folder), and its context."""
    return run(data, "tov", {**TOV, "proxy": SPEC})


# -- scores ----------------------------------------------------------------------------


def test_rho_zero_proxy_gives_the_plain_scores(data: Data, plain):
    """rho = 0 keeps every layer full: the proxy is a copy of the model, so training and
    scoring on it must give exactly the plain run's scores (and round columns)."""
    res, _ = run(data, "tov", {**TOV, "proxy": "iprox:0"})
    np.testing.assert_allclose(res.scores, plain.scores, rtol=0, atol=1e-12)
    for k, v in plain.columns.items():
        np.testing.assert_allclose(res.columns[k], v, rtol=0, atol=1e-12)
    assert res.info["proxy"] == "iprox:0" and res.info["proxy_layers_factored"] == 0
    assert res.info["proxy_param_ratio"] == 1.0
    assert res.info["trainable_parameters"] == plain.info["trainable_parameters"]


def test_a_proxy_run_trains_and_scores_on_the_factored_copy(data: Data, plain, proxied):
    res, ctx = proxied
    info = res.info
    # the proxy's figures join the result (and so the manifest)
    assert info["proxy"] == "iprox:0.5" and info["proxy_layers_factored"] == 14
    assert info["proxy_parameters"] < info["full_parameters"]
    assert {"proxy_seconds_probe", "proxy_seconds_ipsvd", "proxy_seconds_align"} <= set(info)
    assert info["proxy_cached"] is False  # no work folder: built, not cached
    # the adapter sat on the proxy: one factor per factored layer, fewer LoRA parameters
    assert info["trainable_parameters"] < plain.info["trainable_parameters"]
    # the model itself is untouched (no factored layer, no adapter left)
    assert not any(isinstance(m, I.FactoredLinear) for m in ctx.model.modules())
    assert not any("lora" in n for n, _ in ctx.model.named_parameters())
    # other scores, but the same picture: planted near-copies first, correlated overall
    assert np.isfinite(res.scores).all() and res.scores.shape == plain.scores.shape
    assert not np.allclose(res.scores, plain.scores, rtol=1e-3, atol=1e-6)
    assert data.hits(res.scores) >= 14  # chance: 2 of the top 20 (measured 20)
    rho = spearmanr(res.scores, plain.scores)[0]
    assert rho > 0.2, rho  # measured 0.45 (the noise records' order is noise)


# -- resume safety ---------------------------------------------------------------------


def test_the_proxy_is_part_of_the_resume_fingerprint(data: Data):
    ctx = ctx_for(data)
    fp = {spec: get_method("tov", {**TOV, "proxy": spec})._fingerprint(ctx)
          for spec in ("", "iprox:0", "iprox:0.5", SPEC)}
    assert len(set(fp.values())) == 4
    # unset, the option is not keyed: work folders and benchmark rows from before it
    # existed keep their keys
    assert "proxy" not in option_identity(ToVOptions())
    assert option_identity(ToVOptions(proxy="iprox:0.5"))["proxy"] == "iprox:0.5"
    from dataclasses import asdict, fields, make_dataclass

    from finesift.methods.base import run_fingerprint

    before = make_dataclass("ToVOptions", [(f.name, f.type, f.default)
                                           for f in fields(ToVOptions) if f.name != "proxy"])
    assert asdict(before()) == option_identity(ToVOptions())
    assert run_fingerprint("state-v3", before(), ctx) == get_method("tov", {})._fingerprint(ctx)
    # and the manifest records the options the same way, so a shard written before the
    # option existed merges with one written after
    from finesift.pipeline import jsonable

    assert jsonable(ToVOptions()) == asdict(before())
    assert jsonable(ToVOptions(proxy="iprox:0.5"))["proxy"] == "iprox:0.5"


def test_a_proxy_run_does_not_resume_a_full_model_runs_state(data: Data, plain, proxied,
                                                             work: Path):
    """Run in the plain run's work folder, the proxy run keeps its own state (another
    fingerprint) and gives the scores of a proxy run without a work folder; had it taken
    the plain run's round checkpoints, they would not even load into the proxy's adapter."""
    res, _ = run(data, "tov", {**TOV, "proxy": SPEC}, workdir=work)
    np.testing.assert_allclose(res.scores, proxied[0].scores, rtol=0, atol=1e-12)
    assert len(list(work.glob("tov-*.pt"))) == 2  # one resume file per run
    # and the plain run's state is still its own: resumed, it gives its scores again
    again, _ = run(data, "tov", TOV, workdir=work)
    np.testing.assert_array_equal(again.scores, plain.scores)


# -- end to end: CLI, manifest, cache --------------------------------------------------


def _cli(lm_data, model_dir: Path, out: Path, *extra: str) -> None:
    from finesift.cli import main

    opts = [a for k, v in LM_TOV.items() for a in ("-o", f"{k}={v}")]
    rc = main(["select", "--pool", *map(str, lm_data.pool), "--target", str(lm_data.target),
               "--out", str(out), "--model", str(model_dir), "--no-progress", "--budget", "12",
               "--method", "tov", "--precision", "fp32", "--batch-size", "4", *opts, *extra])
    assert rc == 0


@pytest.fixture(scope="module")
def cli_runs(lm_data, tiny_lm_dir: Path, tmp_path_factory, cache):
    """Two CLI runs with ``--proxy`` into two output folders, sharing finesift's cache."""
    root = tmp_path_factory.mktemp("tov-cli")
    for name in ("first", "second"):
        _cli(lm_data, tiny_lm_dir, root / name, "--proxy", LM_SPEC)
    return root


def test_cli_proxy_run_reports_it_and_a_second_run_loads_it(cli_runs: Path, cache: Path):
    first = json.loads((cli_runs / "first" / "manifest.json").read_text())
    second = json.loads((cli_runs / "second" / "manifest.json").read_text())
    assert first["method"] == "tov" and first["method_options"]["proxy"] == LM_SPEC
    info1, info2 = first["method_info"], second["method_info"]
    assert info1["proxy"] == "iprox:0.5" and info1["proxy_layers_factored"] == 14
    assert 0 < info1["proxy_param_ratio"] < 1
    # built and kept in finesift's cache by the first run, loaded from it by the second
    cached = list((cache / "iprox").glob("iprox-*.pt"))
    assert info1["proxy_cached"] is False and Path(info1["proxy_cache_file"]) in cached
    assert info2["proxy_cached"] is True and info2["proxy_cache_file"] == info1["proxy_cache_file"]
    assert "proxy_seconds_load" in info2
    # the cached proxy is the built one: the same scores
    s1 = pq.read_table(cli_runs / "first" / "scores.parquet").column("score").to_numpy()
    s2 = pq.read_table(cli_runs / "second" / "scores.parquet").column("score").to_numpy()
    np.testing.assert_array_equal(s1, s2)


class PicklingExecutor(LocalExecutor):
    """The worker path without Ray: the scorer crosses a process boundary (pickled) and
    is built again, loading the model from its folder."""

    def __init__(self) -> None:
        super().__init__()
        self.scorers: list = []

    def map_chunks(self, scorer, items):
        self.scorers.append(scorer)
        return super().map_chunks(pickle.loads(pickle.dumps(scorer)), items)


@pytest.mark.parametrize("method,options", [
    ("tov", LM_TOV),
    ("uncertainty", {}),
], ids=["tov", "uncertainty"])
def test_executor_workers_rebuild_the_proxy_from_its_blob(method, options, lm_data,
                                                          tiny_lm_dir: Path, tmp_path: Path,
                                                          cache):
    """A worker loads the model again and rebuilds the proxy from the coordinator's blob:
    the scores equal an in-process run's. A worker that scored on the plain model would
    give other scores (or, for ``tov``, fail to load the proxy adapter's checkpoints)."""
    import finesift

    args = {"budget": 12, "method": method, "model": str(tiny_lm_dir), "precision": "fp32",
            "batch_size": 4, "method_options": {**options, "proxy": LM_SPEC}}
    local = finesift.select(lm_data.pool, lm_data.target, out=tmp_path / "local", **args)
    ex = PicklingExecutor()
    dist = finesift.select(lm_data.pool, lm_data.target, out=tmp_path / "exec", executor=ex,
                           **args)
    assert ex.scorers and all(s.proxy is not None and s.proxy["ranks"] for s in ex.scorers)
    assert dist.manifest["method_info"]["proxy_layers_factored"] == 14
    np.testing.assert_allclose(dist.scores, local.scores, rtol=1e-6, atol=1e-9)
    if method == "uncertainty":  # (tov's adapter names differ on the plain model)
        plain = finesift.select(lm_data.pool, lm_data.target, out=tmp_path / "plain",
                                **{**args, "method_options": options})
        assert not np.allclose(plain.scores, local.scores, rtol=1e-3, atol=1e-6)


# -- perplexity and uncertainty --------------------------------------------------------


@pytest.mark.parametrize("method", ["perplexity", "uncertainty"])
def test_forward_pass_methods_on_a_proxy(method, data: Data, tmp_path: Path, cache):
    plain, _ = run(data, method, {})
    same, _ = run(data, method, {"proxy": "iprox:0"})
    np.testing.assert_array_equal(same.scores, plain.scores)
    assert same.info["proxy_layers_factored"] == 0
    prox, ctx = run(data, method, {"proxy": SPEC}, workdir=tmp_path)
    assert prox.info["proxy"] == "iprox:0.5" and prox.info["proxy_layers_factored"] == 14
    assert np.isfinite(prox.scores).all()
    assert not np.allclose(prox.scores, plain.scores, rtol=1e-3, atol=1e-6)
    assert spearmanr(prox.scores, plain.scores)[0] > 0.9  # measured 0.99
    assert not any(isinstance(m, I.FactoredLinear) for m in ctx.model.modules())
    # the proxy's log-probs are kept apart from the model's (another chunk store)
    run(data, method, {}, workdir=tmp_path)
    assert len({p.name.split("-chunk")[0] for p in tmp_path.glob("logprobs-*")}) == 2


# -- cost estimate ---------------------------------------------------------------------


@pytest.mark.parametrize("method,options", [
    ("tov", TOV),
    ("tov", {"mode": "basic", "adapter": "full"}),
    ("perplexity", {}),
    ("uncertainty", {}),
])
def test_the_estimate_counts_the_proxy_build(method, options, data: Data):
    from finesift.estimator import Calibrator, project

    ctx = ctx_for(data)
    plain = get_method(method, options).cost(ctx)
    prox = get_method(method, {**options, "proxy": SPEC}).cost(ctx)
    # the build's passes (covariances, IPSVD, alignment) come first ...
    assert [p.what.split(":")[0] for p in prox.passes[:3]] == ["iprox"] * 3
    assert not any(p.what.startswith("iprox") for p in plain.passes)
    # ... then the method's own, as without a proxy
    assert [(p.what, p.units, p.kind) for p in prox.passes[3:]] == \
        [(p.what, p.units, p.kind) for p in plain.passes]
    assert prox.disk["IProX proxy (cache)"] > 0 and "IProX proxy (cache)" not in plain.disk
    assert any("iprox" in n for n in prox.notes)
    assert prox.score_columns == plain.score_columns
    given = {"forward": 1e-3, "train": 3e-3, "probe": 2e-6}
    wall_plain = project(plain, Calibrator(ctx, given=given))[2]
    wall_prox = project(prox, Calibrator(ctx, given=given))[2]
    assert wall_prox > wall_plain


# -- options ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tov", "perplexity", "uncertainty"])
@pytest.mark.parametrize("bad,msg", [
    ("iprox:1.5", "rho must be in"),
    ("lowrank:0.5", "expected iprox:RHO"),
    ("iprox:0.5,foo=1", "is not KEY=VALUE"),
    (["iprox:0.5"], "proxy"),
])
def test_bad_proxy_specs_are_refused_with_the_options(method, bad, msg):
    with pytest.raises(OptionError, match=msg):
        get_method(method, {"proxy": bad})


def test_cli_refuses_a_bad_tov_proxy_cleanly(lm_data, tmp_path: Path, capsys):
    from finesift.cli import main

    code = main(["select", "--pool", *map(str, lm_data.pool), "--target", str(lm_data.target),
                 "--budget", "5", "--out", str(tmp_path / "o"), "--method", "tov",
                 "--proxy", "iprox:2"])
    err = capsys.readouterr().err
    assert code != 0 and "rho must be in" in err and "Traceback" not in err


def test_proxy_blob_round_trips(data: Data):
    model = tiny_causal_lm(len(data.tok))
    proxy, _ = I.build_proxy(model, data.task, data.pool,
                             I.IProxOptions(rho=0.5, block_size=4, probe_examples=16,
                                            align_epochs=0))
    rebuilt = I.proxy_from_blob(tiny_causal_lm(len(data.tok)), I.proxy_blob(proxy))
    a, b = proxy.state_dict(), rebuilt.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.requires_grad for p in rebuilt.parameters())
