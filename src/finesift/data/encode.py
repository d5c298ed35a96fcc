"""Encoders: records -> token ids with label masks, for causal LMs and token classifiers.

Causal LM (:func:`encode_lm`): a label token is one the model must generate. For a chat
that is every assistant reply and its end-of-turn marker (``<|im_end|>`` in ChatML);
never the system or user turns or the role headers. For prompt/completion records it is
the completion, for plain text every token. Labels follow the Hugging Face convention
(unshifted, -100 elsewhere, ``labels[0]`` always -100 since nothing predicts it).

The assistant replies are located as character spans inside the rendered chat, and the
whole string is tokenized once, so the ids are exactly those the model would see at
inference; a token is a label token when it lies inside a span (up to whitespace).
Locating a reply renders the conversation up to it, so a chat of n turns costs O(n^2)
renderings; for a chat of more than 16 replies that ``max_length`` truncates, the
replies past the last kept token are found by text search instead, which gives the same
labels for every kept token (a chat of 100,000 turns encodes in linear time).

Token classification (:func:`encode_ner`): the first sub-token of each word carries the
word's tag id, every other position -100.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from finesift.data.records import Example, Record
from finesift.errors import OptionError

IGNORE_INDEX = -100
"""Label of positions that carry no loss."""

TEMPLATES: tuple[str, ...] = ("auto", "chat", "plain")
"""Accepted values of ``encode_lm(template=...)``."""

SKIP_NO_LABELS = "no label tokens"
SKIP_TRUNCATED = "no label tokens after truncation"
SKIP_TEMPLATE_ERROR = "chat template error"
SKIP_REPLY_NOT_FOUND = "assistant reply not found in the rendered chat"
SKIP_NO_WORDS = "no words left after truncation"

# End-of-turn markers of common chat templates, extended over when a reply is located by
# text search (the tokenizer's eos token is tried first).
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")

_MAX_SKIPPED_IDS = 20
# A chat with more replies than this is tokenized before its replies are located, so that
# replies past the max_length cut are found by a cheap text search instead of rendering
# every prefix of the conversation (quadratic in the number of turns).
_LONG_CHAT = 16
_DEFAULT_LABEL = re.compile(r"LABEL_\d+")


@dataclass
class EncodeReport:
    """What an encoder did with its records.

    Attributes:
        n_records: records given.
        n_encoded: examples returned.
        n_truncated: returned examples that ``max_length`` cut.
        skipped: reason -> number of records skipped for it (not an error: e.g. a
            record with no label tokens, or whose label tokens were all truncated away).
        skipped_ids: ids of the first 20 skipped records.
        warnings: things the caller may want to show (each message once).
    """

    n_records: int = 0
    n_encoded: int = 0
    n_truncated: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_ids: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def skip(self, reason: str, record_id: str) -> None:
        """Count one skipped record.

        Args:
            reason: short reason, the key in ``skipped``.
            record_id: the record's id, kept if fewer than 20 are stored.
        """
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.skipped_ids) < _MAX_SKIPPED_IDS:
            self.skipped_ids.append(record_id)

    def warn(self, message: str) -> None:
        """Add a warning unless the same message is already there.

        Args:
            message: the warning text.
        """
        if message not in self.warnings:
            self.warnings.append(message)

    @property
    def n_skipped(self) -> int:
        """Total number of skipped records."""
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-serialisable dict."""
        return {
            "n_records": self.n_records,
            "n_encoded": self.n_encoded,
            "n_truncated": self.n_truncated,
            "skipped": dict(self.skipped),
            "skipped_ids": list(self.skipped_ids),
            "warnings": list(self.warnings),
        }


