"""Fine-tune a fresh model on a subset and measure it on a test set.

The measure is the one the ToV paper reports and the methods optimise: the test log-loss,
i.e. the mean over test examples of each example's token-averaged negative log-likelihood
of its label tokens (:func:`finesift.engine.scoring.example_losses`, in fp32). For NER
the entity-level F1 (seqeval, from the argmax tag at each word's first sub-token) is
reported too; for causal LMs, optionally, the exact match of the final answer of
GSM8K-style records (``#### <number>``) under greedy generation.

Every call loads the model again, so no adapter or optimiser state leaks between runs,
and the same hyperparameters are used whatever chose the subset.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from finesift.config import FinetuneFields, from_mapping, option
from finesift.data.records import Example, Record
from finesift.engine.metrics import (  # noqa: F401  (importable from here as before)
    em_candidates,
    entity_f1,
    exact_match,
    gold_answer,
    ner_predictions,
    predicted_answer,
)
from finesift.errors import InputError, OptionError
from finesift.store import Stopwatch


@dataclass
class FinetuneOptions(FinetuneFields):
    """Fixed fine-tuning hyperparameters (the same for every method of a benchmark): the
    shared :class:`~finesift.config.FinetuneFields` (``steps``, ``lr``, ``lora_rank``,
    ``batch_size``, ``max_length``) and these.

    Attributes:
        epochs: passes over the training subset (default 1).
        head_lr: ner only: the learning rate of the token-classification head, LoRA or
            full (a new head starts random and wants a far larger rate than the pretrained
            encoder: ``benchmarks/ner-wnut.yaml`` uses 5e-3 with ``lora_rank: 0, lr: 1e-4``;
            with the head at the encoder's rate its taggers learnt no entity); default
            ``None`` = ``lr``. It follows the same warm-up and decay. lm ignores it.
        warmup: share of the optimiser steps over which the learning rate rises linearly
            from near 0 to ``lr`` (default 0 = none; e.g. 0.1).
        schedule: after the warm-up, ``constant`` (default) or ``linear``: decay linearly
            towards 0 at the last step.
        seed: seeds the adapter init, a new NER head and the shuffling (default 0).
        precision: training precision: ``auto`` (bf16 where the CPU is fast at it),
            ``bf16`` or ``fp32``.
        eval_precision: precision of the test-loss pass: ``fp32`` (default) or ``bf16``
            (about twice as fast on a CPU with native bf16; ``benchmarks/eval_precision.py``
            measures how far its losses move against fp32).
        eval_batch_size: rows per batch when measuring (default 16).
        em_samples: lm only: how many test records to generate answers for and score by
            exact match of the final ``#### <number>`` answer (default 0 = off).
        max_new_tokens: generation length cap for exact match (default 256).
        template: how chat and prompt/completion records are rendered, as in
            ``finesift select --template``: ``auto`` (default), ``chat`` or ``plain``.
        dtype: the dtype the model is loaded in: ``fp32`` (default), ``bf16`` (half the
            memory; LoRA adapters stay fp32) or ``auto`` (bf16 where the device computes
            it natively, else fp32; full fine-tuning, ``lora_rank=0``, always fp32: bf16
            weights lose updates below their last digit). ``fp16`` is refused: training
            in fp16 needs loss scaling, which finesift does not do.
    """

    epochs: float = 1.0
    head_lr: float | None = None
    warmup: float = 0.0
    schedule: str = option("constant", choices=("constant", "linear"))
    seed: int = 0
    precision: str = option("auto", choices=("auto", "bf16", "fp32"))
    eval_precision: str = option("fp32", choices=("fp32", "bf16"))
    eval_batch_size: int = option(16, minimum=1)
    em_samples: int = option(0, minimum=0)
    max_new_tokens: int = option(256, minimum=1)
    template: str = option("auto", choices=("auto", "chat", "plain"))
    dtype: str = option("fp32", choices=("fp32", "bf16", "auto"))

    def validate(self) -> None:
        """Raise :class:`OptionError` for an out-of-range value."""
        if not self.epochs > 0:
            raise OptionError(f"epochs must be positive, got {self.epochs!r}")
        if not self.lr > 0:
            raise OptionError(f"lr must be positive, got {self.lr!r}")
        if self.steps is not None and (isinstance(self.steps, bool)
                                       or not isinstance(self.steps, int) or self.steps < 1):
            raise OptionError(f"steps must be a positive integer, got {self.steps!r}")
        for name in ("batch_size", "eval_batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"{name} must be a positive integer, got {value!r}")
        if (isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int)
                or self.lora_rank < 0):
            raise OptionError(f"lora_rank must be a positive integer, or 0 for full "
                              f"fine-tuning, got {self.lora_rank!r}")
        if self.head_lr is not None and (isinstance(self.head_lr, bool)
                                         or not isinstance(self.head_lr, (int, float))
                                         or not self.head_lr > 0):
            raise OptionError(f"head_lr must be positive (or unset), got {self.head_lr!r}")
        if (isinstance(self.warmup, bool) or not isinstance(self.warmup, (int, float))
                or not 0 <= self.warmup < 1):
            raise OptionError(f"warmup must be a share of the steps in [0, 1), "
                              f"got {self.warmup!r}")
        if self.schedule not in ("constant", "linear"):
            raise OptionError(f"schedule must be constant or linear, got {self.schedule!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int)
                                            or self.max_length < 1):
            raise OptionError(f"max_length must be a positive integer, got {self.max_length!r}")
        if not isinstance(self.em_samples, int) or self.em_samples < 0:
            raise OptionError(f"em_samples must be >= 0, got {self.em_samples!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise OptionError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.template not in ("auto", "chat", "plain"):
            raise OptionError(f"template must be auto, chat or plain, got {self.template!r}")
        if self.eval_precision not in ("bf16", "fp32"):
            raise OptionError(f"eval_precision must be bf16 or fp32, got {self.eval_precision!r}")
        if self.dtype == "fp16":
            raise OptionError("dtype fp16: fine-tuning in fp16 needs loss scaling, which "
                              "finesift does not do; use bf16 (a GPU from Ampere on, or a CPU "
                              "with AVX512-BF16) or fp32")
        if self.dtype not in ("fp32", "bf16", "auto"):
            raise OptionError(f"dtype must be fp32, bf16 or auto, got {self.dtype!r}")
        if self.full and self.dtype == "bf16":
            raise OptionError("dtype bf16 with lora_rank 0: full fine-tuning trains the "
                              "weights themselves, and bf16 weights lose updates smaller than "
                              "their last digit; use fp32 (or auto) or a LoRA rank")

    # fields added after results folders existed, with the value that reproduces the old
    # behaviour: left out of setup_fields() at that value, so those folders still resume
    _LATER_DEFAULTS: ClassVar[dict[str, Any]] = {"steps": None, "eval_precision": "fp32",
                                                  "head_lr": None, "warmup": 0.0,
                                                  "schedule": "constant", "template": "auto",
                                                  "dtype": "fp32"}

    def setup_fields(self) -> dict[str, Any]:
        """Every field but the seed, for resume fingerprints (``steps``, ``eval_precision``,
        ``head_lr``, ``warmup``, ``schedule``, ``template`` and ``dtype`` only when not at
        their defaults, so folders written before they existed still resume)."""
        return {k: v for k, v in self.__dict__.items()
                if k != "seed" and not (k in self._LATER_DEFAULTS
                                        and v == self._LATER_DEFAULTS[k])}

    def hyperparameters(self) -> dict[str, Any]:
        """The training hyperparameters as stated in reports."""
        if self.full:
            how: dict[str, Any] = {"finetuning": "full (every parameter)", "lora_rank": 0}
        else:
            lora = self.lora()
            how = {"lora_rank": lora.rank, "lora_alpha": lora.alpha,
                   "lora_dropout": lora.dropout, "lora_targets": lora.target_modules}
        return {
            **({"steps": self.steps} if self.steps is not None else {"epochs": self.epochs}),
            "lr": self.lr,
            **({"head_lr": self.head_lr} if self.head_lr is not None else {}),
            **({"warmup": self.warmup} if self.warmup else {}),
            **({"schedule": self.schedule} if self.schedule != "constant" else {}),
            **how, "optimizer": "adamw", "batch_size": self.batch_size,
            "max_length": self.max_length, "precision": self.precision,
            "eval_precision": self.eval_precision,
            **({"template": self.template} if self.template != "auto" else {}),
            **({"dtype": self.dtype} if self.dtype != "fp32" else {}),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, *, where: str = "finetune") -> FinetuneOptions:
        """Build from a dict (e.g. a config's ``finetune:``, the flags of ``finesift
        eval``) through :func:`finesift.config.from_mapping`: numbers from strings
        (``"1e-3"``, as PyYAML reads it), unknown keys and bad values are
        :class:`OptionError` s naming ``where``."""
        return from_mapping(
            cls, values, shown=lambda k, v: f"{where}: {k}={v!r}",
            unknown=lambda bad, known: f"{where}: unknown key(s) {', '.join(bad)}; "
                                       f"known: {', '.join(sorted(known))}")


def _peak_gpu(costs: Stopwatch) -> dict[str, float]:
    """``{"peak_gpu_mb": ...}``: the highest GPU peak of the stages, when CUDA was used."""
    gpu = [c["peak_gpu_mb"] for c in costs.stages.values() if "peak_gpu_mb" in c]
    return {"peak_gpu_mb": round(max(gpu), 1)} if gpu else {}


def finetune_key_fields(options: FinetuneOptions) -> dict[str, Any]:
    """Every field of ``options`` as a dict for a cache key, ``dtype`` left out at fp32 (so
    keys made before the field existed stay valid)."""
    fields = dataclasses.asdict(options)
    if fields.get("dtype") == "fp32":
        del fields["dtype"]
    return fields


def resolve_finetune_dtype(options: FinetuneOptions, device: str = "cpu") -> str:
    """The dtype the fine-tuned model is loaded in: ``options.dtype``, with ``auto`` bf16
    where ``device`` computes it natively (fp32 for full fine-tuning)."""
    from finesift.engine.precision import resolve_dtype

    required = ("fp32", "full fine-tuning trains the weights themselves") if options.full \
        else None
    return resolve_dtype(options.dtype, device, required=required, trains=True,
                         who="fine-tuning")


@dataclass
class EvalResult:
    """What :func:`finetune_and_evaluate` measured.

    Attributes:
        test_loss: mean token-averaged label NLL over the test set after fine-tuning.
        base_test_loss: the same for the untouched model (``None`` if not measured).
        test_losses: per test example, after fine-tuning.
        base_test_losses: per test example, the untouched model (when measured).
        f1 / base_f1: NER entity-level F1 (seqeval) after / before fine-tuning.
        em / base_em: exact match of the final answer on ``em_samples`` records.
        n_train / n_test: examples used (after encoding skips).
        train_loss: mean training loss over the steps.
        costs: per stage ``{"seconds", "peak_rss_mb"}``.
        info: hyperparameters, model provenance, encoding reports.
    """

    test_loss: float
    base_test_loss: float | None
    test_losses: np.ndarray
    n_train: int
    n_test: int
    train_loss: float
    f1: float | None = None
    base_f1: float | None = None
    em: float | None = None
    base_em: float | None = None
    em_n: int = 0
    costs: dict[str, Any] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    base_test_losses: np.ndarray | None = None
    test_ids: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The scalar figures, costs and info as a JSON-serialisable dict."""
        return {
            "test_loss": self.test_loss,
            "base_test_loss": self.base_test_loss,
            "improvement_over_base_pct": (
                None if self.base_test_loss is None
                else 100.0 * (self.base_test_loss - self.test_loss) / self.base_test_loss
            ),
            "test_f1": self.f1,
            "base_test_f1": self.base_f1,
            "test_em": self.em,
            "base_test_em": self.base_em,
            "em_samples": self.em_n,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "train_loss": self.train_loss,
            "costs": self.costs,
            **self.info,
        }


def read_records(paths: str | Path | Sequence[str | Path], role: str) -> list[Record]:
    """Read record files for the harness (``role`` names them in errors)."""
    from finesift.data.readers import load_records

    if isinstance(paths, (str, Path)):
        paths = [paths]
    return load_records([str(p) for p in paths], role=role)


def label_names(task: Any, model: str | None, record_lists: Sequence[Sequence[Record]]) -> list[str] | None:
    """Label names for a new classification head (``O`` first for NER), or ``None`` for a
    task without one (lm) and a trained tagger's own."""
    from finesift.engine.tasks import task_class
    from finesift.models.loader import pretrained_labels

    kind = task_class(task)
    return kind.label_names(pretrained_labels(model, kind), record_lists)


def _encode(records: Sequence[Record], tokenizer: Any, task: Any, max_length: int | None,
            label2id: dict[str, int] | None, role: str,
            template: str = "auto") -> tuple[list[Example], dict[str, Any]]:
    from finesift.engine.tasks import task_class

    kind = task_class(task)
    bad = next((r for r in records if not kind.accepts(r)), None)
    if bad is not None:
        raise bad.error(f"a {bad.shape} {role} record cannot be used with --task {kind.name}")
    examples, report = kind.encode(records, tokenizer, max_length=max_length,
                                   label2id=label2id, template=template)
    if not examples:
        src = ", ".join(dict.fromkeys(r.source for r in records)) or role
        raise InputError(src, f"no usable {role} records after encoding: {report.to_dict()}")
    return examples, report.to_dict()


# --------------------------------------------------------------------------- the harness

def _heads() -> tuple[str, ...]:
    from finesift.engine.tasks import TokenClassificationTask

    return TokenClassificationTask.HEADS  # a token classifier's head (BERT-like / decoder)


def _split_head(net: Any) -> tuple[list[Any], list[Any]]:
    """The trainable parameters of the classification head and of everything else (a
    LoRA model's head is the ``modules_to_save`` copy, found by the same name)."""
    head, body = [], []
    for name, p in net.named_parameters():
        if p.requires_grad:
            (head if any(part in _heads() for part in name.split(".")) else body).append(p)
    if not head:
        raise OptionError("head_lr: the model has no trainable classifier / score head")
    return head, body



def finetune_and_evaluate(
    train_records: Sequence[Record] | None,
    test_records: Sequence[Record],
    *,
    task: str = "lm",
    model: str | None = None,
    options: FinetuneOptions | None = None,
    labels: list[str] | None = None,
    measure_base: bool = True,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    device: str = "cpu",
) -> EvalResult:
    """Fine-tune a freshly loaded model on ``train_records``; measure ``test_records``.

    A LoRA adapter (plus, for NER, the head) is trained, or with ``options.lora_rank == 0``
    every parameter of the model (full fine-tuning; ``options.head_lr`` may give a new NER
    head its own learning rate).

    Args:
        train_records: the subset to train on (e.g. a selection); ``None``: measure the
            untouched model only (``test_loss`` is then the untouched model's).
        test_records: the held-out test set (never seen by a method).
        task: ``lm`` or ``ner``.
        model: built-in model name or local folder (default per task).
        options: fixed hyperparameters (:class:`FinetuneOptions`).
        labels: NER tag names for a new head; pass the same list to every run of a
            benchmark so heads are comparable (default: from train + test).
        measure_base: also measure the untouched model (loss, F1, EM).
        progress: show progress bars on stderr.
        log: receives progress messages.
        device: torch device the model is trained and measured on (``cpu``, ``cuda``, ...);
            the model is loaded in ``options.dtype`` there.

    Returns:
        An :class:`EvalResult` with the figures and the cost of each stage (with
        ``peak_gpu_mb`` beside ``peak_rss_mb`` when CUDA is used).
    """
    import torch

    from finesift.engine.precision import compute_precision
    from finesift.engine.scoring import example_losses
    from finesift.engine.tasks import task_class, task_for
    from finesift.engine.train import TrainOptions, add_lora, train
    from finesift.models.loader import load_model

    opts = options or FinetuneOptions()
    opts.validate()
    log = log or (lambda msg: None)
    kind = task_class(task)  # an OptionError naming the known tasks
    if train_records is not None and not train_records:
        raise OptionError("no training records to fine-tune on")
    if train_records is None:
        measure_base = True
    if not test_records:
        raise OptionError("no test records to evaluate on")
    costs = Stopwatch()
    t_start = time.perf_counter()
    if labels is None:
        labels = label_names(kind, model, [train_records or [], test_records])
    from finesift.pipeline import check_device

    check_device(device)
    dtype = resolve_finetune_dtype(opts, device)

    with costs.stage("load_model"):
        bundle = load_model(model, task, labels=labels, seed=opts.seed, dtype=dtype,
                            device=device)
    net, tok = bundle.model, bundle.tokenizer
    label2id = None
    id2label: list[str] = []
    base_loss = base_f1 = base_em = None
    base_losses = None
    if kind.trains_head:  # the head's own label order
        id2label = [net.config.id2label[i] for i in range(net.config.num_labels)]
        label2id = {lab: i for i, lab in enumerate(id2label)}
    with costs.stage("encode"):
        train_ex, train_rep = ([], {}) if train_records is None else _encode(
            train_records, tok, kind, opts.max_length, label2id, "train", opts.template)
        test_ex, test_rep = _encode(test_records, tok, kind, opts.max_length, label2id, "test",
                                    opts.template)
    task_obj = task_for(task, tok)
    # bf16 weights compute in bf16: autocast is for fp32 weights only
    measure = {"batch_size": opts.eval_batch_size,
               "precision": compute_precision(opts.eval_precision, dtype),
               "progress": progress, "device": device}
    test_ids = [test_records[e.index].id for e in test_ex]
    em_records = kind.exact_match_records(test_records, opts.em_samples, opts.seed)
    quality = {"labels": id2label, "options": opts, "em_records": em_records}

    if measure_base:
        log("measuring the untouched model on the test set ...")
        with costs.stage("eval_base"):
            base_losses = example_losses(net, task_obj, test_ex, desc="base test", **measure)
            base_loss = float(np.mean(base_losses))
            base_q = task_obj.quality(net, tok, test_ex, test_records, **quality)
            base_f1, base_em = base_q.get("f1"), base_q.get("em")

    if train_records is None:
        return EvalResult(
            test_loss=float(base_loss), base_test_loss=base_loss, test_losses=np.array([]),
            n_train=0, n_test=len(test_ex), train_loss=float("nan"), f1=base_f1,
            base_f1=base_f1, em=base_em, base_em=base_em, em_n=len(em_records),
            costs=costs.to_dict(), info={"task": kind.name, "model": bundle.info,
                                         "test_encoding": test_rep},
            base_test_losses=base_losses, test_ids=test_ids,
        )
    train_opts = TrainOptions(lr=opts.lr, epochs=opts.epochs, batch_size=opts.batch_size,
                              schedule=opts.schedule)
    per_epoch = -(-len(train_ex) // opts.batch_size)
    if opts.steps is not None:
        train_opts.epochs = opts.steps / per_epoch
        train_opts.max_steps = opts.steps
    total_steps = opts.steps if opts.steps is not None else int(np.ceil(opts.epochs * per_epoch))
    train_opts.warmup_steps = round(opts.warmup * total_steps)
    length = (f"{opts.steps} steps" if opts.steps is not None else f"{opts.epochs:g} epoch(s)")
    how = "full fine-tuning" if opts.full else f"LoRA rank {opts.lora_rank}"
    head_lr = opts.head_lr if kind.trains_head else None
    log(f"fine-tuning on {len(train_ex)} examples ({length}, {how}, lr {opts.lr:g}"
        f"{f', head lr {head_lr:g}' if head_lr is not None else ''}) ...")
    with costs.stage("finetune"):
        if opts.full:
            torch.manual_seed(opts.seed)  # dropout masks, as add_lora seeds them for LoRA
            for p in net.parameters():
                p.requires_grad_(True)
        else:
            net = add_lora(net, task, opts.lora(), seed=opts.seed)
        groups = None
        if head_lr is not None:
            head, body = _split_head(net)
            groups = [{"params": body, "lr_scale": 1.0},
                      {"params": head, "lr_scale": head_lr / opts.lr}]
        stats = train(net, task_obj, train_ex, train_opts, param_groups=groups, seed=opts.seed,
                      precision=compute_precision(opts.precision, dtype), device=device,
                      progress=progress, desc="fine-tuning")
    with costs.stage("eval"):
        losses = example_losses(net, task_obj, test_ex, desc="test", **measure)
        q = task_obj.quality(net, tok, test_ex, test_records, **quality)
        f1, em = q.get("f1"), q.get("em")
    return EvalResult(
        test_loss=float(np.mean(losses)),
        base_test_loss=base_loss,
        test_losses=losses,
        n_train=len(train_ex),
        n_test=len(test_ex),
        train_loss=float(stats["mean_loss"]),
        f1=f1,
        base_f1=base_f1,
        em=em,
        base_em=base_em,
        em_n=len(em_records),
        costs=costs.to_dict(),
        info={
            "wall_seconds": round(time.perf_counter() - t_start, 3),
            "peak_rss_mb": round(max(c["peak_rss_mb"] for c in costs.stages.values()), 1),
            **_peak_gpu(costs),
            "task": kind.name,
            "model": bundle.info,
            "finetune": {**opts.hyperparameters(), "seed": opts.seed, "steps": stats["steps"]},
            "train_encoding": train_rep,
            "test_encoding": test_rep,
            "labels": id2label or None,
        },
        base_test_losses=base_losses, test_ids=test_ids,
    )
