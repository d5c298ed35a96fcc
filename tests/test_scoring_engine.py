"""The scoring engine: auto batch size within a memory limit, batching-invariant scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finesift.data.records import Example
from finesift.engine.batching import sorted_batches
from finesift.engine.budget import TokenBudget, parse_batch_size, parse_bytes
from finesift.engine.scoring import token_logprobs
from finesift.engine.tasks import CausalLMTask
from finesift.errors import OptionError
from finesift.testing import tiny_causal_lm

VOCAB = 64


def _examples(n: int, seed: int = 0, lo: int = 3, hi: int = 60) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.integers(lo, hi))
        ids = rng.integers(2, VOCAB, L).astype(np.int64)
        labels = np.full(L, -100, dtype=np.int64)
        start = int(rng.integers(1, L))  # at least one label, never position 0
        labels[start:] = ids[start:]
        out.append(Example(index=i, input_ids=ids, labels=labels, n_label_tokens=L - start))
    return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_causal_lm(VOCAB, hidden=32, layers=2, seed=0).eval()


def _direct(model, ex: Example) -> np.ndarray:
    """Label log-probs of one example from the full logits, no batching, no padding."""
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ex.input_ids)[None]).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    tgt = torch.from_numpy(ex.labels[1:])
    sel = tgt != -100
    return logp[sel].gather(1, tgt[sel][:, None]).squeeze(1).numpy()


def test_batches_respect_the_memory_budget():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 400, 500).tolist()
    budget = TokenBudget(memory=2_000_000, per_token=1000, per_score=8, head_bytes=100_000)
    batches = list(sorted_batches(lengths, lengths, batch_size=10**6, max_rows=budget.rows_for))
    seen = sorted(i for b in batches for i in b)
    assert seen == list(range(len(lengths)))  # every example exactly once
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert lengths[b[0]] == longest
        if len(b) > 1:  # a single over-long example may exceed the limit, alone
            assert budget.batch_bytes(len(b), longest) <= budget.memory
        # greedy: one more row would not have fitted (unless the pool ran out)
    rows_by_len = {max(lengths[i] for i in b): len(b) for b in batches[:-1]}
    longs = [r for L, r in rows_by_len.items() if L > 300]
    shorts = [r for L, r in rows_by_len.items() if L < 50]
    assert shorts and longs and min(shorts) > 3 * max(longs)
    full = [b for b in batches[:-1]]
    assert all(len(b) == budget.rows_for(lengths[b[0]]) for b in full)


def test_budget_from_model_grows_with_the_limit(model):
    small = TokenBudget.for_model(model, "1MiB", head_chunk=16)
    big = TokenBudget.for_model(model, "64MiB", head_chunk=16)
    h, inter = model.config.hidden_size, model.config.intermediate_size
    assert small.per_token >= 4 * (h + inter)  # at least the residual and MLP
    assert small.head_bytes == 4 * 3 * VOCAB * 16 + 2 * VOCAB * h
    assert big.rows_for(32) > small.rows_for(32) > 1
    assert small.rows_for(8) > small.rows_for(64)
    assert small.batch_bytes(small.rows_for(40), 40) <= small.memory


@pytest.mark.parametrize("head_chunk", [0, 1, 7])
def test_scores_identical_whatever_the_batching(model, head_chunk):
    exs = _examples(37)
    task = CausalLMTask(pad_token_id=0, head_chunk=head_chunk)
    direct = [_direct(model, e) for e in exs]
    runs = {
        bs: token_logprobs(model, task, exs, batch_size=bs, precision="fp32")
        for bs in (1, 4, 37, "auto", "auto:256KiB")
    }
    for bs, got in runs.items():
        assert len(got) == len(exs)
        for e, g, d in zip(exs, got, direct, strict=True):
            assert g.dtype == np.float32 and len(g) == e.n_label_tokens, bs
            np.testing.assert_allclose(g, d, rtol=0, atol=2e-5, err_msg=str(bs))


def test_auto_batches_are_larger_for_short_examples(model, monkeypatch):
    from finesift.engine import scoring

    sizes: list[tuple[int, int]] = []
    real = scoring.sorted_batches

    def spy(*a, **kw):
        for b in real(*a, **kw):
            sizes.append((len(b), max(len(a[0][i]) for i in b)))
            yield b

    monkeypatch.setattr(scoring, "sorted_batches", spy)
    exs = _examples(60, lo=4, hi=8) + _examples(20, seed=3, lo=100, hi=120)
    task = CausalLMTask(pad_token_id=0, head_chunk=8)
    token_logprobs(model, task, exs, batch_size="auto:512KiB", precision="fp32")
    budget = TokenBudget.for_model(model, "512KiB", head_chunk=8)
    long_rows = [r for r, L in sizes if L >= 100]
    short_rows = [r for r, L in sizes if L < 10]
    assert max(long_rows) < min(short_rows[:-1] or short_rows)
    for r, L in sizes:
        assert r <= budget.rows_for(L)


def test_batch_size_option_parsing():
    assert parse_batch_size(8) == (8, None)
    assert parse_batch_size("16") == (16, None)
    assert parse_batch_size("auto") == (None, 1024**3)
    assert parse_batch_size("auto:2GB") == (None, 2 * 1000**3)
    assert parse_bytes("1.5MiB") == int(1.5 * 1024**2)
    for bad in (0, -3, "many", "auto:lots", "auto:0", True):
        with pytest.raises(OptionError):
            parse_batch_size(bad)


def test_auto_batch_size_reaches_other_callers_as_a_fixed_size():
    lengths = [5] * 20
    batches = list(sorted_batches(lengths, lengths, batch_size="auto"))
    assert [len(b) for b in batches] == [8, 8, 4]
    assert [len(b) for b in sorted_batches(lengths, lengths, batch_size="7")] == [7, 7, 6]


def test_cli_batch_size_auto_gives_the_same_scores(lm_data, tiny_lm_dir, tmp_path, capsys):
    import pyarrow.parquet as pq

    from finesift.cli import main

    cols = {}
    for bs in ("3", "auto", "auto:300KiB"):
        out = tmp_path / bs.replace(":", "_")
        argv = ["select", "--pool", *map(str, lm_data.pool), "--target", str(lm_data.target),
                "--out", str(out), "--model", str(tiny_lm_dir), "--no-progress",
                "--method", "perplexity", "--budget", "5", "--precision", "fp32",
                "--batch-size", bs]
        assert main(argv) == 0
        cols[bs] = pq.read_table(out / "scores.parquet").to_pydict()
    ref = cols["3"]
    assert len(ref["score"]) == len(lm_data.usable)
    for bs, got in cols.items():
        np.testing.assert_allclose(got["score"], ref["score"], rtol=0, atol=1e-5, err_msg=bs)
    capsys.readouterr()
    rc = main(["select", "--pool", str(lm_data.pool[0]), "--target", str(lm_data.target),
               "--out", str(tmp_path / "bad"), "--model", str(tiny_lm_dir), "--budget", "5",
               "--batch-size", "lots"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("finesift: error: ") and "auto:SIZE" in err
    assert not (tmp_path / "bad").exists()


def test_bf16_pass_casts_weights_once_same_values_and_restores_them(model):
    """bf16 scoring holds Linear weights in bf16 for the pass (and casts the LM head once
    per batch): the values equal plain autocast per example, and the fp32 weights come
    back untouched."""
    from finesift.engine.precision import autocast

    exs = _examples(12, seed=5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = token_logprobs(model, CausalLMTask(0, head_chunk=3), exs, batch_size=1,
                         precision="bf16")
    plain = CausalLMTask(0, head_chunk=0)
    for e, g in zip(exs, got, strict=True):
        with torch.inference_mode(), autocast("bf16"):
            ref, _ = plain.label_logprobs(model, plain.collate([e]))
        np.testing.assert_allclose(g, ref.float().numpy(), rtol=0, atol=1e-6)
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32, n
        assert torch.equal(p, before[n]), n
    assert not torch.equal(model.lm_head.weight.bfloat16().float(), model.lm_head.weight)


def test_shuffled_batches_capped_by_tokens():
    from finesift.engine.batching import shuffled_batches

    lengths = [128] * 10 + [256] * 6
    plain = list(shuffled_batches(16, batch_size=8, rng=np.random.default_rng(0)))
    # a cap no batch reaches: the same batches as without one
    same = list(shuffled_batches(16, batch_size=8, rng=np.random.default_rng(0),
                                 lengths=[100] * 16, max_tokens=800))
    assert same == plain
    capped = list(shuffled_batches(16, batch_size=8, rng=np.random.default_rng(0),
                                   lengths=lengths, max_tokens=1024))
    # every item once, in the same shuffled order; no batch over 8 rows or 1024 tokens
    assert [i for b in capped for i in b] == [i for b in plain for i in b]
    assert all(len(b) <= 8 and len(b) * max(lengths[i] for i in b) <= 1024 for b in capped)
    assert len(capped) > len(plain)
    # an item longer than the cap still gets a batch of its own
    assert list(shuffled_batches(2, batch_size=8, rng=np.random.default_rng(0),
                                 lengths=[5000, 10], max_tokens=1024)) in ([[0], [1]], [[1], [0]])
