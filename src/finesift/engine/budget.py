"""Automatic batch size: as many rows per batch as fit a memory limit.

A forward pass over a batch of ``rows`` examples padded to ``longest`` tokens holds
(inference mode frees each layer's activations once the next layer has them)::

    bytes(rows, longest) = rows * longest * per_token          # hidden states, MLP, q/k/v
                         + rows * longest**2 * per_score       # attention scores
                         + head_bytes                          # LM head on a chunk of labels

``per_token`` counts the tensors alive inside one decoder layer in fp32 (4 bytes: bf16
autocast keeps the residual stream in fp32 and adds bf16 copies, so fp32 is an upper
bound): the residual, its normed copy, q, k, v, the attention output, the MLP's gate, up
and product, plus the final hidden states kept for the LM head. ``per_score`` counts the
attention scores and their softmax (an eager or math kernel materialises both; a fused
kernel holds less). ``head_bytes`` is fixed because the causal-LM task runs the LM head on
at most ``head_chunk`` label positions at a time (logits, their fp32 copy and log-softmax;
plus a bf16 copy of the head's weight under autocast).

:class:`TokenBudget` turns a memory limit into the largest ``rows`` for each ``longest``,
so a batch of short examples holds many more rows than a batch of long ones while peak
memory stays the same. Model weights are not part of the limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from finesift.errors import OptionError

DEFAULT_MEMORY = "1GiB"
DEFAULT_HEAD_CHUNK = 256
MAX_AUTO_ROWS = 4096

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tb": 1000**4, "tib": 1024**4,
}


def parse_bytes(value: float | str) -> int:
    """Bytes from an int or a string such as ``"512MiB"``, ``"2GB"``, ``"1.5gib"``."""
    if isinstance(value, bool):
        raise OptionError(f"memory limit must be a size such as '1GiB', got {value!r}")
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise OptionError(
                f"memory limit must be a size such as '512MiB', '2GB' or a byte count, got {value!r}"
            )
        n = float(m.group(1)) * _UNITS[unit]
    if n <= 0:
        raise OptionError(f"memory limit must be positive, got {value!r}")
    return int(n)


def parse_batch_size(value: int | str) -> tuple[int | None, int | None]:
    """``(rows, memory_bytes)`` from a batch size option.

    An int (or a string of digits) is a fixed number of rows: ``(rows, None)``.
    ``"auto"`` sizes batches to :data:`DEFAULT_MEMORY`; ``"auto:4GiB"`` to 4 GiB:
    ``(None, bytes)``.
    """
    if isinstance(value, bool):
        raise OptionError(f"batch size must be a positive integer or 'auto', got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise OptionError(f"batch size must be a positive integer or 'auto', got {value!r}")
        return value, None
    s = str(value).strip().lower()
    if s.isdigit():
        return parse_batch_size(int(s))
    if s == "auto":
        return None, parse_bytes(DEFAULT_MEMORY)
    if s.startswith("auto:"):
        return None, parse_bytes(s[5:])
    raise OptionError(
        f"batch size must be a positive integer, 'auto' or 'auto:SIZE' (e.g. auto:2GiB), got {value!r}"
    )


def _cfg(model: Any) -> Any:
    base = model
    get_base = getattr(base, "get_base_model", None)
    if callable(get_base):
        base = get_base()
    return getattr(base, "config", None), base


@dataclass(frozen=True)
class TokenBudget:
    """Rows per batch allowed by a memory limit (see the module docstring).

    Attributes:
        memory: the activation memory limit in bytes.
        per_token: bytes held per padded token.
        per_score: bytes held per attention score (per row, per ``longest**2``).
        head_bytes: fixed bytes of the LM head on one chunk of label positions.
        max_rows: never more rows than this.
    """

    memory: int
    per_token: int
    per_score: int = 0
    head_bytes: int = 0
    max_rows: int = MAX_AUTO_ROWS

    def batch_bytes(self, rows: int, longest: int) -> int:
        """Estimated peak activation bytes of a batch."""
        return rows * longest * self.per_token + rows * longest * longest * self.per_score + self.head_bytes

    def rows_for(self, longest: int) -> int:
        """The most rows of length ``longest`` that fit (at least 1: a single example
        longer than the limit still runs, alone)."""
        per_row = longest * self.per_token + longest * longest * self.per_score
        room = self.memory - self.head_bytes
        if per_row <= 0:
            return self.max_rows
        return max(1, min(self.max_rows, room // per_row))

    @classmethod
    def for_model(
        cls, model: Any, memory: int | str, *, head_chunk: int = DEFAULT_HEAD_CHUNK
    ) -> TokenBudget:
        """The budget of a transformers model (a peft wrapper is looked through).

        Reads ``hidden_size``, ``intermediate_size`` (default 4 x hidden),
        ``num_attention_heads``, ``num_key_value_heads`` and ``vocab_size`` (or
        ``num_labels`` for a classifier) from the model's config.
        """
        mem = parse_bytes(memory)
        cfg, base = _cfg(model)
        h = getattr(cfg, "hidden_size", None)
        if h is None:
            emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
            h = int(getattr(emb, "embedding_dim", 1024)) if emb is not None else 1024
        h = int(h)
        inter = int(getattr(cfg, "intermediate_size", None) or 4 * h)
        heads = int(getattr(cfg, "num_attention_heads", None) or 1)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or h // heads)
        kv = kv_heads * head_dim
        is_lm = hasattr(base, "get_output_embeddings") and base.get_output_embeddings() is not None
        if is_lm:
            vocab = int(getattr(cfg, "vocab_size", None) or 0)
            head_bytes = 4 * 3 * vocab * head_chunk + 2 * vocab * h  # + a bf16 copy of the head
            out_per_token = 0
        else:  # classifier: logits at every position, tiny
            head_bytes = 0
            out_per_token = 3 * int(getattr(cfg, "num_labels", 2) or 2)
        per_token = 4 * (7 * h + 2 * kv + 3 * inter + out_per_token)
        per_score = 4 * 2 * heads
        return cls(memory=mem, per_token=per_token, per_score=per_score, head_bytes=head_bytes)
