"""``--prefilter METHOD:SHARE``: a cheap method ranks the whole pool, the run's method
scores only the kept share (:mod:`finesift.select.prefilter`).

* the cascade's ranking: every kept example above every other, the others in the
  prefilter's order, and the kept examples' scores exactly those of the plain method run
  on a pool made of exactly the kept records (same seed);
* the score rule and the expansion to the whole pool (shards, chosen sets, columns);
* shard runs merge to the unsharded cascade's outputs; a killed cascade resumes; an
  executor (the Ray worker path) scores the kept chunks as this process does;
* a method that chooses its own subset gets its choice mapped back to the pool;
* bad specs and a share below the budget are ``finesift: error:`` lines;
* the manifest and config.yaml record the prefilter, and config.yaml runs it again;
* ``--method auto`` passes the prefilter to its trials and its final selection.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from finesift.api import select
from finesift.cli import main
from finesift.errors import OptionError
from finesift.methods.base import REGISTRY, Method, MethodContext, MethodResult
from finesift.select.prefilter import Cascade, cascade_scores, parse_prefilter
from finesift.store import chunks
from finesift.store.chunks import ShardSpec

PPL = {"method": "perplexity", "precision": "fp32", "batch_size": 4}


def frame(folder: Path) -> pd.DataFrame:
    return pq.read_table(folder / "scores.parquet").to_pandas()


def write_pool_of(ids: list[str], lm_data, folder: Path, write_jsonl) -> list[Path]:
    """The records ``ids`` as written in the pool files, in pool order, one file per
    record shape (a file holds one shape)."""
    text = [lm_data.raw[i] for i in ids if i.startswith("text-")]
    chat = [lm_data.raw[i] for i in ids if i.startswith("chat-")]
    return [write_jsonl(folder / "kept_text.jsonl", text),
            write_jsonl(folder / "kept_chat.jsonl", chat)]


# -- the rule, pure --------------------------------------------------------------------


def test_score_rule_puts_the_rest_below_in_the_prefilter_order():
    scores = np.array([5.0, 2.0, np.nan, np.nan, np.nan, np.nan])
    kept = np.array([True, True, False, False, False, False])
    pre = np.array([0.0, 9.0, 3.0, 1.0, 3.0, -7.5])
    got = cascade_scores(scores, pre, kept)
    # the lowest kept score is 2: the best non-kept (prefilter 3, twice: a tie) gets 1
    assert got.tolist() == [5.0, 2.0, 1.0, 0.0, 1.0, -1.0]
    assert np.isfinite(got).all()


def test_expand_maps_rows_chosen_base_set_and_columns_back():
    spec = parse_prefilter("random:3")
    pre = np.array([0.1, 0.9, 0.2, 0.3, 0.8, 0.0, 0.4, 0.7, 0.5, 0.6])
    kept = np.array([1, 4, 7])
    cas = Cascade(spec, pre, kept, columns={"w": pre * 2})
    # an unsharded result on the kept subset (3 examples), choosing its own set
    res = MethodResult(scores=np.array([1.0, 3.0, 2.0]),
                       columns={"loss": np.array([0.5, 0.25, 0.125]),
                                "leaf": np.array([7, 8, 9])},
                       base_set=np.array([2]), chosen=np.array([1, 0]), info={"x": 1})
    full = cas.expand(res)
    assert full.rows is None and full.info == {"x": 1}
    assert full.chosen.tolist() == [4, 1] and full.base_set.tolist() == [7]
    assert full.scores[kept].tolist() == [1.0, 3.0, 2.0]
    rest = np.setdiff1d(np.arange(10), kept)
    assert full.scores[rest].max() < full.scores[kept].min()
    # the rest in the prefilter's order
    assert np.argsort(-full.scores[rest], kind="stable").tolist() == \
        np.argsort(-pre[rest], kind="stable").tolist()
    assert full.columns["prefilter_kept"].tolist() == [i in kept for i in range(10)]
    assert full.columns["prefilter_score"].tolist() == pre.tolist()
    assert full.columns["prefilter_w"].tolist() == (pre * 2).tolist()
    assert np.isnan(full.columns["loss"][rest]).all()
    assert full.columns["loss"][kept].tolist() == [0.5, 0.25, 0.125]
    assert full.columns["leaf"].tolist() == [-1, 7, -1, -1, 8, -1, -1, 9, -1, -1]
    # shard 0 of 2: the kept rows the method scored (subset rows 0 and 2) and the
    # non-kept examples 0, 2, 4, ... of the pool's non-kept ones
    part = cas.expand(MethodResult(scores=np.array([1.0, 2.0]), rows=np.array([0, 2])),
                      ShardSpec(2, 0))
    assert part.rows.tolist() == [0, 1, 3, 6, 7, 9]
    assert part.columns["prefilter_kept"].tolist() == [False, True, False, False, True, False]
    other = cas.expand(MethodResult(scores=np.array([3.0]), rows=np.array([1])),
                       ShardSpec(2, 1))
    assert sorted(part.rows.tolist() + other.rows.tolist()) == list(range(10))


@pytest.mark.parametrize("spec,message", [
    ("embed", "--prefilter 'embed': expected METHOD:SHARE"),
    ("embed:", "--prefilter 'embed:': expected METHOD:SHARE"),
    ("embed:0%", "--prefilter embed:0%: the share '0%' must be a count"),
    ("embed:120%", "must be a count of examples (500) or a percentage of the pool in (0, 100]"),
    ("embed:0", "the share '0' must be"),
    ("embed:0.2", "the share '0.2' must be"),
    ("nosuch:10%", "--prefilter nosuch:10%: unknown method 'nosuch'; available methods: "),
    ("auto:10%", "auto chooses a method"),
    ("dsir:10%,nope=1", "--prefilter dsir:10%,nope=1: method 'dsir' has no option(s) nope"),
    ("dsir:10%,sampling", "'sampling' is not KEY=VALUE"),
    ("dsir:10%,sampling=best", "--prefilter dsir:10%,sampling=best: "),
    ({"method": "dsir"}, "expected a mapping with method, share"),
    (3, "expected METHOD:SHARE"),
])
def test_bad_specs_are_option_errors(spec, message):
    with pytest.raises(OptionError) as err:
        parse_prefilter(spec)
    assert message in str(err.value)


def test_specs_parse():
    spec = parse_prefilter(" dsir : 10 % ,sampling=top")
    assert (spec.method, spec.share, spec.options) == ("dsir", "10%", {"sampling": "top"})
    assert spec.meth.options.sampling == "top"
    assert spec.count(79) == 8 and parse_prefilter("embed:500").count(79) == 79
    same = parse_prefilter(spec.config())  # config.yaml's form reads back
    assert (same.method, same.share) == ("dsir", "10%")
    assert same.meth.options == spec.meth.options
    assert parse_prefilter(None) is None


# -- whole runs ------------------------------------------------------------------------


def test_cascade_ranks_kept_first_with_the_plain_methods_scores(
        lm_data, tiny_lm_dir: Path, tmp_path: Path, write_jsonl, capsys):
    """The issue's test: kept examples above the rest, and their scores identical to the
    plain method run on a pool made of exactly the kept records, same seed."""
    common = {**PPL, "model": str(tiny_lm_dir), "seed": 3}
    sel = select(lm_data.pool, lm_data.target, budget=10, prefilter="dsir:40%",
                 out=tmp_path / "cascade", **common)
    df = frame(tmp_path / "cascade")
    n = len(lm_data.usable)
    assert len(df) == n and df["id"].tolist() == lm_data.usable
    kept = df["prefilter_kept"].to_numpy()
    assert kept.sum() == round(n * 0.4) == 32
    score = df["score"].to_numpy()
    assert np.isfinite(score).all()
    assert score[kept].min() > score[~kept].max()
    # the rest in the prefilter's order (ties stay ties)
    pre = df["prefilter_score"].to_numpy()
    rest_s, rest_p = score[~kept], pre[~kept]
    assert (np.sign(rest_s[:, None] - rest_s[None, :])
            == np.sign(rest_p[:, None] - rest_p[None, :])).all()
    # the prefilter's scores are plain dsir's on the whole pool, and it kept its top 32
    plain_dsir = select(lm_data.pool, lm_data.target, budget=10, method="dsir", seed=3,
                        model=str(tiny_lm_dir))
    assert np.array_equal(pre, plain_dsir.scores)
    assert set(np.flatnonzero(kept)) == set(np.argsort(-pre, kind="stable")[:32])
    assert df["selected"].to_numpy()[~kept].sum() == 0  # top 10 of a 32-example share
    # the plain method on exactly the kept records gives the kept scores bit for bit
    kept_ids = df["id"][kept].tolist()
    plain = select(write_pool_of(kept_ids, lm_data, tmp_path, write_jsonl), lm_data.target,
                   budget=10, **common)
    by_id = dict(zip([r.id for r in plain.pool], plain.scores, strict=True))
    assert [by_id[i] for i in kept_ids] == score[kept].tolist()
    assert [r.id for r in sel.selected] == [r.id for r in plain.selected]
    loss = df["loss"].to_numpy()
    assert np.isnan(loss[~kept]).all() and np.isfinite(loss[kept]).all()
    # the manifest and config.yaml record the prefilter; the config runs it again
    man = json.loads((tmp_path / "cascade" / "manifest.json").read_text())
    entry = man["prefilter"]
    assert (entry["method"], entry["share"], entry["kept"], entry["pool"]) == \
        ("dsir", "40%", 32, n)
    assert entry["options"]["sampling"] == "gumbel" and entry["seconds"] >= 0
    assert "prefilter" in man["stages"] and man["method"] == "perplexity"
    capsys.readouterr()
    rc = main(["select", "--config", str(tmp_path / "cascade" / "config.yaml"), "--out",
               str(tmp_path / "again"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    pd.testing.assert_frame_equal(frame(tmp_path / "again"), df)


def test_shards_with_a_prefilter_merge_to_the_unsharded_run(lm_data, tiny_lm_dir: Path,
                                                            tmp_path: Path, monkeypatch,
                                                            capsys):
    monkeypatch.setattr(chunks, "DEFAULT_CHUNK", 8)  # 40 of 80 kept: 5 chunks, 3 shards
    common = {**PPL, "method_options": {"order": "highest"}, "model": str(tiny_lm_dir),
              "prefilter": "dsir:50%"}
    select(lm_data.pool, lm_data.target, budget=12, out=tmp_path / "full", **common)
    shards = []
    for i in range(3):
        sel = select(lm_data.pool, lm_data.target, budget=None, out=tmp_path / f"s{i}",
                     num_shards=3, shard_index=i, **common)
        assert 0 < len(sel.scores) < len(lm_data.usable)
        shards.append(tmp_path / f"s{i}")
    from finesift.shards import merge

    merged = merge(shards, tmp_path / "merged", budget=12)
    pd.testing.assert_frame_equal(frame(tmp_path / "merged"), frame(tmp_path / "full"))
    assert ((tmp_path / "merged" / "selected.jsonl").read_bytes()
            == (tmp_path / "full" / "selected.jsonl").read_bytes())
    assert merged.manifest["prefilter"]["kept"] == 40
    # a shard of a run with another prefilter is another run
    select(lm_data.pool, lm_data.target, budget=None, out=tmp_path / "other", num_shards=3,
           shard_index=2, **{**common, "prefilter": "dsir:60%"})
    capsys.readouterr()
    rc = main(["merge", *map(str, shards[:2]), str(tmp_path / "other"), "--out",
               str(tmp_path / "m2"), "--budget", "12"])
    assert rc == 2 and "belongs to another run" in capsys.readouterr().err
    # merge checks the share against its budget too
    rc = main(["merge", *map(str, shards), "--out", str(tmp_path / "m3"), "--budget", "41"])
    err = capsys.readouterr().err
    assert rc == 2 and "--prefilter dsir:50% keeps 40 of the 80 usable pool examples, " \
                       "fewer than the budget of 41" in err


def test_a_killed_cascade_resumes_at_the_chunk(lm_data, tiny_lm_dir: Path, tmp_path: Path,
                                               monkeypatch):
    """The method's work files are keyed by the kept subset: a killed cascade run rescores
    only its unfinished chunks and ends with the uninterrupted scores."""
    import finesift.methods.uncertainty as unc

    monkeypatch.setattr(chunks, "DEFAULT_CHUNK", 8)  # 24 kept -> 3 chunks
    common = {"method": "uncertainty", "model": str(tiny_lm_dir), "precision": "fp32",
              "prefilter": "dsir:24"}
    ref = select(lm_data.pool, lm_data.target, budget=8, **common)
    real = unc.token_logprobs
    calls = []

    def die_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(unc, "token_logprobs", die_on_second)
    with pytest.raises(KeyboardInterrupt):
        select(lm_data.pool, lm_data.target, budget=8, out=tmp_path / "o", **common)
    calls.clear()
    monkeypatch.setattr(unc, "token_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = select(lm_data.pool, lm_data.target, budget=8, out=tmp_path / "o", **common)
    assert len(calls) == 2  # chunks 2 and 3 only
    assert np.array_equal(resumed.scores, ref.scores)


def test_an_executor_scores_the_kept_chunks_as_this_process_does(lm_data, tiny_lm_dir: Path,
                                                                 tmp_path: Path, monkeypatch):
    """The worker path (what a Ray actor runs: the model loaded again, chunks of the kept
    subset) gives the in-process cascade's scores."""
    from finesift.executors import LocalExecutor

    monkeypatch.setattr(chunks, "DEFAULT_CHUNK", 8)
    common = {**PPL, "model": str(tiny_lm_dir), "prefilter": "dsir:30%"}
    here = select(lm_data.pool, lm_data.target, budget=6, **common)
    there = select(lm_data.pool, lm_data.target, budget=6, executor=LocalExecutor(), **common)
    assert np.array_equal(here.scores, there.scores)
    assert there.manifest["method_info"]["executor"] == {"name": "local"}


