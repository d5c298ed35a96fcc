"""The plain text of a record, for methods that look at words rather than tokens
(``dsir``, ``embed`` with the MiniLM embedder)."""

from __future__ import annotations

from collections.abc import Sequence

from finesift.data.records import Record
from finesift.errors import OptionError


def record_text(rec: Record) -> str:
    """Everything a record shows the model, prompt included, as one string.

    * chat: every message's content, one per line (roles left out);
    * prompt/completion: the prompt, a newline, the completion;
    * text: the text;
    * NER: the tokens joined by spaces.
    """
    if rec.shape == "chat":
        return "\n".join(m.get("content", "") for m in rec.messages or [])
    if rec.shape == "prompt_completion":
        return f"{rec.prompt or ''}\n{rec.completion or ''}"
    if rec.shape == "ner":
        return " ".join(rec.tokens or [])
    return rec.text or ""


def texts_of(records: Sequence[Record], n_expected: int, role: str, method: str) -> list[str]:
    """The texts of ``records``, checking they are aligned with the encoded examples.

    Raises:
        OptionError: the context carries no records (or not one per example).
    """
    if len(records) != n_expected:
        raise OptionError(
            f"{method} reads the {role} records' text, but the method context has "
            f"{len(records)} {role} records for {n_expected} examples"
        )
    return [record_text(r) for r in records]
