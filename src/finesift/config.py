"""The one typed configuration: every option of a run, of a method, of LoRA and of
fine-tuning is a dataclass field with a type, a default and a help string.

Everything that takes options reads them through this module:

* ``-o KEY=VALUE`` on the command line, a method's mapping in a benchmark YAML and
  ``method_options={...}`` in the API become a method's ``Options`` through
  :func:`from_mapping` (one conversion, one set of error messages);
* ``finesift select``'s flags are generated from :class:`RunConfig` (see
  :func:`add_arguments`), ``finesift select --config run.yaml`` reads the same class, and
  every run folder gets a ``config.yaml`` that runs again to the same selection;
* ``finesift methods NAME`` prints :func:`describe`'s help of each option.

A field is declared with :func:`option`::

    @dataclass
    class MyOptions:
        rounds: int = option(3, "how many rounds", minimum=1)
        mode: str = option("fast", "which variant", choices=("fast", "exact"))
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finesift.errors import OptionError, check_choice  # noqa: F401 (check_choice: re-exported)
from finesift.select.strategies import STRATEGIES

HELP = "help"
CHOICES = "choices"
MINIMUM = "minimum"
FLAG = "flag"
CLI = "cli"
UNBOUNDED = "unbounded"


def option(default: Any = MISSING, help: str = "", *, choices: Sequence[Any] | None = None,
           minimum: float | None = None, factory: Callable[[], Any] | None = None,
           flag: str | None = None, cli: bool = True, unbounded: bool = False) -> Any:
    """A dataclass field with its help.

    Args:
        default: the default value (use ``factory`` for a list or dict).
        help: one or a few sentences: what the option does and what its values mean.
        choices: the allowed values (checked by :func:`from_mapping`).
        minimum: the smallest allowed number (checked by :func:`from_mapping`).
        factory: builds a mutable default.
        flag: the command-line flag, when it is not ``--`` plus the dashed name.
        cli: ``False``: not a command-line flag (the CLI passes it another way).
        unbounded: an integer option that takes integers of any size (else at most 19
            digits), for an owner that checks the range itself (the run's ``seed``).
    """
    meta = {HELP: " ".join(help.split()), CHOICES: tuple(choices) if choices else None,
            MINIMUM: minimum, FLAG: flag, CLI: cli, UNBOUNDED: unbounded}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionInfo:
    """One option, as :func:`describe` reports it."""

    name: str
    type: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    flag: str | None = None
    cli: bool = True
    unbounded: bool = False

    @property
    def required(self) -> bool:
        return self.default is MISSING

    def line(self, width: int = 0) -> str:
        """``name = default  (type; one of ...)`` for listings."""
        default = "(required)" if self.required else repr(self.default)
        extra = f"one of {', '.join(map(str, self.choices))}" if self.choices else self.type
        return f"{self.name:{width}s} = {default}  ({extra})"


def _type_name(tp: Any) -> str:
    if isinstance(tp, str):
        return tp
    if typing.get_origin(tp) is None and getattr(tp, "__name__", None):
        return tp.__name__
    return str(tp).replace("typing.", "")


def docstring_help(cls: type) -> dict[str, str]:
    """The entries of the ``Attributes:`` sections of ``cls``'s docstring and its bases'
    (Google style: ``name: text``, continued on deeper-indented lines; ``a, b: text``
    documents several fields at once), by field name."""
    import inspect

    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = inspect.getdoc(klass) if "__doc__" in vars(klass) else None
        if not doc:
            continue
        lines = doc.splitlines()
        try:
            start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
        except StopIteration:
            continue
        names: list[str] = []
        text: list[str] = []
        indent = None

        def flush(names: list[str], text: list[str]) -> None:
            for name in names:
                out[name] = " ".join(" ".join(text).split())

        for line in lines[start + 1:]:
            if not line.strip():
                continue
            depth = len(line) - len(line.lstrip())
            if indent is None:
                indent = depth
            if depth < indent:
                break
            head, sep, rest = line.strip().partition(":")
            if depth == indent and sep and all(
                    n.strip().isidentifier() for n in head.split(",")):
                flush(names, text)
                names = [n.strip() for n in head.split(",")]
                text = [rest.strip()]
            elif depth > indent:
                text.append(line.strip())
            else:
                break
        flush(names, text)
    return out


def plain_text(text: str) -> str:
    """Help as a terminal shows it: reStructuredText roles (``:class:`~a.B```) and
    literals (````x````) reduced to their text."""
    import re

    text = re.sub(r":[a-z]+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1]
                  if m.group(0).count("~") else m.group(1), text)
    return text.replace("``", "")


def describe(cls: type) -> list[OptionInfo]:
    """Every field of an options dataclass with its type, default and help (the field's
    :func:`option` help, else its entry in the class docstring's ``Attributes:``)."""
    if not dataclasses.is_dataclass(cls):
        return []
    hints = _hints(cls)
    documented = docstring_help(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = MISSING
        meta = f.metadata
        out.append(OptionInfo(
            name=f.name, type=_type_name(hints.get(f.name, f.type)), default=default,
            help=plain_text(meta.get(HELP) or documented.get(f.name, "")), choices=meta.get(CHOICES), minimum=meta.get(MINIMUM),
            flag=meta.get(FLAG), cli=meta.get(CLI, True), unbounded=meta.get(UNBOUNDED, False)))
    return out


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that does not evaluate: keep the strings
        return {f.name: f.type for f in dataclasses.fields(cls)}


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def number(value: Any) -> int | float | None:
    """An int or float from a number or numeric string (never from a bool), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            return None
    return None


def convert(value: Any, default: Any, *, shown: str, unbounded: bool = False) -> Any:
    """``value`` as the type of ``default``; a clear :class:`OptionError` (prefixed with
    ``shown``, e.g. ``method 'tov': option rounds='x'``) for a value of another kind.

    Counts take integers and integral numbers (``1e4``) of at most 19 digits (any size if
    ``unbounded``); numbers take any finite number
    (an infinity only where the default is one); flags take true/false, yes/no, on/off,
    1/0. Other values (strings, ``None``-defaulted options) are passed on as given for the
    owner's ``validate`` to check.
    """
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise OptionError(f"{shown}: expected true or false")
    if isinstance(default, int):
        num = number(value)
        if num is None:
            raise OptionError(f"{shown} is not a number")
        if isinstance(num, float):
            if not math.isfinite(num) or num != int(num):
                raise OptionError(f"{shown}: expected an integer")
            num = int(num)
        if abs(num) >= 2**63 and not unbounded:
            raise OptionError(f"{shown}: expected an integer of at most 19 digits")
        return num
    if isinstance(default, float):
        num = number(value)
        if num is None:
            raise OptionError(f"{shown} is not a number")
        try:
            num = float(num)
        except OverflowError:
            num = math.inf
        if not math.isfinite(num) and math.isfinite(default):
            raise OptionError(f"{shown}: expected a finite number")
        return num
    return value


_SAMPLES = {"int": 0, "float": 0.0, "bool": False}


def convert_field(info: OptionInfo, value: Any, *, shown: str) -> Any:
    """:func:`convert` for one declared field: by its default's type, or, for an option
    whose default is ``None`` (``int | None``, ...), by its declared type; ``None`` stays
    ``None`` where the type allows it, and a union with ``str`` (``int | str``) is passed
    on for the owner's ``validate`` to check."""
    parts = [p.strip() for p in info.type.split("|")]
    if value is None and "None" in parts:
        return None
    if "str" in parts and len(parts) > 1:
        return value
    if info.default is not None and info.default is not MISSING:
        return convert(value, info.default, shown=shown, unbounded=info.unbounded)
    typed = [p for p in parts if p != "None"]
    if len(typed) == 1 and typed[0] in _SAMPLES:
        return convert(value, _SAMPLES[typed[0]], shown=shown, unbounded=info.unbounded)
    return value


def check_declared(obj: Any, *, shown: Callable[[str, Any], str],
                   below: Callable[[str, Any, float], str] | None = None) -> None:
    """Check the ``choices`` and ``minimum`` declared on ``obj``'s fields (``below``: see
    :func:`from_mapping`)."""
    for info in describe(type(obj)):
        value = getattr(obj, info.name)
        if info.choices is not None and value not in info.choices:
            raise OptionError(f"{shown(info.name, value)}: expected one of "
                              f"{', '.join(map(str, info.choices))}")
        if (info.minimum is not None and isinstance(value, (int, float))
                and not isinstance(value, bool) and value < info.minimum):
            raise OptionError(below(info.name, value, info.minimum) if below else
                              f"{shown(info.name, value)}: expected at least {info.minimum:g}")


def _whole(info: OptionInfo) -> bool:
    """Whether ``info`` is a count (``int`` or ``int | None``)."""
    parts = {p.strip() for p in info.type.split("|")} - {"None"}
    return parts == {"int"}


def from_mapping(cls: type, values: Mapping[str, Any] | None, *,
                 shown: Callable[[str, Any], str],
                 unknown: Callable[[list[str], list[str]], str],
                 not_integer: Callable[[str, Any], str] | None = None,
                 below: Callable[[str, Any, float], str] | None = None) -> Any:
    """Build the dataclass ``cls`` from a mapping: unknown keys, badly typed values and
    values outside the declared choices or minimum are :class:`OptionError` s; then the
    instance's own ``validate()`` (if any) runs.

    Args:
        cls: an options dataclass whose fields all have defaults.
        values: the given options (from ``-o``, a YAML file or the API).
        shown: ``(key, value) -> text`` naming a bad option in an error message.
        unknown: ``(unknown keys, known keys) -> message`` for misspelt keys.
        not_integer: ``(key, value) -> message`` for a count given anything but a whole
            number (default: :func:`convert`'s messages, after ``shown``).
        below: ``(key, value, minimum) -> message`` for a number under its declared
            minimum (default: ``shown``, then ``: expected at least MINIMUM``).
    """
    values = dict(values or {})
    known = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]
    bad = sorted(set(values) - set(known))
    if bad:
        raise OptionError(unknown(bad, known))
    infos = {i.name: i for i in describe(cls)}
    converted = {}
    for k, v in values.items():
        try:
            converted[k] = convert_field(infos[k], v, shown=shown(k, v))
        except OptionError:
            if not_integer is None or not _whole(infos[k]):
                raise
            raise OptionError(not_integer(k, v)) from None
    obj = cls(**converted)
    check_declared(obj, shown=shown, below=below)
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


def to_plain(obj: Any) -> Any:
    """A dataclass (or mapping/list of them) as plain JSON/YAML-able values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.name.startswith("_")}
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# --- LoRA: declared once, shared by every method that trains an adapter -----------------

@dataclass
class LoraFields:
    """The LoRA adapter options of a method that fine-tunes (``tov``, ``less``, ``harp``).
    A method's options dataclass inherits them, so ``-o lora_rank=8`` means the same
    everywhere."""

    lora_rank: int = option(16, "LoRA adapter rank r", minimum=1)
    lora_alpha: int = option(32, "LoRA scaling numerator: the adapter update is scaled by "
                                 "lora_alpha / lora_rank", minimum=1)
    lora_dropout: float = option(0.05, "dropout on the adapter input during training",
                                 minimum=0.0)

    def lora(self) -> Any:
        """These fields as :class:`finesift.engine.train.LoraOptions`."""
        from finesift.engine.train import LoraOptions

        return LoraOptions(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout)


# --- fine-tuning: declared once, shared by the evaluation and auto's trials --------------

@dataclass
class FinetuneFields:
    """The fields of a fine-tune on a selected subset, shared by
    :class:`~finesift.evaluate.finetune.FinetuneOptions` (``finesift eval``, a benchmark's
    ``finetune:``) and ``--method auto``'s trial fine-tunes (which give some of them other
    defaults). The adapter is LoRA of rank ``lora_rank`` with alpha = 2 r, dropout 0.05, on
    every linear layer (:meth:`lora`), or none for full fine-tuning.

    Attributes:
        steps: if set, train for exactly this many optimiser steps instead, cycling over
            the subset as often as needed (``epochs`` is then ignored). Subsets of different
            sizes then get the same amount of training, which is fairer to methods that
            select fewer examples than the budget (HARP).
        lr: AdamW learning rate (default 2e-4).
        lora_rank: LoRA rank r; alpha = 2 r, dropout 0.05, all linear layers (default 16).
            ``0`` means full fine-tuning instead: no adapter, every parameter of the model
            (embeddings, encoder / decoder blocks, head) is trained, at ``lr``. Full
            fine-tuning wants a far smaller ``lr`` than LoRA (5e-5 to 1e-4 for a BERT-size
            encoder, against 5e-4 for its adapter).
        batch_size: examples per optimiser step (default 8).
        max_length: truncate examples to this many tokens (default 256).
    """

    steps: int | None = option(None, minimum=1)
    lr: float = 2e-4
    lora_rank: int = option(16, minimum=0)
    batch_size: int = option(8, minimum=1)
    max_length: int | None = option(256, minimum=1)

    @property
    def full(self) -> bool:
        """Full fine-tuning (``lora_rank == 0``) rather than a LoRA adapter."""
        return self.lora_rank == 0

    def lora(self) -> Any:
        """The adapter as :class:`finesift.engine.train.LoraOptions` (``None`` for full
        fine-tuning): rank ``lora_rank``, alpha 2 r, dropout 0.05, all linear layers."""
        from finesift.engine.train import LoraOptions

        return None if self.full else LoraOptions(rank=self.lora_rank, alpha=2 * self.lora_rank)


# --- the run: what `finesift select` and `finesift.select()` take -----------------------

FORMATS = ("jsonl", "json", "csv", "parquet", "hf", "conll")


@dataclass
class RunConfig:
    """One selection run: every keyword of :func:`finesift.select` and every flag of
    ``finesift select`` (generated from these fields), and the ``config.yaml`` each run
    writes to its output folder (``finesift select --config`` runs it again)."""

    pool: list[str] = option(factory=list, help="pool file(s): JSONL, JSON, CSV, Parquet, a "
                             "datasets folder or CoNLL")
    target: list[str] = option(factory=list, help="file(s) with examples of the task you care "
                               "about")
    budget: str | None = option(None, "how many to select: a count (500) or a share of the "
                                "pool (10%); required unless --shard-index")
    method: str = option("tov", "selection method (see `finesift methods`), or auto: try "
                         "candidate methods on folds of the target and select with the best")
    method_options: dict[str, Any] = option(
        factory=dict, cli=False,
        help="the method's options (-o KEY=VALUE on the command line; `finesift methods "
             "NAME` lists them)")
    task: str = option("lm", "lm: causal LM on chat/prompt-completion/text records; ner: "
                       "token tags", choices=("lm", "ner"))
    model: str | None = option(None, "built-in model (smollm2-135m, minilm-l6) or a local "
                               "model folder (default per task)")
    strategy: str = option("top", "how scores become a subset", choices=STRATEGIES)
    seed: int = option(0, "seeds everything random; the same inputs and seed give the same "
                       "selection", unbounded=True)  # select checks the range (0 .. 2**32 - 1)
    out: str | None = option(None, "output folder: scores.parquet, selected.jsonl, "
                             "manifest.json, config.yaml")
    fmt: str | None = option(None, "input format (default: from the file extension)",
                             choices=(None, *FORMATS), flag="--format")
    max_length: int | None = option(512, "truncate examples to this many tokens")
    template: str = option("auto", "how chat and prompt/completion records are rendered: "
                           "auto (the tokenizer's chat template if it has one), chat, plain",
                           choices=("auto", "chat", "plain"))
    precision: str = option("auto", "autocast of fp32 weights: auto (bf16 matmuls where the "
                            "device is fast at them), bf16 or fp32; saves time, not memory",
                            choices=("auto", "bf16", "fp32"))
    dtype: str = option("fp32", "the dtype the model's weights are loaded in: fp32 "
                        "(default), bf16 or fp16 (half the memory: a 7B model takes 14 GB "
                        "instead of 28; everything then computes in that dtype, so "
                        "--precision no longer applies), or auto (bf16 where the device "
                        "computes it natively, i.e. CUDA GPUs from Ampere on and CPUs with "
                        "AVX512-BF16/AMX, unless the method needs fp32, e.g. tov's fp32 "
                        "scoring passes; else fp32). fp16 is refused for methods that train "
                        "or take gradients (tov, less, tracin, harp)",
                        choices=("fp32", "bf16", "fp16", "auto"))
    batch_size: int | str = option(8, "rows per scoring batch (default 8); 'auto' fills 1 GiB "
                                   "of activations per batch (more rows for short examples), "
                                   "'auto:4GiB' another limit")
    device: str = option("cpu", "torch device of this process: cpu (default), cuda, cuda:1, "
                         "... (Ray GPU workers always use their own GPU)")
    workdir: str | None = option(None, "folder for resumable intermediate state (default "
                                 "OUT/.work)")
    num_shards: int = option(1, "split the pool into N shards (with --shard-index)")
    shard_index: int | None = option(None, "score only shard I (0..N-1) and write its scores "
                                     "for finesift merge; chunk c of the length-sorted chunk "
                                     "grid belongs to shard c % N")
    executor: str = option("local", "where the pool is scored: this process (local) or Ray "
                           "workers (ray)", choices=("local", "ray"))
    ray_address: str | None = option(None, "Ray cluster to join (default: start a local Ray "
                                     "instance)")
    ray_options: dict[str, Any] = option(
        factory=dict, cli=False,
        help="num_cpus (local instance), workers, cpus_per_worker, gpus_per_worker "
             "(--ray-num-cpus, ... on the command line)")
    dedup: bool = option(False, "keep only the first (in pool order) of each group of exact or "
                         "near-duplicate pool examples, before scoring; the manifest "
                         "counts the groups either way")
    dedup_threshold: float = option(0.8, "Jaccard similarity of character 5-gram sets from "
                                    "which two texts are near duplicates, from 0.5 to 1 (also "
                                    "for the target-in-pool contamination warning); exact "
                                    "duplicates always count")
    source_weights: dict[str, float] = option(
        factory=dict, help="--strategy balanced: shares proportional to per-source weights, "
        "e.g. sharegpt=1,gsm8k=3 (a source is named by its path, file name or file name "
        "without extension; unnamed sources weigh 1)")
    columns: dict[str, str] = option(
        factory=dict, help="read your columns as finesift's record fields, e.g. "
        "prompt=query,completion=answer (fields: text, prompt, completion, messages, "
        "conversations, tokens, tags, id, ...); an input that has a field itself needs no "
        "mapping for it")
    export: list[str] = option(
        factory=list, help="also write the selection ready for training: messages (TRL "
        "conversational JSONL), prompt-completion (TRL prompt/completion JSONL), datasets "
        "(a save_to_disk folder of the messages rows); selected.jsonl is written as always")
    prefilter: str | dict[str, Any] | None = option(
        None, "a cascade for a large pool and an expensive method: METHOD:SHARE, e.g. "
        "embed:20%, dsir:10% or dsir:500 (a count), with the prefilter's own options as "
        "dsir:10%,sampling=top. The cheap METHOD ranks the whole pool, the top SHARE is "
        "kept, --method scores only those and the rest rank below them in the prefilter's "
        "order (scores.parquet: prefilter_score, prefilter_kept); a SHARE that keeps fewer "
        "than the budget stops the run")

    def api_kwargs(self) -> dict[str, Any]:
        """The keywords of :func:`finesift.select` (pool and target included)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(to_plain(self), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        """Read a run's ``config.yaml``; an unknown key or a bad value names the file."""
        import yaml

        from finesift.errors import InputError

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise InputError(str(path), f"cannot read the config: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise InputError(str(path), f"not valid YAML: {e}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise InputError(str(path), "expected a mapping of run options (pool, target, "
                                        "budget, method, ...)")
        try:
            return cls.from_dict(data)
        except OptionError as e:
            raise InputError(str(path), str(e)) from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        data = dict(data)
        if "format" in data and "fmt" not in data:  # the flag's name
            data["fmt"] = data.pop("format")
        for key in ("pool", "target"):
            if isinstance(data.get(key), (str, Path)):
                data[key] = [data[key]]
        return from_mapping(
            cls, data, shown=lambda k, v: f"{k}={v!r}",
            unknown=lambda bad, known: f"unknown run option(s) {', '.join(bad)}; known: "
                                       f"{', '.join(known)}")


def add_arguments(parser: Any, cls: type, *, skip: Sequence[str] = ()) -> None:
    """Add one flag per field of ``cls`` (``--dashed-name``; lists take several values)
    with its help and choices. Every flag defaults to "not given" (``argparse.SUPPRESS``),
    so a caller can tell given flags from defaults and lay them over a config file."""
    import argparse

    for info in describe(cls):
        if not info.cli or info.name in skip:
            continue
        flag = info.flag or "--" + info.name.replace("_", "-")
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": info.name,
                                  "help": _flag_help(info)}
        if info.type.startswith("list"):
            kwargs["nargs"] = "+"
        elif info.default is not MISSING and isinstance(info.default, bool):
            kwargs["action"] = "store_true"
        elif info.type in ("int", "int | None"):
            kwargs["type"] = int
        elif info.type in ("float", "float | None"):
            kwargs["type"] = float
        if info.choices is not None and "nargs" not in kwargs and "action" not in kwargs:
            kwargs["choices"] = [c for c in info.choices if c is not None]
        parser.add_argument(flag, **kwargs)


def _flag_help(info: OptionInfo) -> str:
    text = info.help.replace("%", "%%")  # argparse formats help with %
    if info.default in (None, [], {}) or info.required or "default" in info.help:
        return text
    return f"{text} (default {info.default})"
