"""ToV on a tiny random Llama: planted near-copies of the target pattern rank first;
scores are deterministic; a finished or killed run resumes from its work folder."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import finesift.methods.tov as tov_module
from finesift.data.records import Example
from finesift.engine.tasks import CausalLMTask
from finesift.errors import OptionError
from finesift.methods import MethodContext, get_method
from finesift.methods.tov import ToVOptions, tov_round_scores
from finesift.testing import tiny_causal_lm, tiny_tokenizer

# the target: these ten words in a cycle, from one of three starting points
PATTERN = ["alpha", "beta", "gamma", "delta", "zeta", "theta", "kappa", "sigma"]
PATTERN += ["omega", "lambda"]
N_POOL = 200
N_TARGET = 16
SEQ_LEN = 12  # words per sequence (the pattern wraps around)
PLANT_EVERY = 10
TOP = 20
# a few short rounds (or epochs) at this lr learn the pattern well enough
BASE_OPTIONS = {"lr": 3e-3, "eps": 0.5, "rounds": 2}
INTERLEAVED = {"mode": "interleaved", "rounds": 3}



class Data:
    def __init__(self, seed: int = 0) -> None:
        self.tok = tiny_tokenizer()
        self.task = CausalLMTask(self.tok.pad_token_id)
        rng = np.random.default_rng(seed)
        # sorted: get_vocab() order differs between processes, the data must not
        vocab = sorted(w for w in self.tok.get_vocab() if not w.startswith("<"))

        def pattern() -> list[str]:
            s = int(rng.integers(0, 3))
            return [PATTERN[(s + j) % len(PATTERN)] for j in range(SEQ_LEN)]

        def near_copy() -> list[str]:
            words = pattern()
            for j in rng.choice(SEQ_LEN, size=int(rng.integers(1, 3)), replace=False):
                words[j] = str(rng.choice(vocab))
            return words

        self.target = [self.encode(pattern(), i) for i in range(N_TARGET)]
        self.pool = []
        self.planted = []
        for i in range(N_POOL):
            if i % PLANT_EVERY == 0:
                self.pool.append(self.encode(near_copy(), i))
                self.planted.append(i)
            else:
                self.pool.append(self.encode([str(w) for w in rng.choice(vocab, SEQ_LEN)], i))

    def encode(self, words: list[str], index: int) -> Example:
        ids = np.array(
            [self.tok.bos_token_id, *self.tok.convert_tokens_to_ids(words)], dtype=np.int64
        )
        labels = ids.copy()
        labels[0] = -100
        return Example(index, ids, labels, len(ids) - 1)

    def run(self, options: dict, *, seed: int = 0, workdir=None):
        ctx = MethodContext(
            pool=self.pool,
            target=self.target,
            pool_records=[],
            target_records=[],
            task=self.task,
            model=tiny_causal_lm(len(self.tok)),
            precision="fp32",
            seed=seed,
            batch_size=64,
            workdir=workdir,
        )
        return get_method("tov", {**BASE_OPTIONS, **options}).score(ctx)

    def hits(self, scores: np.ndarray) -> int:
        top = np.argsort(-scores, kind="stable")[:TOP]
        return len(set(top.tolist()) & set(self.planted))


@pytest.fixture(scope="module")
def data() -> Data:
    return Data()


@pytest.fixture(scope="module")
def interleaved(data: Data):
    """One interleaved run with 3 rounds (no workdir), shared by several tests."""
    return data.run(INTERLEAVED)


# -- planted examples ------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"mode": "basic", "val_epochs": 3},
        INTERLEAVED,
        {"mode": "parallel", "val_epochs": 2},
        {"mode": "interleaved", "rounds": 3, "transform": "abs"},
        {"mode": "interleaved", "rounds": 3, "transform": "relu"},
    ],
    ids=["basic", "interleaved", "parallel", "abs", "relu"],
)
def test_planted_near_copies_rank_first(data: Data, options: dict, request):
    if options is INTERLEAVED:
        result = request.getfixturevalue("interleaved")
    else:
        result = data.run(options)
    assert result.scores.shape == (N_POOL,)
    assert np.isfinite(result.scores).all()
    # chance: TOP * (N_POOL / PLANT_EVERY) / N_POOL = 2
    assert data.hits(result.scores) >= 14


# -- determinism -----------------------------------------------------------------------


def test_same_seed_same_scores(data: Data, interleaved):
    again = data.run(INTERLEAVED)
    assert np.array_equal(interleaved.scores, again.scores)
    assert np.array_equal(interleaved.base_set, again.base_set)


def test_other_seed_other_base_set(data: Data):
    a = data.run({"mode": "interleaved", "rounds": 1, "base_size": 50}, seed=0)
    b = data.run({"mode": "interleaved", "rounds": 1, "base_size": 50}, seed=1)
    assert len(a.base_set) == len(b.base_set) == 50
    assert not np.array_equal(a.base_set, b.base_set)


# -- resume ----------------------------------------------------------------------------


def test_finished_run_is_reused(data: Data, interleaved, tmp_path, monkeypatch):
    options = INTERLEAVED
    first = data.run(options, workdir=tmp_path)
    assert np.array_equal(first.scores, interleaved.scores)  # the workdir changes nothing
    assert len(list(tmp_path.glob("tov-*.pt"))) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(tov_module, "train", no_training)
    again = data.run(options, workdir=tmp_path)
    assert np.array_equal(again.scores, first.scores)
    assert [r["round"] for r in again.info["rounds"]] == [1, 2, 3]
    # another seed or other options: a fresh run, not the saved state
    with pytest.raises(AssertionError, match="must not train"):
        data.run(options, seed=1, workdir=tmp_path)
    with pytest.raises(AssertionError, match="must not train"):
        data.run({**options, "eps": 0.25}, workdir=tmp_path)


class Killed(Exception):
    pass


@pytest.mark.parametrize("mode", ["interleaved", "parallel"])
def test_killed_run_resumes(data: Data, tmp_path, monkeypatch, mode: str, request):
    options = {"mode": mode, "rounds": 3}
    if mode == "interleaved":
        uninterrupted = request.getfixturevalue("interleaved")
    else:
        uninterrupted = data.run(options)

    # Kill the run in round 2, after round 2 has already trained on U (so the model and
    # the optimisers in memory are part-way through the round): only round 1 is saved.
    real_train = tov_module.train
    calls_per_round = 2 if mode == "interleaved" else 3
    calls = []
    saved = []

    def train_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == calls_per_round + 2:
            raise Killed
        return real_train(*args, **kwargs)

    real_save = tov_module.ToV._save

    def save(self, path, prog, trajs):
        saved.append(prog.done)
        return real_save(self, path, prog, trajs)

    monkeypatch.setattr(tov_module, "train", train_then_die)
    monkeypatch.setattr(tov_module.ToV, "_save", save)
    with pytest.raises(Killed):
        data.run(options, workdir=tmp_path)
    assert saved == [1]

    monkeypatch.setattr(tov_module, "train", real_train)
    resumed = data.run(options, workdir=tmp_path)
    assert saved == [1, 2, 3]  # rounds 2 and 3 only
    # bit-identical: round k's shuffling and dropout depend on (seed, k) only
    for k in (1, 2, 3):
        column = f"score_round_{k}"
        assert np.array_equal(resumed.columns[column], uninterrupted.columns[column])
    assert np.array_equal(resumed.scores, uninterrupted.scores)


def test_killed_while_scoring_resumes_at_the_chunk(data: Data, interleaved, tmp_path, monkeypatch):
    """A run killed in the scoring phase keeps its trained rounds and finished chunks."""
    options = {**INTERLEAVED, "chunk_size": 64}  # 200 pool examples -> 4 chunks
    real_logprobs = tov_module.token_logprobs
    calls = []

    def logprobs_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 * 3 * 2 + 1:  # two chunks done (2 passes x 3 rounds each)
            raise Killed
        return real_logprobs(*args, **kwargs)

    monkeypatch.setattr(tov_module, "token_logprobs", logprobs_then_die)
    with pytest.raises(Killed):
        data.run(options, workdir=tmp_path)
    assert len(list(tmp_path.glob("tov-*-chunk*.npy"))) == 2
    assert not list(tmp_path.glob("*.tmp*"))

    def no_training(*args, **kwargs):
        raise AssertionError("trained rounds must be reused")

    calls.clear()
    monkeypatch.setattr(tov_module, "token_logprobs", real_logprobs)
    monkeypatch.setattr(tov_module, "train", no_training)
    counted = []

    def counting(*args, **kwargs):
        counted.append(1)
        return real_logprobs(*args, **kwargs)

    monkeypatch.setattr(tov_module, "token_logprobs", counting)
    resumed = data.run(options, workdir=tmp_path)
    assert len(counted) == 2 * 3 * 2  # only the two unfinished chunks are scored
    # chunking changes batch composition only, so scores match the unchunked run
    assert np.allclose(resumed.scores, interleaved.scores, rtol=1e-5, atol=1e-6)


# -- pieces ----------------------------------------------------------------------------


def test_round_scores_transforms():
    before = [np.array([0.0, -1.0]), np.array([-2.0], dtype=np.float32), np.array([])]
    after = [np.array([1.0, -3.0]), np.array([-1.5], dtype=np.float32), np.array([])]
    # per-token changes: [1, -2], [0.5], []
    np.testing.assert_allclose(tov_round_scores(before, after), [-0.5, 0.5, 0.0])
    np.testing.assert_allclose(tov_round_scores(before, after, "identity"), [-0.5, 0.5, 0.0])
    np.testing.assert_allclose(tov_round_scores(before, after, "abs"), [1.5, 0.5, 0.0])
    np.testing.assert_allclose(tov_round_scores(before, after, "relu"), [0.5, 0.5, 0.0])
    out = tov_round_scores(before, after, "abs")
    assert out.dtype == np.float64
    with pytest.raises(ValueError):
        tov_round_scores(before, after, "square")
    with pytest.raises(ValueError):
        tov_round_scores(before, after[:2])


def test_round_lr_schedules():
    const = ToVOptions(lr=1.0, rounds=4, lr_schedule="constant")
    assert [const.round_lr(k) for k in range(4)] == [1.0] * 4
    linear = ToVOptions(lr=2.0, rounds=4, lr_schedule="linear")
    np.testing.assert_allclose([linear.round_lr(k) for k in range(4)], [2.0, 1.5, 1.0, 0.5])
    cosine = ToVOptions(lr=1.0, rounds=4, lr_schedule="cosine")
    expected = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    np.testing.assert_allclose([cosine.round_lr(k) for k in range(4)], expected)
    np.testing.assert_allclose(expected, [1.0, 0.8535534, 0.5, 0.1464466], rtol=1e-6)
    for schedule in ("linear", "cosine"):  # one round: the base learning rate
        assert ToVOptions(lr=0.3, rounds=1, lr_schedule=schedule).round_lr(0) == 0.3
        lrs = [ToVOptions(lr=1.0, rounds=10, lr_schedule=schedule).round_lr(k) for k in range(10)]
        assert all(a > b > 0 for a, b in itertools.pairwise(lrs))


@pytest.mark.parametrize(
    "bad",
    [
        {"mode": "sideways"},
        {"transform": "square"},
        {"lr_schedule": "step"},
        {"adapter": "prefix"},
        {"optimizer": "lion"},
        {"rounds": 0},
        {"eps": 0.0},
    ],
)
def test_bad_options_are_rejected(bad: dict):
    with pytest.raises(OptionError):
        get_method("tov", bad)