class _Skip(Exception):
    """Internal: the record cannot be encoded; skip it under ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _check_max_length(max_length: int | None) -> None:
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise OptionError(f"max_length must be a positive integer or None, got {max_length!r}")


# --------------------------------------------------------------------------- causal LM


@dataclass
class _Rendered:
    """A record as one string, the character spans to label, and extra special tokens."""

    text: str
    spans: list[tuple[int, int]]
    add_bos: bool = False
    add_eos: bool = False  # append eos as a label token
    encoding: Any = None  # the fast tokenizer's output for ``text``, if already computed


class _LMEncoder:
    def __init__(self, tokenizer: Any, use_chat: bool, max_length: int | None = None) -> None:
        self.tok = tokenizer
        self.use_chat = use_chat
        self.max_length = max_length
        self.bos_id: int | None = getattr(tokenizer, "bos_token_id", None)
        self.eos_id: int | None = getattr(tokenizer, "eos_token_id", None)
        eos = getattr(tokenizer, "eos_token", None)
        ends = ([eos] if isinstance(eos, str) and eos else []) + list(_END_OF_TURN)
        self.end_markers = list(dict.fromkeys(ends))
        self.n_searched = 0  # replies located by text search (template not prefix-stable)
        self.template_errors: list[str] = []

    # ---- rendering

    def render(self, rec: Record) -> _Rendered:
        if rec.shape == "chat":
            messages = rec.messages or []
        elif rec.shape == "prompt_completion":
            if not (rec.completion or "").strip():
                raise _Skip(SKIP_NO_LABELS)
            if not self.use_chat:
                prompt = rec.prompt or ""
                text = f"{prompt}\n{rec.completion}"
                return _Rendered(
                    text,
                    [(len(prompt) + 1, len(text))],
                    add_bos=True,
                    add_eos=self.eos_id is not None,
                )
            messages = [
                {"role": "user", "content": rec.prompt or ""},
                {"role": "assistant", "content": rec.completion or ""},
            ]
        elif rec.shape == "text":
            text = rec.text or ""
            return _Rendered(text, [(0, len(text))], add_bos=True)
        else:
            raise rec.error(
                f"a {rec.shape!r} record cannot be encoded for a causal LM; expected chat, "
                "prompt_completion or text"
            )
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise _Skip(SKIP_NO_LABELS)
        if self.use_chat:
            return self._render_template(messages)
        return self._render_plain(messages)

    def _render_plain(self, messages: list[dict[str, str]]) -> _Rendered:
        text = ""
        spans: list[tuple[int, int]] = []
        for m in messages:
            text += f"{m['role']}: "
            start = len(text)
            text += m["content"] + "\n"
            if m["role"] == "assistant" and m["content"].strip():
                spans.append((start, len(text)))
        last_reply = messages[-1]["role"] == "assistant" and bool(messages[-1]["content"].strip())
        return _Rendered(text, spans, add_bos=True, add_eos=last_reply and self.eos_id is not None)

    def _apply(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        out = self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        if not isinstance(out, str):
            raise TypeError(f"apply_chat_template returned {type(out).__name__}, not str")
        return out

    def _render_template(self, messages: list[dict[str, str]]) -> _Rendered:
        try:
            full = self._apply(messages, False)
        except Exception as e:  # noqa: BLE001 -- a template may raise anything (jinja, ValueError)
            self.template_errors.append(str(e))
            raise _Skip(SKIP_TEMPLATE_ERROR) from None
        cut, encoding = self._cut(full, messages)
        spans: list[tuple[int, int]] = []
        pos = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or not m["content"].strip():
                continue
            if pos >= cut:
                # every later reply starts at or after ``pos``, past the last kept token,
                # so it labels no kept token; a text search still checks it is there
                span = self._span_by_search(full, m["content"], pos)
            else:
                # a reply that opens the conversation has no prefix to render: search for it
                span = self._span_by_prefix(messages, i, full, pos) if i > 0 else None
                if span is None:
                    span = self._span_by_search(full, m["content"], pos)
                    self.n_searched += int(i > 0)
            if span is None:
                raise _Skip(SKIP_REPLY_NOT_FOUND)
            spans.append(span)
            pos = span[1]
        return _Rendered(full, spans, encoding=encoding)

    def _cut(self, full: str, messages: list[dict[str, str]]) -> tuple[float, Any]:
        """For a long chat that ``max_length`` truncates: the character offset where the
        kept tokens end (no token before the cut reaches past it) and the tokenizer's
        output for ``full`` (reused by :meth:`tokenize`). Otherwise ``(inf, None)``."""
        if self.max_length is None or not getattr(self.tok, "is_fast", False):
            return math.inf, None
        replies = sum(1 for m in messages if m["role"] == "assistant" and m["content"].strip())
        if replies <= _LONG_CHAT:
            return math.inf, None
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if len(offsets) <= self.max_length:
            return math.inf, enc
        return max((e for _, e in offsets[: self.max_length]), default=0), enc

    def _span_by_prefix(
        self, messages: list[dict[str, str]], i: int, full: str, pos: int
    ) -> tuple[int, int] | None:
        """Span of reply ``i``: from the end of the conversation before it (with the
        generation prompt) to the end of the conversation including it, when the
        template renders each conversation as a prefix of the longer one."""
        try:
            before = self._apply(messages[:i], True)
            upto = self._apply(messages[: i + 1], False)
        except Exception:  # noqa: BLE001 -- e.g. a template rejecting an empty conversation
            return None
        if not (upto.startswith(before) and full.startswith(upto)) or len(before) < pos:
            return None
        start, end = len(before), len(upto.rstrip())
        if end <= start or messages[i]["content"].strip() not in full[start:end]:
            return None
        return start, end

    def _span_by_search(self, full: str, content: str, pos: int) -> tuple[int, int] | None:
        """Span of a reply found by searching its text from ``pos``, extended over an
        end-of-turn marker that follows it immediately."""
        needle = content
        idx = full.find(needle, pos)
        if idx < 0:
            needle = content.strip()
            idx = full.find(needle, pos)
        if idx < 0:
            return None
        end = idx + len(needle)
        for marker in self.end_markers:
            if full.startswith(marker, end):
                end += len(marker)
                break
        return idx, end

    # ---- tokenizing

    def tokenize(self, rendered: _Rendered) -> tuple[list[int], list[bool]]:
        text, spans = rendered.text, rendered.spans
        if getattr(self.tok, "is_fast", False):
            enc = rendered.encoding
            if enc is None:
                enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            mask = _span_mask(text, enc["offset_mapping"], spans)
        else:  # no offsets: tokenize the pieces between span boundaries separately
            ids, mask = [], []
            cuts = sorted({0, len(text), *(b for span in spans for b in span)})
            for a, b in itertools.pairwise(cuts):
                piece = self.tok(text[a:b], add_special_tokens=False)["input_ids"]
                inside = any(s <= a and b <= e for s, e in spans)
                ids.extend(piece)
                mask.extend([inside] * len(piece))
        if rendered.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
            mask.insert(0, False)
        if rendered.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
            mask.append(True)
        return ids, mask


def _span_mask(
    text: str, offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]
) -> list[bool]:
    """:func:`_in_spans` of every token. When the spans are sorted and disjoint (as the
    renderers make them), each token is checked only against the spans it can overlap,
    found by bisection: linear rather than tokens x spans for a chat of many turns."""
    disjoint = all(s < e for s, e in spans) and all(
        a[1] <= b[0] for a, b in itertools.pairwise(spans))
    if len(spans) <= 4 or not disjoint:
        return [_in_spans(text, s, e, spans) for s, e in offsets]
    ends = [e for _, e in spans]
    mask = []
    for start, end in offsets:
        j = bisect.bisect_right(ends, start)  # the first span ending after the token starts
        k = j
        while k < len(spans) and spans[k][0] < end:
            k += 1
        mask.append(k > j and _in_spans(text, start, end, spans[j:k]))
    return mask


def _in_spans(text: str, start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """Whether the token at characters ``[start, end)`` belongs to one of the spans:
    it overlaps the span and any part of it outside the span is whitespace."""
    if end <= start:
        return False
    for s, e in spans:
        if start < e and end > s:
            if start < s and text[start:s].strip():
                continue
            if end > e and text[e:end].strip():
                continue
            return True
    return False


def encode_lm(
    records: Sequence[Record],
    tokenizer: Any,
    max_length: int | None,
    *,
    template: str = "auto",
) -> tuple[list[Example], EncodeReport]:
    """Encode chat, prompt/completion and text records for a causal LM.

    Args:
        records: the records (shapes ``chat``, ``prompt_completion`` or ``text``).
        tokenizer: a transformers tokenizer (fast tokenizers give exact label spans;
            slow ones are tokenized piecewise at the span boundaries).
        max_length: keep at most this many tokens (the start; the end is cut), or
            ``None`` for no limit.
        template: ``"auto"`` uses the tokenizer's chat template when it has one, else
            the plain rendering; ``"chat"`` asks for the template (plain, with a
            warning, if there is none); ``"plain"`` always renders ``"{role}: {content}\\n"``
            per message and ``prompt + "\\n" + completion`` (+ eos) for prompt/completion.

    Returns:
        The examples (``Example.index`` = position in ``records``; skipped records leave
        gaps) and a report of counts, skips and warnings.

    Raises:
        OptionError: bad ``template`` or ``max_length``.
        InputError: a record of a shape a causal LM cannot use (``ner``).
    """
    if template not in TEMPLATES:
        raise OptionError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    _check_max_length(max_length)
    report = EncodeReport()
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_template:
        report.warn("template='chat' but the tokenizer has no chat template; used plain text")
    encoder = _LMEncoder(tokenizer, use_chat=template != "plain" and has_template,
                         max_length=max_length)

    examples: list[Example] = []
    for index, rec in enumerate(records):
        report.n_records += 1
        try:
            ids, mask = encoder.tokenize(encoder.render(rec))
        except _Skip as s:
            report.skip(s.reason, rec.id)
            continue
        input_ids = np.asarray(ids, dtype=np.int64)
        labels = np.where(np.asarray(mask, dtype=bool), input_ids, IGNORE_INDEX).astype(np.int64)
        if labels.size:
            labels[0] = IGNORE_INDEX
        if not (labels != IGNORE_INDEX).any():
            report.skip(SKIP_NO_LABELS, rec.id)
            continue
        truncated = max_length is not None and input_ids.size > max_length
        if truncated:
            input_ids, labels = input_ids[:max_length].copy(), labels[:max_length].copy()
        n_labels = int((labels != IGNORE_INDEX).sum())
        if n_labels == 0:
            report.skip(SKIP_TRUNCATED, rec.id)
            continue
        examples.append(Example(index, input_ids, labels, n_labels, truncated=truncated))
        report.n_encoded += 1
        report.n_truncated += int(truncated)

    if encoder.n_searched:
        report.warn(
            "the chat template does not render conversations as prefixes of longer ones; "
            f"{encoder.n_searched} assistant replies were located by text search"
        )
    if encoder.template_errors:
        report.warn(
            f"the chat template failed on {len(encoder.template_errors)} records; first error: "
            f"{encoder.template_errors[0]}"
        )
    return examples, report


# --------------------------------------------------------------------------- NER


def encode_ner(
    records: Sequence[Record],
    tokenizer: Any,
    label2id: dict[str, int],
    max_length: int | None,
) -> tuple[list[Example], EncodeReport]:
    """Encode NER records for a token classifier.

    Args:
        records: ``ner`` records (``tokens`` and ``tags``).
        tokenizer: a fast transformers tokenizer (``word_ids()`` is needed); special
            tokens ([CLS], [SEP], ...) are added and never labelled.
        label2id: tag name -> class id; every tag must be in it.
        max_length: keep at most this many tokens, special tokens included (``None``:
            no limit).

    Returns:
        The examples (label = the word's tag id at its first sub-token, else -100) and a
        report; a record whose words were all truncated away is skipped and counted.

    Raises:
        OptionError: the tokenizer is not a fast tokenizer, or bad ``max_length``.
        InputError: a record is not ``ner`` or has a tag not in ``label2id`` (the
            message names the record's file and line/record, the tag and the labels).
    """
    _check_max_length(max_length)
    if not getattr(tokenizer, "is_fast", False):
        raise OptionError("encode_ner needs a fast tokenizer (one that provides word_ids())")
    report = EncodeReport()
    examples: list[Example] = []
    n_wordless = 0
    for index, rec in enumerate(records):
        report.n_records += 1
        if rec.shape != "ner" or rec.tokens is None or rec.tags is None:
            raise rec.error(f"expected an ner record (tokens + tags), got shape {rec.shape!r}")
        for tag in rec.tags:
            if tag not in label2id:
                known = ", ".join(label2id) or "none"
                raise rec.error(f"tag {tag!r} is not one of the model's labels: {known}")
        if not rec.tokens:
            report.skip(SKIP_NO_LABELS, rec.id)
            continue
        enc = tokenizer(rec.tokens, is_split_into_words=True, add_special_tokens=True)
        truncated = max_length is not None and len(enc["input_ids"]) > max_length
        if truncated:
            enc = tokenizer(
                rec.tokens,
                is_split_into_words=True,
                add_special_tokens=True,
                truncation=True,
                max_length=max_length,
            )
        word_ids = enc.word_ids()
        input_ids = np.asarray(enc["input_ids"], dtype=np.int64)
        labels = np.full(input_ids.shape, IGNORE_INDEX, dtype=np.int64)
        seen: set[int] = set()
        for pos, word in enumerate(word_ids):
            if word is not None and word not in seen:
                seen.add(word)
                labels[pos] = label2id[rec.tags[word]]
        if not truncated:
            n_wordless += len(rec.tokens) - len(seen)
        n_labels = len(seen)
        if n_labels == 0:
            report.skip(SKIP_NO_WORDS if truncated else SKIP_NO_LABELS, rec.id)
            continue
        examples.append(Example(index, input_ids, labels, n_labels, truncated=truncated))
        report.n_encoded += 1
        report.n_truncated += int(truncated)
    if n_wordless:
        report.warn(
            f"{n_wordless} words produced no sub-tokens (the tokenizer dropped them) and "
            "carry no label"
        )
    return examples, report


def build_label_map(records_lists: Sequence[Sequence[Record]]) -> dict[str, int]:
    """A tag -> id map over all tags in the records, for a freshly initialised head.

    Args:
        records_lists: lists of records (e.g. the pool and the target); records
            without tags are ignored.

    Returns:
        ``"O"`` first (id 0) if present, then the other tags sorted.
    """
    tags: set[str] = set()
    for records in records_lists:
        for rec in records:
            if rec.tags:
                tags.update(rec.tags)
    order = (["O"] if "O" in tags else []) + sorted(tags - {"O"})
    return {tag: i for i, tag in enumerate(order)}


def model_label_map(config: Any) -> dict[str, int] | None:
    """The model's tag -> id map, if it has meaningful label names.

    Args:
        config: a transformers ``PretrainedConfig`` (``id2label``/``label2id``).

    Returns:
        ``{name: id}`` from ``config.id2label`` (or ``label2id``), or ``None`` when the
        config has none or only the default ``LABEL_0``, ``LABEL_1``, ... names.
    """
    id2label = getattr(config, "id2label", None)
    label2id = getattr(config, "label2id", None)
    if id2label:
        mapping = {str(name): int(i) for i, name in id2label.items()}
    elif label2id:
        mapping = {str(name): int(i) for name, i in label2id.items()}
    else:
        return None
    if all(_DEFAULT_LABEL.fullmatch(name) for name in mapping):
        return None
    return dict(sorted(mapping.items(), key=lambda kv: kv[1]))


def lengths(examples: Sequence[Example]) -> np.ndarray:
    """Token counts of the examples (int64), e.g. for length bucketing.

    Args:
        examples: encoded examples.
    """
    return np.asarray([len(ex) for ex in examples], dtype=np.int64)
