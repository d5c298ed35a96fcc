"""How a model turns a batch of examples into log-probs of their label tokens.

A :class:`Task` is the one place that knows the model family. Methods and the training
loop only see ``label_logprobs``: a flat tensor with the log-probability the model gives
each label token, and for each entry the row of the batch it belongs to. Users plug in
another model family by subclassing :class:`Task` (tests do so for logistic regression).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from finesift.data.records import Example


class Task(ABC):
    """Model-family specific batching and label log-probs."""

    @abstractmethod
    def length(self, example: Any) -> int:
        """Cost proxy used to sort examples into batches of similar size."""

    @abstractmethod
    def collate(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Stack examples into model inputs."""

    @abstractmethod
    def label_logprobs(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logp, row)``: log-prob of every label token (float32, flat, in row
        then position order) and the batch row each belongs to."""

    def n_labels(self, example: Any) -> int:
        """Number of label tokens of an example."""
        return int(example.n_label_tokens)


def _pad(arrays: Sequence[np.ndarray], value: int) -> torch.Tensor:
    n = max(len(a) for a in arrays)
    out = np.full((len(arrays), n), value, dtype=np.int64)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return torch.from_numpy(out)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class TokenTask(Task):
    """Shared batching for transformers models over :class:`Example` objects."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def length(self, example: Example) -> int:
        return len(example)

    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        ids = _pad([e.input_ids for e in examples], self.pad_token_id)
        labels = _pad([e.labels for e in examples], -100)
        mask = _pad([np.ones(len(e), dtype=np.int64) for e in examples], 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class CausalLMTask(TokenTask):
    """Causal LM: log p(token_t | tokens_<t) at every label position.

    The LM head runs only on the hidden states of positions that predict a label, so a
    long prompt with a short answer costs little more than its transformer pass; it runs
    on at most ``head_chunk`` label positions at a time (default 256), so the
    vocabulary-sized logits never take more than ``head_chunk x vocab`` floats whatever
    the batch (0 or None: all label positions at once).
    """

    def __init__(self, pad_token_id: int, head_chunk: int | None = 256) -> None:
        super().__init__(pad_token_id)
        self.head_chunk = int(head_chunk) if head_chunk else 0

    def label_logprobs(self, model, batch):
        labels = batch["labels"]
        target = labels[:, 1:]
        sel = target != -100
        base = unwrap(model)
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if decoder is not None and head is not None:
            hidden = decoder(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
            h = hidden[:, :-1][sel]
            del hidden
            tgt = target[sel]
            step = self.head_chunk or max(1, len(h))
            apply = _cast_once(head, h.device.type)
            parts = [
                _label_logp(apply(h[s : s + step]), tgt[s : s + step])
                for s in range(0, len(h), step)
            ]
            logp = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
        else:  # generic fallback: full logits
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logp = _label_logp(out.logits[:, :-1][sel], target[sel])
        row = torch.nonzero(sel, as_tuple=True)[0]
        return logp, row


def _cast_once(head: torch.nn.Module, device_type: str):
    """``head`` as a function; under autocast, a plain ``nn.Linear`` head's weight is cast
    to the autocast dtype once per batch instead of once per chunk (same values: autocast
    would cast it identically on every call)."""
    w = getattr(head, "weight", None)
    if (
        type(head) is torch.nn.Linear
        and head.bias is None
        and torch.is_autocast_enabled(device_type)
        and w is not None
        and w.dtype == torch.float32
    ):
        dtype = torch.get_autocast_dtype(device_type)
        wc = w.to(dtype)
        return lambda x: F.linear(x.to(dtype), wc)
    return head


def _label_logp(logits: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """log-softmax of ``logits`` (in fp32) at the ``tgt`` column of each row."""
    return torch.log_softmax(logits.float(), dim=-1).gather(1, tgt[:, None]).squeeze(1)


class TokenClassificationTask(TokenTask):
    """Token classifier: log p(tag | sentence) at every labelled (first sub-)token."""

    def label_logprobs(self, model, batch):
        labels = batch["labels"]
        sel = labels != -100
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[sel].float()
        logp = F.log_softmax(logits, dim=-1).gather(1, labels[sel][:, None]).squeeze(1)
        row = torch.nonzero(sel, as_tuple=True)[0]
        return logp, row


def task_for(bundle_task: str, tokenizer: Any) -> Task:
    """The :class:`Task` for ``"lm"`` or ``"ner"`` with this tokenizer's padding."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = 0
    if bundle_task == "lm":
        return CausalLMTask(pad)
    if bundle_task == "ner":
        return TokenClassificationTask(pad)
    raise ValueError(f"unknown task {bundle_task!r}")
