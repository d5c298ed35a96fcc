"""Shared fixtures: tiny model folders usable as ``--model PATH`` and planted data sets.

* ``tiny_lm_dir``: a random 2-layer Llama + the word-level ChatML tokenizer of
  :mod:`finesift.testing`, saved as safetensors (``--task lm``).
* ``tiny_ner_dir``: a random 2-layer BERT encoder (no classification head) + a WordPiece
  ``BertTokenizerFast`` (``--task ner``: finesift builds a fresh head from the data's tags).
* ``tiny_tagger_dir``: the same tokenizer + a BERT token classifier whose head has fixed
  labels (``O``, ``B-PER``, ``I-PER``).
* ``lm_data``: two pool files (text and chat records) with planted target-like records,
  one chat without a reply (skipped while reading) and a prompt/completion target file.
* ``write_jsonl``: writes rows as JSON Lines.
* every test module runs torch on one thread (set ``TORCH_THREADS`` in a module to change
  that): the models are tiny, and torch's thread pool only adds overhead to them, a lot
  of it on a busy 2-core machine.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from finesift.testing import BASE_WORDS, tiny_causal_lm, tiny_token_classifier, tiny_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _torch_threads(request):
    n = torch.get_num_threads()
    torch.set_num_threads(getattr(request.module, "TORCH_THREADS", 1))
    yield
    torch.set_num_threads(n)

# The target task: these ten words in a cycle, starting at one of three places.
PATTERN = ["alpha", "beta", "gamma", "delta", "zeta", "theta", "kappa", "sigma", "omega"]
PATTERN += ["lambda"]
# Words the tiny LM tokenizer gets on top of finesift.testing.BASE_WORDS.
EXTRA_LM_WORDS = ["lorem", "ipsum", "dolor", "amet", "please", "continue", "sequence"]
# Words that are never part of the pattern (the pool's noise).
NOISE_WORDS = [w for w in BASE_WORDS + EXTRA_LM_WORDS if w.isalpha() and w not in PATTERN]
TAGGER_LABELS = ["O", "B-PER", "I-PER"]

N_PER_FILE = 40
PLANT_EVERY = 5  # records 0, 5, 10, ... of each pool file are target-like
SEQ_WORDS = 12


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def write_jsonl() -> Callable[[Path, list[Any]], Path]:
    """``write_jsonl(path, rows)``: one JSON document per line; returns ``path``."""
    return _write_jsonl


def _no_progress_bars() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny causal LM folder (config.json, model.safetensors, tokenizer.json, template)."""
    _no_progress_bars()
    path = tmp_path_factory.mktemp("tiny_lm")
    tok = tiny_tokenizer(EXTRA_LM_WORDS)
    model = tiny_causal_lm(len(tok))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def _wordpiece_tokenizer(extra: list[str] = ()):
    from transformers import BertTokenizerFast

    words = sorted({w for w in BASE_WORDS if w.isalpha()} | set(extra))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "##s", "##ed", "##ing"]
    vocab += [".", ",", "!", "?"]
    # transformers 5 silently ignores vocab_file=; a dict is taken as the vocabulary
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)


@pytest.fixture(scope="session")
def tiny_ner_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT encoder without a token-classification head + a WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    _no_progress_bars()
    path = tmp_path_factory.mktemp("tiny_ner")
    tok = _wordpiece_tokenizer(["went", "met"])
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tagger_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT token classifier with fixed labels O, B-PER, I-PER."""
    _no_progress_bars()
    path = tmp_path_factory.mktemp("tiny_tagger")
    tok = _wordpiece_tokenizer()
    model = tiny_token_classifier(len(tok), TAGGER_LABELS)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@dataclass
class LMData:
    """Planted pool + target files for ``--task lm``.

    Attributes:
        pool: the two pool files (text records, then chat records).
        target: the target file (prompt/completion records).
        planted: ids of the target-like pool records.
        raw: id -> the record's JSON object as written (pool files).
        usable: ids of the pool records that can be scored (the reply-less chat is not).
        skipped: ids of pool records skipped while reading.
    """

    pool: list[Path]
    target: Path
    planted: set[str]
    raw: dict[str, dict[str, Any]]
    usable: list[str]
    skipped: list[str] = field(default_factory=list)


def make_lm_data(folder: Path, seed: int = 0) -> LMData:
    rng = np.random.default_rng(seed)

    def pattern() -> str:
        s = int(rng.integers(0, 3))
        return " ".join(PATTERN[(s + j) % len(PATTERN)] for j in range(SEQ_WORDS))

    def noise(n: int = SEQ_WORDS) -> str:
        return " ".join(str(w) for w in rng.choice(NOISE_WORDS, n))

    text_rows, chat_rows, planted = [], [], set()
    for i in range(N_PER_FILE):
        plant = i % PLANT_EVERY == 0
        text_rows.append({"id": f"text-{i}", "text": pattern() if plant else noise()})
        chat_rows.append({
            "id": f"chat-{i}",
            "messages": [
                {"role": "user", "content": noise(4)},
                {"role": "assistant", "content": pattern() if plant else noise()},
            ],
            "domain": "planted" if plant else "noise",
        })
        if plant:
            planted |= {f"text-{i}", f"chat-{i}"}
    # nothing to learn from: skipped (and counted) while reading
    chat_rows.insert(7, {"id": "chat-noreply", "messages": [
        {"role": "user", "content": noise(4)}, {"role": "assistant", "content": "  "}]})
    target_rows = [
        {"id": f"target-{i}", "prompt": "please continue the sequence", "completion": pattern()}
        for i in range(12)
    ]
    pool = [
        _write_jsonl(folder / "pool_text.jsonl", text_rows),
        _write_jsonl(folder / "pool_chat.jsonl", chat_rows),
    ]
    target = _write_jsonl(folder / "target.jsonl", target_rows)
    raw = {r["id"]: r for r in text_rows + chat_rows}
    usable = [r["id"] for r in text_rows + chat_rows if r["id"] != "chat-noreply"]
    return LMData(pool, target, planted, raw, usable, ["chat-noreply"])


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory: pytest.TempPathFactory) -> LMData:
    return make_lm_data(tmp_path_factory.mktemp("lm_data"))
