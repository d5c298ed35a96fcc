"""The README's worked examples of extending finesift: a method, a data format and a kind
of task, each added from outside the package and run end to end."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import finesift
from finesift.config import option
from finesift.engine.tasks import TASKS, TokenTask, register_task
from finesift.methods.base import REGISTRY, Method, MethodContext, MethodResult, register

# -- a method (the README's "Add a method") ---------------------------------------------


@dataclass
class LengthOptions:
    longest: bool = option(True, "prefer long examples (false: short ones)")


class Length(Method):
    name = "length"
    description = "the number of label tokens: a baseline"
    needs_model = False
    Options = LengthOptions

    def score(self, ctx: MethodContext) -> MethodResult:
        n = np.array([e.n_label_tokens for e in ctx.pool], dtype=np.float64)
        return MethodResult(scores=n if self.options.longest else -n)


@pytest.fixture
def length_method(monkeypatch):
    monkeypatch.setitem(REGISTRY, "length", Length)
    assert register(Length) is Length  # the decorator, as a module would use it
    return Length


def test_a_new_method_runs_from_the_cli_with_its_options(length_method, lm_data,
                                                         tiny_lm_dir: Path, tmp_path, capsys):
    from finesift.cli import main

    rc = main(["select", "--method", "length", "-o", "longest=false", "--budget", "6",
               "--pool", *map(str, lm_data.pool), "--target", str(lm_data.target),
               "--model", str(tiny_lm_dir), "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    sel = finesift.select(lm_data.pool, lm_data.target, budget=6, method="length",
                          method_options={"longest": "no"}, model=str(tiny_lm_dir))
    lengths = sel.columns["n_label_tokens"]
    chosen = [sel.pool.index(r) for r in sel.selected]
    assert sorted(lengths[chosen]) == sorted(np.sort(lengths)[:6])  # the shortest six
    assert main(["methods", "length"]) == 0
    assert "prefer long examples" in capsys.readouterr().out


# -- a data format (the README's "Add a data format") -----------------------------------


def read_pc(path: str, how: str):
    """``prompt<TAB>completion`` per line."""
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            prompt, _, completion = line.rstrip("\n").partition("\t")
            yield i, i + 1, {"prompt": prompt, "completion": completion}


def test_a_new_reader_reads_its_extension(monkeypatch, tmp_path: Path,
                                          tiny_lm_dir: Path) -> None:
    from finesift.data import readers

    monkeypatch.setattr(readers, "FORMATS", readers.FORMATS)
    monkeypatch.setitem(readers._ROW_READERS, "pc", read_pc)
    monkeypatch.setitem(readers.EXTENSIONS, ".pc", "pc")
    monkeypatch.setitem(readers._FORMAT_NAMES, "pc", "pc")
    readers.register_reader("pc", [".pc"], read_pc)
    pool = tmp_path / "pool.pc"
    pool.write_text("".join(f"question {i}\tanswer {i}\n" for i in range(12)))
    target = tmp_path / "target.pc"
    target.write_text("question 3\tanswer 3\n")
    records = readers.load_records([str(pool)], None, role="pool")
    assert [r.shape for r in records] == ["prompt_completion"] * 12
    assert records[5].prompt == "question 5" and records[5].line == 6
    sel = finesift.select(pool, target, budget=4, method="dsir", model=str(tiny_lm_dir),
                          method_options={"sampling": "top"})
    assert sel.selected[0].prompt == "question 3" and len(sel.selected) == 4
    assert "pc" in readers.FORMATS


# -- a kind of task (the README's "Add a kind of task") ---------------------------------


class SequenceClassificationTask(TokenTask):
    """One label per text: ``{"text": ..., "label": ...}`` records; the model is a
    transformers sequence classifier; the label token sits at the last position."""

    name = "seqcls"
    model_kind = "a sequence classifier"
    labels = ("neg", "pos")

    @classmethod
    def accepts(cls, record) -> bool:
        return record.shape == "text" and record.raw.get("label") in cls.labels

    @classmethod
    def encode(cls, records, tokenizer, *, max_length, label2id=None, template="auto"):
        from finesift.data.encode import EncodeReport
        from finesift.data.records import Example

        examples = []
        for i, r in enumerate(records):
            ids = tokenizer(r.text, truncation=True, max_length=max_length)["input_ids"]
            labels = np.full(len(ids), -100, dtype=np.int64)
            labels[-1] = cls.labels.index(r.raw["label"])
            examples.append(Example(index=i, input_ids=np.asarray(ids, dtype=np.int64),
                                    labels=labels, n_label_tokens=1, truncated=False))
        return examples, EncodeReport(n_records=len(records))

    def label_logprobs(self, model, batch):
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits.float()
        sel = batch["labels"] != -100
        row = torch.nonzero(sel, as_tuple=True)[0]
        target = batch["labels"][sel]
        return torch.log_softmax(logits[row], dim=-1).gather(1, target[:, None]).squeeze(1), row


def test_a_new_task_selects_with_its_own_model(monkeypatch, tmp_path: Path, write_jsonl):
    from transformers import BertConfig, BertForSequenceClassification

    from finesift.testing import tiny_encoder

    monkeypatch.setitem(TASKS, "seqcls", SequenceClassificationTask)
    register_task(SequenceClassificationTask)
    words = ["good", "great", "bad", "awful", "movie", "plot", "the", "was"]
    _, tok = tiny_encoder(words)
    torch.manual_seed(0)
    net = BertForSequenceClassification(BertConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_labels=2))
    rng = np.random.default_rng(0)
    pool = [{"id": f"p{i}", "text": f"the movie was {rng.choice(words[:4])}",
             "label": str(rng.choice(["neg", "pos"]))} for i in range(20)]
    target = [{"id": "t0", "text": "the plot was great", "label": "pos"}]
    write_jsonl(tmp_path / "pool.jsonl", pool)
    write_jsonl(tmp_path / "target.jsonl", target)
    task = SequenceClassificationTask(tok.pad_token_id)
    sel = finesift.select(tmp_path / "pool.jsonl", tmp_path / "target.jsonl", budget=5,
                          method="perplexity", model=(net, tok), task=task, precision="fp32")
    assert len(sel.selected) == 5 and sel.manifest["task"] == "seqcls"
    # the scores are the model's own: the mean label log-loss, recomputed by hand
    from finesift.engine.scoring import example_losses

    exs, _ = SequenceClassificationTask.encode(sel.pool, tok, max_length=32)
    want = example_losses(net, task, exs, batch_size=4, precision="fp32")
    assert np.allclose(-np.asarray(sel.scores), want, rtol=1e-4)  # lowest loss first
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"id": "x", "text": "the movie", "label": "meh"}])
    with pytest.raises(finesift.errors.InputError, match="cannot be used with --task seqcls"):
        finesift.select(bad, tmp_path / "target.jsonl", budget=1, method="perplexity",
                        model=(net, tok), task=task)
