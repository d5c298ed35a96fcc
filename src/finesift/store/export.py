"""``--export``: the selection in a form a trainer reads as it is, next to ``selected.jsonl``.

``selected.jsonl`` keeps every selected record exactly as it was read, so a selection from
ShareGPT ``conversations``, CSV prompt/completion rows and a ``datasets`` Dataset holds
three row layouts. An export writes the same records (best first) in one layout, every row
with the same columns and types whatever the mix of sources:

``messages`` -> ``selected_messages.jsonl``
    TRL's conversational format: ``{"messages": [{"role", "content"}, ...], "id",
    "source", "score"}``. A chat keeps its turns (ShareGPT ``from``/``value`` become
    ``role``/``content``, ``human``/``gpt`` become ``user``/``assistant``); a
    prompt/completion record is a user turn and an assistant turn; a text record is one
    assistant turn holding the text (finesift scores every token of it, as training on
    that turn does).
``prompt-completion`` -> ``selected_prompt_completion.jsonl``
    TRL's conversational prompt-completion format: ``{"prompt": [turns], "completion":
    [{"role": "assistant", "content"}], "id", "source", "score"}``, which
    ``trl.SFTTrainer`` trains on the completion only (through the model's chat
    template). A chat's prompt is every turn before its last assistant reply and the
    completion that reply (turns after it are left out: there is nothing to learn from
    them); a prompt/completion record is a user turn and the reply. A text record has no
    prompt: refused (export it as ``messages``).
``datasets`` -> ``selected_dataset/``
    A ``datasets.save_to_disk`` folder of the ``messages`` rows
    (``datasets.load_from_disk`` reads it). For NER records, rows ``{"tokens", "tags",
    "id", "source", "score"}``, the one export that applies to them.

The exports a run asks for are checked against the pool's records before any work
(:func:`check_exportable`), so a run never scores for an hour and then fails to write.
Files are written atomically with the run's other outputs (:func:`finesift.store.run.
write_outputs`), before the manifest, whose ``exports`` entry lists them.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from finesift.data.records import Record
from finesift.errors import OptionError
from finesift.store.files import write_jsonl

FORMATS: tuple[str, ...] = ("messages", "prompt-completion", "datasets")
"""The export formats, in the order a run writes them."""

FILES: dict[str, str] = {
    "messages": "selected_messages.jsonl",
    "prompt-completion": "selected_prompt_completion.jsonl",
    "datasets": "selected_dataset",
}
"""Export format -> the file (or folder) it writes in the output folder."""

_ALIASES = {"prompt_completion": "prompt-completion", "prompt-completions": "prompt-completion",
            "dataset": "datasets", "hf": "datasets", "conversational": "messages"}

EXTRA_COLUMNS = ("id", "source", "score")
"""The columns every export row has after its content columns."""


def parse_export(value: Any) -> tuple[str, ...]:
    """The export formats asked for, in :data:`FORMATS` order, each once.

    Args:
        value: ``None``, ``""`` or ``[]`` (none), a format name, ``"messages,datasets"``,
            or a list of names.

    Raises:
        OptionError: an unknown format.
    """
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise OptionError(f"--export {item!r}: expected a format name, one of "
                              f"{', '.join(FORMATS)}")
        for part in item.split(","):
            name = part.strip().lower()
            if not name:
                continue
            name = _ALIASES.get(name, name)
            if name not in FORMATS:
                raise OptionError(f"--export {part.strip()!r}: unknown format; choose from "
                                  f"{', '.join(FORMATS)}")
            names.append(name)
    return tuple(f for f in FORMATS if f in names)


def _no_chat(fmt: str) -> str:
    return (f"--export {fmt}: NER records (tokens + tags) have no chat form; export them "
            "with --export datasets (rows of tokens, tags, id, source, score)")


def _why_not(record: Record, fmt: str) -> str | None:
    """Why ``record`` cannot be exported as ``fmt`` (``None``: it can)."""
    if record.shape == "ner":
        return None if fmt == "datasets" else _no_chat(fmt)
    if fmt != "prompt-completion":
        return None
    if record.shape == "text":
        return ("--export prompt-completion: a text record has no prompt to split off; "
                "export text records with --export messages (or datasets)")
    if record.shape == "chat":
        reply = _last_reply(record.messages or [])
        if reply is None:
            return "--export prompt-completion: the chat has no assistant reply"
        if reply == 0:
            return ("--export prompt-completion: the chat's last assistant reply has no turn "
                    "before it to be its prompt; export it with --export messages")
    return None


def check_exportable(records: Sequence[Record], formats: Sequence[str]) -> None:
    """Raise at the first record (named by its location) that one of ``formats`` cannot
    export, and at a pool that mixes NER records with others in the ``datasets`` form."""
    if not formats:
        return
    for fmt in formats:
        for rec in records:
            why = _why_not(rec, fmt)
            if why is not None:
                raise rec.error(why)
        if fmt == "datasets" and records:
            ner = [r.shape == "ner" for r in records]
            if any(ner) and not all(ner):
                bad = records[ner.index(not ner[0])]
                raise bad.error("--export datasets: NER and chat/text records cannot share "
                                "one table")


def _last_reply(messages: list[dict[str, str]]) -> int | None:
    for j in range(len(messages) - 1, -1, -1):
        if messages[j]["role"] == "assistant" and messages[j]["content"].strip():
            return j
    return None


def _turns(record: Record) -> list[dict[str, str]]:
    """The record as chat turns (``{"role", "content"}`` only, roles normalised)."""
    if record.shape == "chat":
        return [{"role": m["role"], "content": m["content"]} for m in record.messages or []]
    if record.shape == "prompt_completion":
        return [{"role": "user", "content": record.prompt or ""},
                {"role": "assistant", "content": record.completion or ""}]
    if record.shape == "text":
        return [{"role": "assistant", "content": record.text or ""}]
    raise record.error(_no_chat("messages"))


def export_row(record: Record, score: float, fmt: str) -> dict[str, Any]:
    """One record as a row of the export ``fmt`` (content columns, then id, source, score).

    Raises:
        InputError: the record has no form in ``fmt`` (naming the record).
    """
    why = _why_not(record, fmt)
    if why is not None:
        raise record.error(why)
    extra = {"id": record.id, "source": record.source, "score": float(score)}
    if record.shape == "ner":
        return {"tokens": list(record.tokens or []), "tags": list(record.tags or []), **extra}
    turns = _turns(record)
    if fmt == "prompt-completion":
        j = len(turns) - 1 if record.shape != "chat" else _last_reply(turns)
        assert j is not None and j > 0
        return {"prompt": turns[:j], "completion": [turns[j]], **extra}
    return {"messages": turns, **extra}


def export_rows(records: Sequence[Record], scores: Sequence[float],
                fmt: str) -> list[dict[str, Any]]:
    """The records (in order) as rows of the export ``fmt``, one per record."""
    return [export_row(r, s, fmt) for r, s in zip(records, scores, strict=True)]


def columns_of(records: Sequence[Record], fmt: str) -> list[str]:
    """The columns of ``fmt``'s rows for these records."""
    if fmt == "datasets" and records and records[0].shape == "ner":
        content = ["tokens", "tags"]
    elif fmt == "prompt-completion":
        content = ["prompt", "completion"]
    else:
        content = ["messages"]
    return [*content, *EXTRA_COLUMNS]


