"""The ``finesift`` command: a successful ``select``, and every bad input ending in exit code
2 with one ``finesift: error:`` line naming the file and line (never a traceback)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from finesift import __version__
from finesift.cli import main

TOV_ARGS = ["-o", "mode=basic", "-o", "lr=3e-3", "-o", "val_epochs=3", "--precision", "fp32"]



def select_argv(pool: list[Path], target: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return [
        "select", "--pool", *map(str, pool), "--target", str(target), "--out", str(out),
        "--model", str(model), "--no-progress", *extra,
    ]


def check_summary(stdout: str, lm_data, out: Path, budget: int) -> None:
    """The printed per-source summary agrees with selected.jsonl."""
    n_pool = len(lm_data.usable)
    assert f"selected {budget} of {n_pool} pool examples" in stdout
    rows = [json.loads(x) for x in (out / "selected.jsonl").read_text().splitlines()]
    by_source = Counter("text" if r["id"].startswith("text") else "chat" for r in rows)
    assert len(rows) == budget
    for path, kind in zip(lm_data.pool, ("text", "chat"), strict=True):
        n = by_source[kind]
        assert f"  {path}: {n} selected of 40 ({100 * n / budget:.0f}% of the selection)" in stdout
    assert "top 5:" in stdout
    top_lines = stdout.split("top 5:\n")[1].splitlines()[:5]
    assert [line.split()[1] for line in top_lines] == [r["id"] for r in rows[:5]]
    assert f"wrote {out}/scores.parquet, selected.jsonl, manifest.json" in stdout
    assert len({r["id"] for r in rows} & lm_data.planted) >= budget * 3 // 4


def test_select_success(lm_data, tiny_lm_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    rc = main(select_argv(lm_data.pool, lm_data.target, out, tiny_lm_dir, "--budget", "16",
                          *TOV_ARGS))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    check_summary(captured.out, lm_data, out, 16)
    # the reply-less chat: a warning on stderr, not an error
    assert captured.err.startswith("warning: skipped 1 pool record(s) while reading")
    assert "Traceback" not in captured.err
    man = json.loads((out / "manifest.json").read_text())
    assert man["method_options"]["mode"] == "basic" and man["method_options"]["lr"] == 3e-3
    assert man["precision"] == "fp32" and man["model"]["name"] == str(tiny_lm_dir)


def _finesift_command() -> list[str]:
    script = Path(sys.executable).with_name("finesift")
    return [str(script)] if script.exists() else [sys.executable, "-m", "finesift.cli"]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(_finesift_command() + argv, capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def test_select_as_a_subprocess(lm_data, tiny_lm_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run(select_argv(lm_data.pool, lm_data.target, out, tiny_lm_dir, "--budget", "10%",
                            *TOV_ARGS))
    assert proc.returncode == 0, proc.stderr
    check_summary(proc.stdout, lm_data, out, 8)
    assert "Traceback" not in proc.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "cat"}\n{"text": "dog"\n', encoding="utf-8")
    proc = _run(select_argv([bad], lm_data.target, out, tiny_lm_dir, "--budget", "1"))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"finesift: error: {bad}:2: invalid JSON")
    assert "Traceback" not in proc.stderr and proc.stdout == ""


# --------------------------------------------------------------------------- bad input

GOOD = {"text": "the cat"}


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows),
                    encoding="utf-8")
    return path


# Each case: (files folder, lm_data, model folders) -> (argv extras, expected substrings).
Case = Callable[[Path, Any, dict[str, Path]], tuple[list[str], list[str]]]


def _pool_case(rows: list[Any], *expected: str) -> Case:
    def make(tmp: Path, lm_data, models):
        pool = _jsonl(tmp / "pool.jsonl", rows)
        return (["--pool", str(pool), "--budget", "1"],
                [e.format(pool=pool) for e in expected])
    return make


def _empty_pool(tmp: Path, lm_data, models):
    pool = tmp / "empty.jsonl"
    pool.write_text("", encoding="utf-8")
    return ["--pool", str(pool), "--budget", "1"], [f"{pool}: empty pool: no usable records"]


def _duplicate_ids(tmp: Path, lm_data, models):
    a = _jsonl(tmp / "a.jsonl", [{"id": "x", "text": "cat"}, {"id": "y", "text": "dog"}])
    b = _jsonl(tmp / "b.jsonl", [{"id": "z", "text": "cat"}, {"id": "x", "text": "dog"}])
    return (["--pool", str(a), str(b), "--budget", "1"],
            [f"{b}:2: duplicate id 'x'", f"first at {a}:1"])


def _budget_too_large(tmp: Path, lm_data, models):
    return (["--pool", str(lm_data.pool[0]), "--budget", "41"],
            ["budget 41 is larger than the pool (40 "])


def _unknown_tag(tmp: Path, lm_data, models):
    pool = tmp / "pool.conll"
    pool.write_text("john\tB-PER\nran\tO\n\nmary\tB-PER\nin\tO\nparis\tB-LOC\n", encoding="utf-8")
    target = _jsonl(tmp / "target.jsonl", [{"tokens": ["john"], "tags": ["B-PER"]}])
    return (["--pool", str(pool), "--target", str(target), "--task", "ner", "--budget", "1",
             "--model", str(models["tagger"])],
            [f"{pool}:4: tag 'B-LOC' is not one of the model's labels: O, B-PER, I-PER"])


def _missing_file(tmp: Path, lm_data, models):
    pool = tmp / "nope.jsonl"
    return ["--pool", str(pool), "--budget", "1"], [f"{pool}: pool file not found"]


def _missing_target(tmp: Path, lm_data, models):
    target = tmp / "nope.jsonl"
    return (["--pool", str(lm_data.pool[0]), "--target", str(target), "--budget", "1"],
            [f"{target}: target file not found"])


def _ner_task_on_text(tmp: Path, lm_data, models):
    pool = lm_data.pool[0]
    return (["--pool", str(pool), "--task", "ner", "--model", str(models["ner"]), "--budget",
             "1"], [f"{pool}:1: --task ner needs records with 'tokens' and 'tags'"])


def _lm_task_on_conll(tmp: Path, lm_data, models):
    pool = tmp / "pool.conll"
    pool.write_text("-DOCSTART-\tO\n\njohn\tB-PER\nran\tO\n", encoding="utf-8")
    return (["--pool", str(pool), "--budget", "1"],
            [f"{pool}:3: an NER record (tokens + tags) in a --task lm run; use --task ner"])


def _out_is_a_file(tmp: Path, lm_data, models):
    out = tmp / "taken"
    out.write_text("not a folder", encoding="utf-8")
    return (["--pool", str(lm_data.pool[0]), "--budget", "1", "--out", str(out)],
            [f"--out {out}: exists and is not a folder"])


def _broken_model(drop: str, *expected: str) -> Case:
    """A copy of the tiny LM folder without ``drop`` (or with it truncated, for config.json)."""
    def make(tmp: Path, lm_data, models):
        folder = tmp / "model"
        shutil.copytree(models["lm"], folder)
        if drop == "config.json":
            (folder / drop).write_text("{", encoding="utf-8")
        else:
            (folder / drop).unlink()
        return (["--pool", str(lm_data.pool[0]), "--budget", "1", "--model", str(folder)],
                [f"--model {folder}: ", *expected])
    return make


def _unknown_method(tmp: Path, lm_data, models):
    return (["--pool", str(lm_data.pool[0]), "--budget", "1", "--method", "magic"],
            ["unknown method 'magic'; available methods: ", "random", "tov"])


def _option(*args: str, expected: str) -> Case:
    def make(tmp: Path, lm_data, models):
        return ["--pool", str(lm_data.pool[0]), "--budget", "1", *args], [expected]
    return make


BAD_INPUTS: dict[str, Case] = {
    "malformed-json": _pool_case(
        [GOOD, '{"text": "dog",}\n'], "{pool}:2: invalid JSON"),
    "not-an-object": _pool_case([GOOD, "[1, 2]\n"], "{pool}:2: expected a JSON object per line"),
    "unknown-shape": _pool_case(
        [GOOD, GOOD, {"id": "q", "content": "hi"}],
        "{pool}:3: unknown record shape", "fields found: content, id"),
    "missing-field": _pool_case(
        [{"prompt": "two plus two", "completion": "four"}, {"prompt": "three"}],
        "{pool}:2: unknown record shape (has 'prompt' but no 'completion')"),
    "wrong-type": _pool_case([GOOD, {"text": 7}], "{pool}:2: field 'text': expected a string"),
    "mixed-shapes": _pool_case(
        [GOOD, {"prompt": "a", "completion": "b"}],
        "{pool}:2: record shape 'prompt_completion' differs from the file's first record",
        "{pool}:1: 'text'"),
    "empty-pool": _empty_pool,
    "duplicate-ids": _duplicate_ids,
    "budget-too-large": _budget_too_large,
    "bad-budget": _option("--budget", "lots", expected="budget 'lots': expected a count"),
    "unknown-tag": _unknown_tag,
    "ner-task-on-text": _ner_task_on_text,
    "lm-task-on-conll": _lm_task_on_conll,
    "out-is-a-file": _out_is_a_file,
    "batch-size": _option("--batch-size", "0", expected="batch size must be a positive integer"),
    "max-length": _option("--max-length", "0", expected="max_length must be a positive integer"),
    "missing-pool": _missing_file,
    "missing-target": _missing_target,
    "option-syntax": _option("-o", "mode", expected="--option 'mode': expected KEY=VALUE"),
    "option-value": _option("-o", "rounds=many", expected="option rounds='many' is not a number"),
    "unknown-option": _option("-o", "speed=9", expected="method 'tov' has no option(s) speed"),
    "unknown-method": _unknown_method,
    "model-without-tokenizer": _broken_model("tokenizer.json", ": cannot load the tokenizer: "),
    "model-bad-config": _broken_model("config.json", "config.json' is not a valid JSON"),
    "model-without-weights": _broken_model("model.safetensors", ": no *.safetensors weights"),
    "bad-model": _option("--model", "/nonexistent/model",
                         expected="--model /nonexistent/model: not a built-in model"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_clear_line(
    case: str, lm_data, tiny_lm_dir: Path, tiny_ner_dir: Path, tiny_tagger_dir: Path,
    tmp_path: Path, capsys,
) -> None:
    extra, expected = BAD_INPUTS[case](
        tmp_path, lm_data, {"lm": tiny_lm_dir, "tagger": tiny_tagger_dir, "ner": tiny_ner_dir})
    argv = ["select", "--target", str(lm_data.target), "--out", str(tmp_path / "out"),
            "--model", str(tiny_lm_dir), "--no-progress", *extra]
    rc = main(argv)  # later --target/--model/--budget override the defaults above
    captured = capsys.readouterr()
    assert rc == 2, (captured.out, captured.err)
    assert captured.err.startswith("finesift: error: "), captured.err
    assert captured.err.count("finesift: error:") == 1
    assert "Traceback" not in captured.err
    for text in expected:
        assert text in captured.err, (text, captured.err)
    assert captured.out == ""
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- other commands


def test_methods_lists_methods_and_options(capsys) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    names = [line.split()[0] for line in lines if not line.startswith(" ")]
    assert {"random", "tov"} <= set(names) and names == sorted(names)
    assert "Train on Validation" in out
    for option in ("mode = 'interleaved'", "lr = 0.0002", "rounds = 3", "transform = 'identity'",
                   "adapter = 'lora'"):
        assert f"    {option}" in lines


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"finesift {__version__}"
