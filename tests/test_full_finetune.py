"""Full fine-tuning in the harness (``lora_rank: 0``), a separate head learning rate,
warm-up / linear decay, and the resume fingerprint of the options (tiny models, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import finesift.engine.train as train_module
from finesift.cli import main
from finesift.errors import OptionError
from finesift.evaluate.finetune import FinetuneOptions, finetune_and_evaluate, read_records
from finesift.evaluate.tuning import check_grid


def ner_rows(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    fill = ["the", "cat", "dog", "was", "in", "city", "with", "a", "big", "old"]
    rows = []
    for i in range(n):
        words = [*rng.choice(fill, 3), str(rng.choice(["john", "mary"])), "went", "to",
                 str(rng.choice(["paris", "london"])), *rng.choice(fill, 2)]
        tags = ["B-PER" if w in ("john", "mary") else "B-LOC" if w in ("paris", "london")
                else "O" for w in words]
        rows.append({"id": f"s{seed}-{i}", "tokens": [str(w) for w in words], "tags": tags})
    return rows


@pytest.fixture(scope="module")
def ner_sets(tmp_path_factory, write_jsonl):
    folder = tmp_path_factory.mktemp("ner_full")
    return (read_records(write_jsonl(folder / "train.jsonl", ner_rows(24, 0)), "train"),
            read_records(write_jsonl(folder / "test.jsonl", ner_rows(8, 1)), "test"))


def run_capturing(monkeypatch, *args, **kwargs):
    """finetune_and_evaluate, keeping the model's parameters before and after training,
    the trained model's parameter names and its optimiser."""
    seen: dict = {}
    real = train_module.train

    def spy(model, *a, **kw):
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        stats = real(model, *a, **kw)
        seen["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        seen["optimizer"] = stats["optimizer"]
        return stats

    monkeypatch.setattr(train_module, "train", spy)
    return finetune_and_evaluate(*args, **kwargs), seen


def changed(seen: dict, name: str) -> bool:
    return not torch.equal(seen["before"][name], seen["after"][name])


def test_full_finetuning_updates_the_encoder_and_lora_does_not(
        monkeypatch, ner_sets, tiny_ner_dir: Path) -> None:
    train, test = ner_sets
    common = {"steps": 4, "batch_size": 8, "precision": "fp32", "max_length": 32}

    full, seen = run_capturing(
        monkeypatch, train, test, task="ner", model=str(tiny_ner_dir),
        options=FinetuneOptions(**common, lr=1e-3, lora_rank=0))
    names = list(seen["before"])
    assert not any("lora_" in n for n in names)
    assert seen["trainable"] == set(names)  # every parameter
    for name in ("bert.encoder.layer.0.attention.self.query.weight",
                 "bert.encoder.layer.1.output.dense.weight",
                 "bert.embeddings.word_embeddings.weight", "classifier.weight"):
        assert changed(seen, name), name
    assert full.info["finetune"]["finetuning"].startswith("full")
    assert "lora_alpha" not in full.info["finetune"]
    assert full.info["finetune"]["steps"] == 4

    lora, seen = run_capturing(
        monkeypatch, train, test, task="ner", model=str(tiny_ner_dir),
        options=FinetuneOptions(**common, lr=1e-3, lora_rank=4))
    frozen = [n for n in seen["before"] if "lora_" not in n and "modules_to_save" not in n]
    assert any("encoder.layer.0.attention.self.query" in n for n in frozen)
    assert not any(changed(seen, n) for n in frozen)  # the pretrained weights stay put
    assert any(changed(seen, n) for n in seen["before"] if "lora_B" in n)
    assert any(changed(seen, n) for n in seen["before"] if "modules_to_save" in n)
    assert full.base_test_loss == lora.base_test_loss
    assert full.test_loss != lora.test_loss


def test_head_lr_and_schedule_reach_the_optimiser(monkeypatch, ner_sets,
                                                  tiny_ner_dir: Path) -> None:
    train, test = ner_sets
    opts = FinetuneOptions(steps=5, batch_size=8, lr=1e-4, lora_rank=0, head_lr=2e-3,
                           warmup=0.2, schedule="linear", precision="fp32", max_length=32)
    res, seen = run_capturing(monkeypatch, train, test, task="ner", model=str(tiny_ner_dir),
                              options=opts)
    body, head = seen["optimizer"].param_groups
    assert head["lr_scale"] == pytest.approx(20.0) and body["lr_scale"] == 1.0
    assert len(head["params"]) == 2  # classifier weight and bias
    assert len(body["params"]) + 2 == len(seen["before"])
    # 5 steps, 1 warm-up step, linear decay: the last step runs at 1/4 of the rate
    assert head["lr"] == pytest.approx(2e-3 / 4) and body["lr"] == pytest.approx(1e-4 / 4)
    hyper = res.info["finetune"]
    assert hyper["head_lr"] == 2e-3 and hyper["warmup"] == 0.2 and hyper["schedule"] == "linear"

    # on a LoRA model the head is the trainable modules_to_save copy
    _, seen = run_capturing(monkeypatch, train, test, task="ner", model=str(tiny_ner_dir),
                            options=FinetuneOptions(**{**opts.__dict__, "lora_rank": 4}))
    body, head = seen["optimizer"].param_groups
    assert len(head["params"]) == 2 and all(p.requires_grad for p in body["params"])


def test_lr_factor_warmup_and_decay() -> None:
    opts = train_module.TrainOptions(warmup_steps=2, schedule="linear")
    assert [train_module.lr_factor(s, 6, opts) for s in range(6)] == pytest.approx(
        [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25])
    constant = train_module.TrainOptions()
    assert {train_module.lr_factor(s, 6, constant) for s in range(6)} == {1.0}


def test_options_validate_and_setup_fields_stay_backward_compatible() -> None:
    # the defaults write exactly the fingerprint of folders made before these fields
    assert set(FinetuneOptions().setup_fields()) == {
        "epochs", "lr", "lora_rank", "batch_size", "max_length", "precision",
        "eval_batch_size", "em_samples", "max_new_tokens"}
    assert "finetuning" not in FinetuneOptions().hyperparameters()
    assert FinetuneOptions().hyperparameters()["lora_alpha"] == 32
    full = FinetuneOptions(lora_rank=0, head_lr=1e-3, warmup=0.1, schedule="linear")
    assert full.full and not FinetuneOptions().full
    fields = full.setup_fields()
    assert fields["lora_rank"] == 0 and fields["head_lr"] == 1e-3
    assert fields["warmup"] == 0.1 and fields["schedule"] == "linear"
    full.validate()
    for bad in ({"lora_rank": -1}, {"lora_rank": 1.5}, {"head_lr": 0}, {"head_lr": -1e-3},
                {"warmup": 1.0}, {"warmup": -0.1}, {"schedule": "cosine"}):
        with pytest.raises(OptionError):
            FinetuneOptions(**bad).validate()
    # a config's YAML may give numbers as strings ("1e-3" is a string to PyYAML)
    opts = FinetuneOptions.from_dict({"lora_rank": 0, "lr": "5e-5", "head_lr": "1e-3",
                                      "warmup": 0.1})
    assert opts.head_lr == 1e-3 and opts.lr == 5e-5
    with pytest.raises(OptionError, match="unknown"):
        FinetuneOptions.from_dict({"full": True})
    assert set(check_grid({"lora_rank": [0, 16], "head_lr": [1e-3], "warmup": [0.1]})) == {
        "lora_rank", "head_lr", "warmup"}
    with pytest.raises(OptionError):
        check_grid({"lora_rank": [-1]})


def test_eval_cli_full_finetuning(tmp_path, tiny_ner_dir: Path, write_jsonl, capsys) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", ner_rows(16, 0))
    test = write_jsonl(tmp_path / "test.jsonl", ner_rows(6, 1))
    out = tmp_path / "res.json"
    assert main(["eval", "--task", "ner", "--model", str(tiny_ner_dir), "--train", str(train),
                 "--test", str(test), "--steps", "3", "--batch-size", "8", "--lora-rank", "0",
                 "--lr", "1e-3", "--head-lr", "5e-3", "--warmup", "0.3", "--schedule",
                 "linear", "--precision", "fp32", "--no-progress", "--out", str(out)]) == 0
    hyper = json.loads(out.read_text())["finetune"]
    assert hyper["lora_rank"] == 0 and hyper["head_lr"] == 5e-3
    assert hyper["schedule"] == "linear" and hyper["steps"] == 3
    capsys.readouterr()
    assert main(["eval", "--task", "ner", "--model", str(tiny_ner_dir), "--train", str(train),
                 "--test", str(test), "--lora-rank", "-2", "--no-progress"]) == 2
    assert "lora_rank" in capsys.readouterr().err
