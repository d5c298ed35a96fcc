"""The record schema: what every reader produces and every encoder consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from finesift.errors import InputError

Shape = Literal["chat", "prompt_completion", "text", "ner"]
SHAPES: tuple[str, ...] = ("chat", "prompt_completion", "text", "ner")


@dataclass
class Record:
    """One input example as read from a file, plus its normalised content.

    Attributes:
        id: the record's ``id`` field if present, else ``"<file>:<line>"`` (or
            ``"<file>:<row>"`` for formats without lines).
        source: the file (or folder) it was read from, as given by the user.
        row: 0-based index of the record within its file.
        line: 1-based line number where the format has lines (JSONL, CSV, CoNLL:
            the sentence's first line), else ``None``.
        shape: one of :data:`SHAPES`.
        raw: the record exactly as read (JSON-serialisable), written back unchanged
            to ``selected.jsonl``.
        messages: for ``chat``: ``[{"role": ..., "content": ...}, ...]``.
        prompt, completion: for ``prompt_completion`` (``instruction``/``input``/
            ``output`` are folded into these).
        text: for ``text``.
        tokens, tags: for ``ner`` (string tags, BIO or plain).
        meta: optional extra fields a method may use (``subtask``, ``domain``).
        origin: for a record of an in-memory input (a ``datasets.Dataset``, a DataFrame,
            a list of dicts): how errors name that input, e.g. ``pool[0]
            (datasets.Dataset)``; ``None`` for a file's records.
    """

    id: str
    source: str
    row: int
    shape: str
    raw: dict[str, Any]
    line: int | None = None
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    tokens: list[str] | None = None
    tags: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    origin: str | None = None

    @property
    def where(self) -> str:
        """Human-readable location, e.g. ``pool.jsonl:17`` (an in-memory input's row:
        ``pool[0] (datasets.Dataset) row 17``)."""
        if self.origin is not None:
            return f"{self.origin} row {self.row}"
        if self.line is not None:
            return f"{self.source}:{self.line}"
        return f"{self.source} (record {self.row})"

    def error(self, message: str) -> InputError:
        """An :class:`InputError` located at this record (its line, else its row).

        Args:
            message: what is wrong and what was expected.
        """
        if self.origin is not None:
            return InputError(self.where, message)
        if self.line is not None:
            return InputError(self.source, message, line=self.line)
        return InputError(self.source, message, record=self.row)


def record_text(rec: Record, *, normalise: bool = False) -> str:
    """Everything a record shows the model, prompt included, as one string.

    * chat: every message's content, one per line (roles left out);
    * prompt/completion: the prompt, a newline, the completion;
    * text: the text;
    * NER: the tokens joined by spaces (the words count, not the tags).

    Args:
        rec: the record.
        normalise: the form duplicates are found in (the overlap guard's content hash):
            each of those parts Unicode NFKC, case-folded, whitespace collapsed, the
            empty ones left out, joined by ``\\x1f``; a ``question``/``answer`` record and
            a chat with the same user and assistant turns then have the same text.
    """
    if rec.shape == "chat":
        parts = [m.get("content", "") for m in rec.messages or []]
    elif rec.shape == "prompt_completion":
        parts = [rec.prompt or "", rec.completion or ""]
    elif rec.shape == "ner":
        parts = [" ".join(rec.tokens or [])]
    else:
        parts = [rec.text or ""]
    if not normalise:
        return "\n".join(parts)
    return "\x1f".join(p for p in map(_normalised, parts) if p)


def _normalised(text: str) -> str:
    import unicodedata

    return " ".join(unicodedata.normalize("NFKC", str(text)).casefold().split())


@dataclass
class Example:
    """A record encoded for a model.

    Attributes:
        index: position of the record in the list that was encoded.
        input_ids: token ids (int64).
        labels: same length as ``input_ids``. For causal LMs the token id where the
            position is a label token (HF convention: unshifted, the model predicts
            ``labels[i]`` from positions ``< i``), else -100. For token
            classification the class id at each word's first sub-token, else -100.
        n_label_tokens: number of positions whose label is not -100 (after shifting
            for causal LMs, i.e. the number of predicted tokens).
        truncated: whether ``max_length`` cut the record.
    """

    index: int
    input_ids: np.ndarray
    labels: np.ndarray
    n_label_tokens: int
    truncated: bool = False

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])