def export_entry(formats: Sequence[str], records: Sequence[Record]) -> dict[str, Any]:
    """The manifest's ``exports`` entry (empty when nothing is exported): per format its
    file, row count and columns."""
    if not formats:
        return {}
    return {"exports": {fmt: {"path": FILES[fmt], "rows": len(records),
                              "columns": columns_of(records, fmt)} for fmt in formats}}


def save_dataset(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as a ``datasets.save_to_disk`` folder at ``path``, atomically: saved under a
    temporary name next to it, then renamed (an older folder there is replaced; no
    half-written folder ever has the final name)."""
    import datasets

    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    old = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.old")
    quiet = not datasets.are_progress_bars_disabled()  # no "Saving the dataset" bar
    try:
        if quiet:
            datasets.disable_progress_bars()
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp))
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        if quiet:
            datasets.enable_progress_bars()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def export_writers(formats: Sequence[str], records: Sequence[Record],
                   scores: Sequence[float],
                   jsonl_writer: Callable[[Path, Any], None] | None = None,
                   ) -> list[tuple[str, Callable[[Path], None]]]:
    """``(file name, writer)`` per export format, for
    :func:`finesift.store.run.write_outputs`."""
    write_lines = jsonl_writer or write_jsonl
    writers: list[tuple[str, Callable[[Path], None]]] = []
    for fmt in formats:
        rows = export_rows(records, scores, fmt)  # datasets: the messages rows (NER: tags)
        if fmt == "datasets":
            writers.append((FILES[fmt], lambda path, rows=rows: save_dataset(path, rows)))
        else:
            writers.append((FILES[fmt], lambda path, rows=rows: write_lines(path, rows)))
    return writers


__all__ = ["EXTRA_COLUMNS", "FILES", "FORMATS", "check_exportable", "export_entry",
           "export_row", "export_rows", "export_writers", "parse_export", "save_dataset"]
