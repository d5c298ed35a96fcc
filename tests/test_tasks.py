"""Kinds of task as classes: the lm/ner knowledge lives in engine/tasks.py only, and a
new kind of task is one registered class."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from finesift.engine.tasks import (
    TASKS,
    CausalLMTask,
    TokenClassificationTask,
    task_class,
    task_for,
)
from finesift.errors import OptionError

SRC = Path(__file__).resolve().parents[1] / "src" / "finesift"


def _task_branches(path: Path) -> list[str]:
    """Comparisons of a name or attribute called like ``task`` with the strings
    ``"lm"``/``"ner"`` (``task == "ner"``, ``task in ("lm", "ner")``, ...)."""
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        names = [s.id if isinstance(s, ast.Name) else s.attr if isinstance(s, ast.Attribute)
                 else "" for s in sides]
        strings = set()
        for s in sides:
            for c in ast.walk(s):
                if isinstance(c, ast.Constant) and isinstance(c.value, str):
                    strings.add(c.value)
        if any("task" in n for n in names) and strings & {"lm", "ner"}:
            found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    return found


def test_no_task_branches_outside_the_task_classes() -> None:
    branches = [hit for path in sorted(SRC.rglob("*.py"))
                if path != SRC / "engine" / "tasks.py" for hit in _task_branches(path)]
    assert not branches, f"lm/ner decided outside engine/tasks.py at {branches}"


def test_the_branch_finder_finds_a_branch(tmp_path: Path) -> None:
    """The check above can fail: it sees the forms the code used to have."""
    code = tmp_path / "x.py"
    code.write_text("def f(task, cfg):\n    if task == 'ner':\n        pass\n"
                    "    if cfg.task not in ('lm', 'ner'):\n        pass\n")
    global SRC
    old, SRC = SRC, tmp_path
    try:
        assert _task_branches(code) == ["x.py:2", "x.py:4"]
    finally:
        SRC = old


def test_task_class_accepts_names_classes_and_objects() -> None:
    assert TASKS["lm"] is CausalLMTask and TASKS["ner"] is TokenClassificationTask
    assert task_class("ner") is TokenClassificationTask
    assert task_class(CausalLMTask) is CausalLMTask
    obj = CausalLMTask(0)
    assert task_class(obj) is CausalLMTask

    class Tok:
        pad_token_id = 7

    assert task_for(obj, Tok()) is obj
    assert task_for("lm", Tok()).pad_token_id == 7
    with pytest.raises(OptionError, match=r"--task must be 'lm' or 'ner', got 'pos'"):
        task_class("pos")


def test_builtin_models_name_their_task() -> None:
    from finesift.models.loader import resolve_path

    with pytest.raises(OptionError, match="smollm2-135m is a causal LM; use it with --task lm"):
        resolve_path("smollm2-135m", "ner")
    with pytest.raises(OptionError, match="minilm-l6 is an encoder; use it with --task ner"):
        resolve_path("minilm-l6", "lm")


def test_record_shapes_are_the_tasks_to_judge() -> None:
    from finesift.data.records import Record

    ner = Record(id="a", source="s.jsonl", row=0, shape="ner", raw={}, tokens=["x"], tags=["O"])
    chat = Record(id="b", source="s.jsonl", row=1, shape="prompt_completion", raw={},
                  prompt="q", completion="a")
    assert TokenClassificationTask.accepts(ner) and not TokenClassificationTask.accepts(chat)
    assert CausalLMTask.accepts(chat) and not CausalLMTask.accepts(ner)
    assert "use --task ner" in CausalLMTask.wrong_record(ner)


def test_select_takes_a_loaded_model_and_a_task_object(lm_data, tiny_lm_dir: Path,
                                                       tmp_path: Path) -> None:
    """model=(model, tokenizer) and task=<Task object> give the selection the folder and
    the name give; the manifest names the model by its weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import finesift

    kw = {"budget": 8, "method": "perplexity", "seed": 0, "precision": "fp32"}
    by_name = finesift.select(lm_data.pool, lm_data.target, model=str(tiny_lm_dir),
                              out=tmp_path / "by-name", **kw)
    net = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    task = CausalLMTask(tok.pad_token_id if tok.pad_token_id is not None else 0)
    by_object = finesift.select(lm_data.pool, lm_data.target, model=(net, tok), task=task,
                                out=tmp_path / "by-object", **kw)
    assert by_object.selected_ids == by_name.selected_ids
    assert list(by_object.scores) == pytest.approx(list(by_name.scores), rel=1e-5, abs=1e-6)
    info = by_object.manifest["model"]
    assert info["source"] == "passed as an object" and len(info["weights_sha256"]) == 64
    assert by_object.manifest["task"] == "lm"
    with torch.no_grad():  # other weights: another name, so no resumed state is shared
        next(net.parameters()).add_(1.0)
    other = finesift.select(lm_data.pool, lm_data.target, model=(net, tok), task="lm",
                            out=tmp_path / "other", **kw)
    assert other.manifest["model"]["weights_sha256"] != info["weights_sha256"]
    with pytest.raises(OptionError, match="cannot be sent to other processes"):
        finesift.select(lm_data.pool, lm_data.target, model=(net, tok), executor="ray",
                        out=tmp_path / "ray", **kw)
