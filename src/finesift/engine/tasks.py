"""A kind of task: which records it takes, how they are encoded, which model class it
loads, how a batch becomes log-probs of its label tokens, and what it measures besides
the loss.

A :class:`Task` is the one place that knows the model family. Methods and the training
loop only see ``label_logprobs``: a flat tensor with the log-probability the model gives
each label token, and for each entry the row of the batch it belongs to. The pipeline,
the loader and the evaluation harness ask the task's class (``TASKS[name]``) everything
else, so a new kind of task (say sequence classification) is one new subclass
registered with :func:`register_task`. Users plug in another model family by
subclassing :class:`Task` (tests do so for logistic regression).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from finesift.data.records import Example


class Task(ABC):
    """Model-family specific batching and label log-probs, and (class-level) what the
    pipeline needs to know of the kind of task before a model exists.

    Class attributes:
        name: the ``--task`` value (``lm``, ``ner``); ``custom`` for a user's own task.
        default_model: the built-in model used when none is given.
        model_kind: what a model of this task is, for error messages.
        trains_head: the task's model has a classification head that fine-tuning trains
            in full (and ``head_lr`` applies to).
    """

    name: ClassVar[str] = "custom"
    default_model: ClassVar[str | None] = None
    model_kind: ClassVar[str] = "a model"
    trains_head: ClassVar[bool] = False

    # -- records, before any model ------------------------------------------------------
    @classmethod
    def accepts(cls, record: Any) -> bool:
        """Whether this task can use ``record`` (by its shape)."""
        return True

    @classmethod
    def wrong_record(cls, record: Any) -> str:
        """Why ``record`` cannot be used (for the error naming it)."""
        return f"a {record.shape} record cannot be used with --task {cls.name}"

    @classmethod
    def label_names(cls, pretrained: dict[str, int] | None,
                    record_lists: Sequence[Sequence[Any]]) -> list[str] | None:
        """The classification head's label names in id order: a trained head's own
        (``pretrained``, label -> id), else those of the records (``None``: the task has
        no head)."""
        return None

    @classmethod
    def encode(cls, records: Sequence[Any], tokenizer: Any, *, max_length: int | None,
               label2id: dict[str, int] | None = None, template: str = "auto"):
        """``(examples, report)``: the records as :class:`Example` objects."""
        raise NotImplementedError(f"task {cls.name!r} does not encode records")

    # -- models ---------------------------------------------------------------------------
    @classmethod
    def load_pretrained(cls, path: Any, *, labels: list[str] | None, seed: int,
                        info: dict[str, Any], dtype: torch.dtype = torch.float32
                        ) -> tuple[Any, bool]:
        """``(model, new_head)``: the transformers model for this task from ``path``, its
        weights in ``dtype`` (a subclass whose method takes no ``dtype`` gets its model
        cast afterwards by :func:`finesift.models.loader.load_model`)."""
        raise NotImplementedError(f"task {cls.name!r} does not load models")

    @classmethod
    def lora_config(cls, model: Any, targets: Any, factored: bool) -> tuple[Any, dict[str, Any]]:
        """``(target_modules, extra LoraConfig keywords)`` for a LoRA adapter."""
        return targets, {}

    @classmethod
    def tiny_model(cls, words: Sequence[str]) -> tuple[Any, Any]:
        """``(model, tokenizer)``: a tiny random model of this task's family whose
        vocabulary holds ``words`` (for smoke runs such as ``finesift bench --quick``)."""
        raise NotImplementedError(f"task {cls.name!r} has no tiny model")

    # -- evaluation -----------------------------------------------------------------------
    def quality(self, model: Any, tokenizer: Any, examples: Sequence[Any],
                records: Sequence[Any], *, labels: list[str], options: Any,
                em_records: Sequence[Any]) -> dict[str, Any]:
        """Figures measured besides the loss (``{"f1": ...}``, ``{"em": ...}``)."""
        return {}

    @classmethod
    def exact_match_records(cls, records: Sequence[Any], n: int, seed: int) -> list[Any]:
        """The test records whose generated answers are scored by exact match."""
        return []

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

    name = "lm"
    default_model = "smollm2-135m"
    model_kind = "a causal LM"

    @classmethod
    def accepts(cls, record: Any) -> bool:
        return record.shape != "ner"

    @classmethod
    def wrong_record(cls, record: Any) -> str:
        return "an NER record (tokens + tags) in a --task lm run; use --task ner"

    @classmethod
    def encode(cls, records, tokenizer, *, max_length, label2id=None, template="auto"):
        from finesift.data.encode import encode_lm

        return encode_lm(records, tokenizer, max_length, template=template)

    @classmethod
    def load_pretrained(cls, path, *, labels, seed, info, dtype=torch.float32):
        from transformers import AutoModelForCausalLM

        from finesift.errors import loading

        with loading(path, "model"):
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, trust_remote_code=False, use_safetensors=True)
        return model, False

    @classmethod
    def lora_config(cls, model, targets, factored):
        return targets, {"task_type": "CAUSAL_LM"}

    @classmethod
    def tiny_model(cls, words):
        from finesift.testing import tiny_causal_lm, tiny_tokenizer

        tok = tiny_tokenizer(list(words))
        return tiny_causal_lm(len(tok)), tok

    @classmethod
    def exact_match_records(cls, records, n, seed):
        from finesift.engine.metrics import em_candidates

        return em_candidates(records, n, seed)

    def quality(self, model, tokenizer, examples, records, *, labels, options, em_records):
        from finesift.engine.metrics import exact_match

        if not em_records:
            return {}
        return {"em": exact_match(model, tokenizer, em_records,
                                  max_new_tokens=options.max_new_tokens,
                                  precision=options.precision)}

    @staticmethod
    def _at_labels(model, batch):
        """``(h, head, targets, row)`` at every position that predicts a label: ``h`` the
        decoder's last hidden state there and ``head`` the LM head, so the head runs only
        on those positions; for a model without that split, ``h`` the logits there and
        ``head`` ``None``."""
        target = batch["labels"][:, 1:]
        sel = target != -100
        row = torch.nonzero(sel, as_tuple=True)[0]
        base = unwrap(model)
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if decoder is not None and head is not None:
            hidden = decoder(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
            return hidden[:, :-1][sel], head, target[sel], row
        # generic fallback: full logits
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits[:, :-1][sel], None, target[sel], row

    @classmethod
    def label_logits(cls, model, batch):
        """``(logits, targets, row)`` at every label position, the LM head run only on
        the positions that predict a label (for methods that need the logits
        themselves, e.g. IProX's alignment)."""
        h, head, tgt, row = cls._at_labels(model, batch)
        logits = h if head is None else head(h)
        return logits.float(), tgt, row

    def label_logprobs(self, model, batch):
        h, head, tgt, row = self._at_labels(model, batch)
        if head is None:
            return _label_logp(h, tgt), row
        step = self.head_chunk or max(1, len(h))
        apply = _cast_once(head, h.device.type)
        parts = [
            _label_logp(apply(h[s : s + step]), tgt[s : s + step])
            for s in range(0, len(h), step)
        ]
        logp = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
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

    name = "ner"
    default_model = "minilm-l6"
    model_kind = "an encoder"
    trains_head = True
    #: a token classifier's head: ``classifier`` (BERT-like) or ``score`` (decoder models)
    HEADS = ("classifier", "score")

    @classmethod
    def accepts(cls, record: Any) -> bool:
        return record.shape == "ner"

    @classmethod
    def wrong_record(cls, record: Any) -> str:
        return f"--task ner needs records with 'tokens' and 'tags', found a {record.shape} record"

    @classmethod
    def label_names(cls, pretrained, record_lists):
        from finesift.data.encode import build_label_map

        label2id = pretrained or build_label_map(record_lists)
        return [lab for lab, _ in sorted(label2id.items(), key=lambda kv: kv[1])]

    @classmethod
    def encode(cls, records, tokenizer, *, max_length, label2id=None, template="auto"):
        from finesift.data.encode import encode_ner

        return encode_ner(records, tokenizer, label2id or {}, max_length)

    @classmethod
    def load_pretrained(cls, path, *, labels, seed, info, dtype=torch.float32):
        from transformers import AutoConfig, AutoModelForTokenClassification

        from finesift.data.encode import model_label_map
        from finesift.errors import OptionError, loading

        with loading(path, "model config"):
            cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        own = model_label_map(cfg)
        if own is not None and getattr(cfg, "architectures", None) and any(
            a.endswith("ForTokenClassification") for a in cfg.architectures
        ):
            with loading(path, "model"):
                model = AutoModelForTokenClassification.from_pretrained(
                    str(path), trust_remote_code=False, use_safetensors=True, dtype=dtype)
            info["head"] = "pretrained"
            return model, False
        if not labels:
            raise OptionError("a new token-classification head needs the label names")
        torch.manual_seed(seed)
        with loading(path, "model"):
            model = AutoModelForTokenClassification.from_pretrained(
                str(path), num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={lab: i for i, lab in enumerate(labels)},
                trust_remote_code=False, use_safetensors=True, dtype=dtype)
        info["head"] = f"new ({len(labels)} labels, seed {seed})"
        return model, True

    @classmethod
    def lora_config(cls, model, targets, factored):
        kwargs: dict[str, Any] = {"task_type": "TOKEN_CLS"}
        # the head is trained in full, so it must not also receive a LoRA adapter
        head = next((h for h in cls.HEADS if hasattr(model, h)), None)
        if head:
            kwargs["modules_to_save"] = [head]
            if targets == "all-linear" and not factored:
                targets = sorted({
                    name.rsplit(".", 1)[-1]
                    for name, mod in model.named_modules()
                    if isinstance(mod, torch.nn.Linear) and not name.startswith(head)
                })
        return targets, kwargs

    @classmethod
    def tiny_model(cls, words):
        from finesift.testing import tiny_encoder

        return tiny_encoder(list(words))

    def quality(self, model, tokenizer, examples, records, *, labels, options, em_records):
        from finesift.engine.metrics import entity_f1, ner_predictions

        return {"f1": entity_f1(*ner_predictions(model, self, examples, labels,
                                                 batch_size=options.eval_batch_size))}

    @classmethod
    def label_logits(cls, model, batch):
        """``(logits, targets, row)`` at every labelled token."""
        labels = batch["labels"]
        sel = labels != -100
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits[sel].float(), labels[sel], torch.nonzero(sel, as_tuple=True)[0]

    def label_logprobs(self, model, batch):
        logits, tgt, row = self.label_logits(model, batch)
        return _label_logp(logits, tgt), row


TASKS: dict[str, type[TokenTask]] = {}
"""The kinds of task ``--task`` names, by name (:func:`register_task` adds one)."""


def register_task(cls: type[TokenTask]) -> type[TokenTask]:
    """Class decorator: make ``cls`` available as ``--task cls.name``."""
    TASKS[cls.name] = cls
    return cls


register_task(CausalLMTask)
register_task(TokenClassificationTask)


def task_class(task: str | Task | type[Task]) -> type[Task]:
    """The task class for a ``--task`` name, a :class:`Task` object or a Task class.

    Raises:
        OptionError: an unknown name (naming the known ones).
    """
    if isinstance(task, Task):
        return type(task)
    if isinstance(task, type) and issubclass(task, Task):
        return task
    if task not in TASKS:
        from finesift.errors import OptionError

        names = list(TASKS)
        known = " or ".join(f"'{n}'" for n in names) if len(names) <= 2 else ", ".join(names)
        raise OptionError(f"--task must be {known}, got {task!r}")
    return TASKS[task]


def task_for(bundle_task: str | Task | type[Task], tokenizer: Any) -> Task:
    """The :class:`Task` for a task name (``"lm"``, ``"ner"``) or class with this
    tokenizer's padding; a :class:`Task` object is returned as it is."""
    if isinstance(bundle_task, Task):
        return bundle_task
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = 0
    return task_class(bundle_task)(pad)
