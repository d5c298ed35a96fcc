"""What a fine-tuned model is measured by besides its loss: entity F1 of a token
classifier (seqeval) and exact match of a generated GSM8K-style final answer."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from finesift.data.records import Example, Record


def ner_predictions(model: Any, task_obj: Any, examples: Sequence[Example], id2label: list[str],
                    *, batch_size: int = 16) -> tuple[list[list[str]], list[list[str]]]:
    """Gold and argmax tag sequences at each word's first sub-token (no grad; on the
    model's device)."""
    import torch

    from finesift.engine.batching import sorted_batches

    device = _device_of(model)
    gold: list[list[str]] = [[] for _ in examples]
    pred: list[list[str]] = [[] for _ in examples]
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for idx in sorted_batches(examples, [len(e) for e in examples], batch_size=batch_size):
            batch = task_obj.collate([examples[i] for i in idx])
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            best = logits.argmax(-1).cpu().numpy()
            labels = batch["labels"].numpy()
            for j, i in enumerate(idx):
                keep = labels[j] != -100
                gold[i] = [id2label[t] for t in labels[j][keep]]
                pred[i] = [id2label[t] for t in best[j][keep]]
    if was_training:
        model.train()
    return gold, pred


def _device_of(model: Any) -> Any:
    """The device of ``model``'s first parameter (cpu for a model without any)."""
    import torch

    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def entity_f1(gold: list[list[str]], pred: list[list[str]]) -> float:
    """Entity-level micro F1 (seqeval, conlleval rules; BIO tags; plain tags = one-word
    entities)."""
    from seqeval.metrics import f1_score

    def bio(seq: list[str]) -> list[str]:
        return [t if t == "O" or t[:2] in ("B-", "I-", "E-", "S-") else f"B-{t}" for t in seq]

    return float(f1_score([bio(s) for s in gold], [bio(s) for s in pred], zero_division=0))


# --------------------------------------------------------------------------- exact match

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _clean_number(text: str) -> str | None:
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def gold_answer(completion: str | None) -> str | None:
    """The number after ``####`` in a GSM8K-style answer, normalised, else ``None``."""
    if not completion or "####" not in completion:
        return None
    m = _NUM.search(completion.rsplit("####", 1)[1])
    return _clean_number(m.group(0)) if m else None


def predicted_answer(generated: str) -> str | None:
    """The model's final answer: the number after its last ``####``, else its last number."""
    tail = generated.rsplit("####", 1)[1] if "####" in generated else generated
    nums = _NUM.findall(tail) if "####" in generated else _NUM.findall(generated)
    if not nums:
        return None
    return _clean_number(nums[0] if "####" in generated else nums[-1])


def _prompt_ids(record: Record, tokenizer: Any) -> list[int]:
    if record.messages:  # everything before the last assistant reply
        last = max((i for i, m in enumerate(record.messages) if m.get("role") == "assistant"),
                   default=len(record.messages))
        msgs = record.messages[:last]
    else:
        msgs = [{"role": "user", "content": record.prompt or ""}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    else:
        text = "\n".join(m["content"] for m in msgs) + "\n"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _answer_text(record: Record) -> str | None:
    if record.completion is not None:
        return record.completion
    if record.messages:
        replies = [m["content"] for m in record.messages if m.get("role") == "assistant"]
        return replies[-1] if replies else None
    return None


def em_candidates(records: Sequence[Record], n: int, seed: int) -> list[Record]:
    """Up to ``n`` records with a ``#### <number>`` answer, a seeded random subsample."""
    usable = [r for r in records if r.shape != "ner" and gold_answer(_answer_text(r))]
    if n <= 0 or not usable:
        return []
    rng = np.random.default_rng([seed, 0xE4])
    pick = np.sort(rng.choice(len(usable), size=min(n, len(usable)), replace=False))
    return [usable[i] for i in pick]


def exact_match(model: Any, tokenizer: Any, records: Sequence[Record], *,
                max_new_tokens: int = 256, precision: str = "auto") -> float | None:
    """Share of ``records`` whose greedy generation ends in the gold final answer
    (generated on the model's device)."""
    import torch

    from finesift.engine.precision import autocast

    device = _device_of(model)
    if not records:
        return None
    hits = 0
    model.eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    for rec in records:
        ids = torch.tensor([_prompt_ids(rec, tokenizer)], device=device)
        with torch.inference_mode(), autocast(precision, device.type):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=pad)
        text = tokenizer.decode(out[0, ids.shape[1]:].cpu(), skip_special_tokens=True)
        hits += int(predicted_answer(text) == gold_answer(_answer_text(rec)))
    return hits / len(records)
