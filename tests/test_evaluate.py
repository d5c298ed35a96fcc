"""The evaluation harness: fine-tuning sees a real effect, NER F1 and exact-match parsing,
the overlap guard, and ``finesift eval`` end to end (tiny random models)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from finesift.cli import main
from finesift.errors import OptionError
from finesift.evaluate.finetune import (
    FinetuneOptions,
    em_candidates,
    entity_f1,
    exact_match,
    finetune_and_evaluate,
    gold_answer,
    predicted_answer,
    read_records,
)
from finesift.evaluate.overlap import OverlapError, check_no_overlap, content_hash
from finesift.models.loader import load_model

PATTERN = ["alpha", "beta", "gamma", "delta", "zeta", "theta", "kappa", "sigma", "omega",
           "lambda"]
FAST = FinetuneOptions(epochs=8, lr=1e-2, lora_rank=8, batch_size=8, precision="fp32",
                       max_length=64)



def sequence_rows() -> list[dict]:
    """80 distinct target-task records: continue the cycle from a word, for n words."""
    rows = [
        {"id": f"seq-{s}-{n}", "prompt": f"please continue the sequence from {PATTERN[s]}",
         "completion": " ".join(PATTERN[(s + j) % 10] for j in range(n))}
        for s in range(10) for n in range(6, 14)
    ]
    order = np.random.default_rng(0).permutation(len(rows))
    return [rows[i] for i in order]


@pytest.fixture(scope="module")
def seq_files(tmp_path_factory, write_jsonl) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("seq")
    rows = sequence_rows()
    return write_jsonl(folder / "train.jsonl", rows[:60]), write_jsonl(folder / "test.jsonl",
                                                                        rows[60:])


def ner_rows(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    names, places = ["john", "mary"], ["paris", "london"]
    fill = ["the", "cat", "dog", "was", "in", "city", "with", "a", "big", "old"]
    rows, seen = [], set()
    while len(rows) < n:
        words = list(rng.choice(fill, 3)) + [str(rng.choice(names)), "went", "to",
                                             str(rng.choice(places))] + list(rng.choice(fill, 2))
        rng.shuffle(words[:3])
        if " ".join(words) in seen:
            continue
        seen.add(" ".join(words))
        tags = ["B-PER" if w in names else "B-LOC" if w in places else "O" for w in words]
        rows.append({"id": f"s{seed}-{len(rows)}", "tokens": words, "tags": tags})
    return rows


# --------------------------------------------------------------------------- the harness


def test_finetune_on_target_lowers_test_loss(seq_files, tiny_lm_dir: Path, tmp_path,
                                             write_jsonl) -> None:
    train, test = (read_records(p, r) for p, r in zip(seq_files, ("train", "test"), strict=True))
    res = finetune_and_evaluate(train, test, task="lm", model=str(tiny_lm_dir), options=FAST)
    assert res.n_train == 60 and res.n_test == 20
    assert res.base_test_loss is not None and np.isfinite(res.base_test_loss)
    # a random 2-layer model (LoRA only, tied embeddings frozen) on a learnable pattern:
    # measured 11% lower test loss
    assert res.test_loss < 0.93 * res.base_test_loss, (res.test_loss, res.base_test_loss)
    assert res.test_losses.shape == (20,)
    assert res.test_loss == pytest.approx(float(np.mean(res.test_losses)))
    for stage in ("load_model", "encode", "eval_base", "finetune", "eval"):
        assert res.costs[stage]["seconds"] >= 0 and res.costs[stage]["peak_rss_mb"] > 0
    d = res.to_dict()
    assert d["finetune"]["lora_rank"] == 8 and d["finetune"]["lora_alpha"] == 16
    assert d["improvement_over_base_pct"] > 7

    # the harness tells helpful data from unhelpful: the same budget of off-task chats
    # leaves the test loss far higher than the target's own training split
    rng = np.random.default_rng(1)
    words = ["cat", "dog", "bird", "fish", "tree", "river", "city", "car", "road", "house"]
    noise = read_records(write_jsonl(tmp_path / "noise.jsonl", [
        {"id": f"n{i}", "messages": [{"role": "user", "content": " ".join(rng.choice(words, 4))},
                                     {"role": "assistant",
                                      "content": " ".join(rng.choice(words, 9))}]}
        for i in range(60)]), "train")
    off = finetune_and_evaluate(noise, test, task="lm", model=str(tiny_lm_dir), options=FAST)
    assert off.base_test_loss == res.base_test_loss
    assert res.test_loss < off.test_loss - 0.2, (res.test_loss, off.test_loss)


def test_finetune_uses_a_fresh_model_each_time(seq_files, tiny_lm_dir: Path) -> None:
    """Two identical calls give identical figures: no adapter leaks from one to the next."""
    train, test = (read_records(p, r) for p, r in zip(seq_files, ("train", "test"), strict=True))
    opts = FinetuneOptions(epochs=1, lr=1e-2, lora_rank=4, precision="fp32", max_length=64)
    a = finetune_and_evaluate(train[:16], test, model=str(tiny_lm_dir), options=opts)
    b = finetune_and_evaluate(train[:16], test, model=str(tiny_lm_dir), options=opts)
    assert a.base_test_loss == b.base_test_loss
    assert a.test_loss == pytest.approx(b.test_loss, rel=1e-6)
    base_only = finetune_and_evaluate(None, test, model=str(tiny_lm_dir), options=opts)
    assert base_only.test_loss == a.base_test_loss and base_only.n_train == 0


def test_fixed_steps_train_small_subsets_as_long_as_large_ones(seq_files, tiny_lm_dir: Path) -> None:
    """``steps`` fixes the optimiser steps whatever the subset size: 5 examples at batch 2
    cycle for 7 steps, the same count as 14 examples, and epochs is ignored."""
    train, test = (read_records(p, r) for p, r in zip(seq_files, ("train", "test"), strict=True))
    opts = FinetuneOptions(steps=7, epochs=1, lr=1e-2, lora_rank=4, batch_size=2,
                           precision="fp32", max_length=64)
    small = finetune_and_evaluate(train[:5], test, model=str(tiny_lm_dir), options=opts)
    large = finetune_and_evaluate(train[:14], test, model=str(tiny_lm_dir), options=opts)
    assert small.info["finetune"]["steps"] == 7 and large.info["finetune"]["steps"] == 7
    by_epochs = finetune_and_evaluate(train[:5], test, model=str(tiny_lm_dir),
                                      options=FinetuneOptions(**{**opts.__dict__, "steps": None}))
    assert by_epochs.info["finetune"]["steps"] == 3  # ceil(5 / 2)
    assert small.test_loss != by_epochs.test_loss
    assert small.to_dict()["finetune"].get("epochs") is None
    with pytest.raises(OptionError, match="steps"):
        FinetuneOptions(steps=0).validate()
    assert "steps" not in FinetuneOptions().setup_fields()
    assert FinetuneOptions(steps=3).setup_fields()["steps"] == 3


def test_ner_finetune_raises_f1_and_lowers_loss(tmp_path, tiny_ner_dir: Path, write_jsonl) -> None:
    train = read_records(write_jsonl(tmp_path / "train.jsonl", ner_rows(48, 0)), "train")
    test = read_records(write_jsonl(tmp_path / "test.jsonl", ner_rows(16, 1)), "test")
    opts = FinetuneOptions(epochs=6, lr=1e-2, lora_rank=8, batch_size=8, precision="fp32")
    res = finetune_and_evaluate(train, test, task="ner", model=str(tiny_ner_dir), options=opts)
    assert res.info["labels"] == ["O", "B-LOC", "B-PER"]
    assert res.test_loss < 0.5 * res.base_test_loss
    assert res.f1 is not None and res.base_f1 is not None
    assert res.f1 > 0.8 and res.f1 > res.base_f1 + 0.3


def test_entity_f1_known_cases() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    assert entity_f1(gold, gold) == 1.0
    # one of three entities wrong in span (PER cut short): P = R = 2/3
    pred = [["B-PER", "O", "O", "B-LOC"], ["O", "B-ORG"]]
    assert entity_f1(gold, pred) == pytest.approx(2 / 3)
    # wrong type counts as a miss and a false positive
    assert entity_f1([["B-PER"]], [["B-LOC"]]) == 0.0
    # plain (non-BIO) tags are one-word entities
    assert entity_f1([["person", "O"]], [["person", "O"]]) == 1.0
    assert entity_f1([["O", "O"]], [["O", "O"]]) == 0.0


def test_gsm8k_answers_are_parsed() -> None:
    assert gold_answer("She pays 3 * 2 = <<3*2=6>>6 dollars.\n#### 1,250") == "1250"
    assert gold_answer("no marker 12") is None
    assert predicted_answer("so the total is 6.\n#### 6") == "6"
    assert predicted_answer("First 3 apples, then 4 more, so 7.") == "7"
    assert predicted_answer("#### $18.00") == "18"
    assert predicted_answer("I do not know") is None


def test_exact_match_by_generation(tmp_path, tiny_lm_dir: Path, write_jsonl) -> None:
    rows = [{"id": f"q{i}", "question": "how many cats ?", "answer": f"two plus two\n#### {i}"}
            for i in range(5)] + [{"id": "x", "prompt": "a", "completion": "no final answer"}]
    recs = read_records(write_jsonl(tmp_path / "q.jsonl", rows), "test")
    picked = em_candidates(recs, 3, seed=0)
    assert len(picked) == 3 and all(r.id.startswith("q") for r in picked)
    assert em_candidates(recs, 0, seed=0) == []
    bundle = load_model(str(tiny_lm_dir), "lm")
    em = exact_match(bundle.model, bundle.tokenizer, picked, max_new_tokens=4, precision="fp32")
    assert em == 0.0  # a random word-level model never writes digits


# --------------------------------------------------------------------------- overlap guard


def test_overlap_guard_names_files_and_records(tmp_path, write_jsonl) -> None:
    test = read_records(write_jsonl(tmp_path / "test.jsonl", [
        {"id": "t0", "question": "What is 2+2?", "answer": "4"},
        {"id": "t1", "question": "Name a  CAT.", "answer": "Tom"},
    ]), "test")
    pool = read_records(write_jsonl(tmp_path / "pool.jsonl", [
        {"id": "p0", "messages": [{"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "hello"}]},
        # same content, other shape, other case and spacing: still a duplicate
        {"id": "p1", "messages": [{"role": "user", "content": "name a cat."},
                                  {"role": "assistant", "content": "tom"}]},
    ]), "pool")
    val = read_records(write_jsonl(tmp_path / "val.jsonl", [
        {"id": "v0", "question": "What is 2+2?", "answer": "4"}]), "val")
    assert content_hash(test[1]) == content_hash(pool[1])
    with pytest.raises(OverlapError) as err:
        check_no_overlap(test, {"pool": pool, "val set": val})
    msg = str(err.value)
    assert f"the test set ({tmp_path / 'test.jsonl'}) overlaps the pool ({tmp_path / 'pool.jsonl'})" in msg
    assert f"test {tmp_path / 'test.jsonl'}:2 (id t1) = pool {tmp_path / 'pool.jsonl'}:2 (id p1)" in msg
    assert f"overlaps the val set ({tmp_path / 'val.jsonl'})" in msg and "(id v0)" in msg
    check_no_overlap(test, {"pool": pool[:1]})  # no duplicates: passes


def test_eval_cli_writes_json(seq_files, tiny_lm_dir: Path, tmp_path, capsys) -> None:
    train, test = seq_files
    out = tmp_path / "eval.json"
    rc = main(["eval", "--train", str(train), "--test", str(test), "--model", str(tiny_lm_dir),
               "--epochs", "1", "--lr", "1e-2", "--lora-rank", "4", "--max-length", "64",
               "--precision", "fp32", "--no-progress", "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert printed["test_loss"] == written["test_loss"] < written["base_test_loss"]
    for key in ("wall_seconds", "peak_rss_mb", "costs", "n_train", "finetune"):
        assert key in written


def test_eval_cli_rejects_test_in_train(seq_files, tiny_lm_dir: Path, capsys) -> None:
    train, _ = seq_files
    rc = main(["eval", "--train", str(train), "--test", str(train), "--model", str(tiny_lm_dir),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("finesift: error: the test set") and "overlaps the training set" in err
    assert "60 exact duplicate(s)" in err and "Traceback" not in err