class _Chooser(Method):
    """Chooses the last and the first example of its pool (as HARP chooses leaves)."""

    name = "toy-chooser"
    description = "test: chooses its own subset"
    needs_model = False
    seen: ClassVar[list[str]] = []

    def score(self, ctx: MethodContext) -> MethodResult:
        _Chooser.seen = [r.id for r in ctx.pool_records]
        n = len(ctx.pool)
        return MethodResult(scores=np.linspace(1.0, 0.0, n), chosen=np.array([n - 1, 0]))


def test_a_method_that_chooses_its_subset_gets_it_mapped_back(lm_data, tiny_lm_dir: Path,
                                                              tmp_path: Path, monkeypatch):
    monkeypatch.setitem(REGISTRY, "toy-chooser", _Chooser)
    sel = select(lm_data.pool, lm_data.target, budget=5, method="toy-chooser",
                 model=str(tiny_lm_dir), prefilter="dsir:20", out=tmp_path / "o")
    df = frame(tmp_path / "o")
    kept_ids = df["id"][df["prefilter_kept"]].tolist()
    assert _Chooser.seen == kept_ids  # the method saw exactly the kept records, in order
    assert [r.id for r in sel.selected] == [kept_ids[-1], kept_ids[0]]
    assert df.set_index("id").loc[[kept_ids[-1], kept_ids[0]], "selection_rank"].tolist() \
        == [0, 1]


def test_bad_prefilters_stop_the_run_with_one_line(lm_data, tiny_lm_dir: Path,
                                                   tmp_path: Path, capsys):
    base = ["select", "--pool", *map(str, lm_data.pool), "--target", str(lm_data.target),
            "--model", str(tiny_lm_dir), "--out", str(tmp_path / "o"), "--no-progress",
            "--method", "random", "--budget", "12"]
    for spec, message in [
        ("embed:0%", "finesift: error: --prefilter embed:0%: the share '0%' must be"),
        ("nosuch:10%", "finesift: error: --prefilter nosuch:10%: unknown method 'nosuch'"),
        ("embed", "finesift: error: --prefilter 'embed': expected METHOD:SHARE"),
        ("dsir:5%", ("finesift: error: --prefilter dsir:5% keeps 4 of the 80 usable pool "
                     "examples, fewer than the budget of 12")),
    ]:
        assert main([*base, "--prefilter", spec]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "o" / "scores.parquet").exists()
    with pytest.raises(SystemExit):
        main(["select", "--help"])
    help_text = capsys.readouterr().out
    assert "--prefilter PREFILTER" in help_text and "METHOD:SHARE" in help_text


def test_auto_passes_the_prefilter_to_its_trials_and_final_selection(
        lm_data, tiny_lm_dir: Path, tmp_path: Path):
    out = tmp_path / "auto"
    sel = select(lm_data.pool, lm_data.target, budget=8, method="auto",
                 method_options={"candidates": "dsir", "steps": 2, "lr": 3e-3,
                                 "trial_pool": 40, "dsir.sampling": "top"},
                 model=str(tiny_lm_dir), precision="fp32", prefilter="dsir:50%", out=out)
    assert sel.manifest["prefilter"]["kept"] == 40
    trials = [json.loads(p.read_text()) for p in (out / ".work" / "auto" / "trials").glob(
        "*/manifest.json")]
    assert trials and all(t["prefilter"]["share"] == "50%" and
                          t["prefilter"]["kept"] == round(t["prefilter"]["pool"] / 2)
                          for t in trials)
    with pytest.raises(OptionError, match="--prefilter nosuch:1%"):  # before any trial
        select(lm_data.pool, lm_data.target, budget=8, method="auto",
               model=str(tiny_lm_dir), prefilter="nosuch:1%", out=tmp_path / "bad")
    assert not (tmp_path / "bad" / ".work").exists()
