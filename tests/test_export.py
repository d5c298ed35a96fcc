"""``--export messages|prompt-completion|datasets``: the selection in TRL's formats next to
``selected.jsonl``, with the same columns on every row whatever the mix of sources; checked
before any work; written atomically and listed in the manifest; and trainable as it is:
TRL's ``SFTTrainer`` fine-tunes a tiny causal LM on each export for two steps."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path
from typing import Any

import datasets
import pyarrow.json as pj
import pyarrow.parquet as pq
import pytest
import torch

import finesift
from finesift.cli import main
from finesift.errors import InputError, OptionError
from finesift.store import export as export_mod
from finesift.store.export import parse_export

SHAREGPT = [
    {"id": "sg-0", "conversations": [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "what is one plus one"},
        {"from": "gpt", "value": "two"},
        {"from": "human", "value": "and two plus two"},
        {"from": "gpt", "value": "four"}]},
    {"id": "sg-1", "conversations": [  # a last user turn with no reply after it
        {"from": "human", "value": "name a dog"},
        {"from": "gpt", "value": "rex"},
        {"from": "human", "value": "thanks"}]},
]
CSV_ROWS = [{"id": f"csv-{i}", "prompt": f"how many cats {i}", "completion": f"{i} cats"}
            for i in range(3)]
DS_ROWS = [{"messages": [{"role": "user", "content": f"sing song {i}"},
                         {"role": "assistant", "content": "la la"}], "lang": "en"}
           for i in range(2)]


def turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in pairs]


# the records every format is checked against, by id
MESSAGES = {
    "sg-0": turns(("system", "be brief"), ("user", "what is one plus one"), ("assistant", "two"),
                  ("user", "and two plus two"), ("assistant", "four")),
    "sg-1": turns(("user", "name a dog"), ("assistant", "rex"), ("user", "thanks")),
    **{f"csv-{i}": turns(("user", f"how many cats {i}"), ("assistant", f"{i} cats"))
       for i in range(3)},
    # the Dataset is the pool's third input: source pool-2, ids pool-2:ROW
    **{f"pool-2:{i}": turns(("user", f"sing song {i}"), ("assistant", "la la")) for i in range(2)},
}
PROMPT_COMPLETION = {
    "sg-0": (MESSAGES["sg-0"][:4], [MESSAGES["sg-0"][4]]),
    "sg-1": (MESSAGES["sg-1"][:1], [MESSAGES["sg-1"][1]]),  # the turn after the reply is left out
    **{k: (v[:1], v[1:]) for k, v in MESSAGES.items() if not k.startswith("sg")},
}


@pytest.fixture
def mixed(tmp_path: Path, write_jsonl, lm_data) -> dict[str, Any]:
    """A pool of ShareGPT JSONL, CSV prompt/completion rows and a Dataset of messages."""
    import csv

    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", SHAREGPT)
    csv_path = tmp_path / "pc.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "prompt", "completion"])
        w.writeheader()
        w.writerows(CSV_ROWS)
    ds = datasets.Dataset.from_list(DS_ROWS)
    return {"pool": {"sharegpt": sharegpt, "csv": csv_path, "ds": ds}, "target": lm_data.target}


def select_mixed(mixed: dict[str, Any], model: Path, out: Path, **kw: Any):
    pool = mixed["pool"]
    # every record selected (budget = pool), in the random method's order
    return finesift.select([pool["sharegpt"], pool["csv"], pool["ds"]], mixed["target"],
                           budget=7, method="random", model=str(model), out=out, **kw)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def scores_by_id(out: Path) -> dict[str, float]:
    table = pq.read_table(out / "scores.parquet").to_pydict()
    return dict(zip(table["id"], table["score"], strict=True))


# --------------------------------------------------------------------------- formats


def test_messages_export_is_uniform_over_a_mixed_pool(mixed, tiny_lm_dir: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "out"
    sel = select_mixed(mixed, tiny_lm_dir, out, export="messages")
    rows = read_jsonl(out / "selected_messages.jsonl")
    # every record, best first, as in selected.jsonl
    assert [r["id"] for r in rows] == sel.selected_ids and len(rows) == 7
    score = scores_by_id(out)
    for row in rows:
        assert list(row) == ["messages", "id", "source", "score"]
        assert row["messages"] == MESSAGES[row["id"]]
        assert row["score"] == score[row["id"]]
    assert {r["source"] for r in rows} == {str(mixed["pool"]["sharegpt"]),
                                           str(mixed["pool"]["csv"]), "pool-2"}
    # one table: Arrow reads the file with a single schema
    table = pj.read_json(out / "selected_messages.jsonl")
    assert table.column_names == ["messages", "id", "source", "score"]
    assert str(table.schema.field("messages").type) == \
        "list<item: struct<role: string, content: string>>"
    # selected.jsonl is as it always was: the rows as read
    assert read_jsonl(out / "selected.jsonl")[0] != rows[0]
    man = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert man["exports"] == {"messages": {"path": "selected_messages.jsonl", "rows": 7,
                                           "columns": ["messages", "id", "source", "score"]}}
    assert list(man).index("exports") == list(man).index("selected") + 1


def test_prompt_completion_export_splits_at_the_last_reply(mixed, tiny_lm_dir: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "out"
    sel = select_mixed(mixed, tiny_lm_dir, out, export="prompt-completion")
    rows = read_jsonl(out / "selected_prompt_completion.jsonl")
    assert [r["id"] for r in rows] == sel.selected_ids
    for row in rows:
        assert list(row) == ["prompt", "completion", "id", "source", "score"]
        prompt, completion = PROMPT_COMPLETION[row["id"]]
        assert (row["prompt"], row["completion"]) == (prompt, completion)
        assert completion[0]["role"] == "assistant" and len(completion) == 1
    pj.read_json(out / "selected_prompt_completion.jsonl")  # one schema


def test_datasets_export_is_the_messages_rows_on_disk(mixed, tiny_lm_dir: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "out"
    select_mixed(mixed, tiny_lm_dir, out, export=["datasets", "messages"])
    ds = datasets.load_from_disk(str(out / "selected_dataset"))
    assert ds.column_names == ["messages", "id", "source", "score"]
    assert ds.to_list() == read_jsonl(out / "selected_messages.jsonl")
    man = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert list(man["exports"]) == ["messages", "datasets"]
    assert man["exports"]["datasets"]["path"] == "selected_dataset"
    assert not [p for p in out.iterdir() if p.name.startswith(".selected")]  # no temp left


def test_text_records_are_one_assistant_turn_and_have_no_prompt(lm_data, tiny_lm_dir: Path,
                                                                tmp_path: Path) -> None:
    sel = finesift.select(lm_data.pool[0], lm_data.target, budget=3, method="random",
                          model=str(tiny_lm_dir), out=tmp_path / "text", export="messages")
    rows = read_jsonl(tmp_path / "text" / "selected_messages.jsonl")
    assert [r["messages"] for r in rows] == [
        [{"role": "assistant", "content": r.text}] for r in sel.selected]
    # prompt-completion cannot split a text record: refused before any work is done
    with pytest.raises(InputError, match=r"pool_text.jsonl:1: --export prompt-completion: a "
                                         r"text record has no prompt to split off; export "
                                         r"text records with --export messages"):
        finesift.select(lm_data.pool, lm_data.target, budget=3, method="tov",
                        model=str(tiny_lm_dir), out=tmp_path / "pc",
                        export="prompt-completion")
    assert not (tmp_path / "pc").exists()


def test_ner_exports_tokens_and_tags_or_says_why_not(tmp_path: Path, write_jsonl,
                                                     tiny_ner_dir: Path) -> None:
    rows = [{"id": f"s{i}", "tokens": ["john", "went", "to", "paris"],
             "tags": ["B-PER", "O", "O", "B-LOC"]} for i in range(4)]
    pool = write_jsonl(tmp_path / "ner.jsonl", rows)
    sel = finesift.select(pool, pool, budget=2, method="random", task="ner",
                          model=str(tiny_ner_dir), out=tmp_path / "out", export="datasets")
    ds = datasets.load_from_disk(str(tmp_path / "out" / "selected_dataset"))
    assert ds.column_names == ["tokens", "tags", "id", "source", "score"]
    assert ds["id"] == sel.selected_ids
    assert ds[0]["tokens"] == ["john", "went", "to", "paris"]
    assert ds[0]["tags"] == ["B-PER", "O", "O", "B-LOC"]
    with pytest.raises(InputError, match=r"ner.jsonl:1: --export messages: NER records \(tokens "
                                         r"\+ tags\) have no chat form; export them with "
                                         r"--export datasets"):
        finesift.select(pool, pool, budget=2, method="random", task="ner",
                        model=str(tiny_ner_dir), out=tmp_path / "bad", export="messages")


@pytest.mark.parametrize(("value", "expected"), [
    (None, ()), ("", ()), ([], ()), ("messages", ("messages",)),
    ("datasets,messages", ("messages", "datasets")),
    (["prompt_completion", "messages", "messages"], ("messages", "prompt-completion")),
])
def test_parse_export(value, expected) -> None:
    assert parse_export(value) == expected


def test_export_option_errors(lm_data, tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="--export 'jsonl': unknown format; choose from "
                                          "messages, prompt-completion, datasets"):
        finesift.select(lm_data.pool, lm_data.target, budget=2, method="random",
                        out=tmp_path, export="jsonl")
    with pytest.raises(OptionError, match=r"--export messages writes files: give an output "
                                          r"folder \(--out\)"):
        finesift.select(lm_data.pool, lm_data.target, budget=2, method="random",
                        export="messages")


# --------------------------------------------------------------------------- writing


def test_a_rerun_without_export_removes_the_old_exports(mixed, tiny_lm_dir: Path,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "out"
    select_mixed(mixed, tiny_lm_dir, out, export="messages,datasets")
    assert (out / "selected_messages.jsonl").is_file() and (out / "selected_dataset").is_dir()
    select_mixed(mixed, tiny_lm_dir, out, export="datasets")
    assert not (out / "selected_messages.jsonl").exists()
    assert (out / "selected_dataset").is_dir()
    select_mixed(mixed, tiny_lm_dir, out)
    assert not (out / "selected_dataset").exists()
    assert "exports" not in json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def test_a_failed_export_leaves_no_outputs_that_look_whole(mixed, tiny_lm_dir: Path,
                                                           tmp_path: Path,
                                                           monkeypatch) -> None:
    def full_disk(self, path: str, *args: Any, **kwargs: Any) -> None:
        Path(path).mkdir(parents=True)  # half a folder, then the disk is full
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", full_disk)
    out = tmp_path / "out"
    with pytest.raises(OptionError, match="No space left on device"):
        select_mixed(mixed, tiny_lm_dir, out, export="messages,datasets")
    # the files written before the failure are removed, the half folder never had the
    # final name and is gone too: nothing looks like a finished run
    assert sorted(p.name for p in out.iterdir() if p.name != ".work") == []


def test_cli_export_and_config(mixed, tiny_lm_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    pool = mixed["pool"]
    rc = main(["select", "--pool", str(pool["sharegpt"]), str(pool["csv"]), "--target",
               str(mixed["target"]), "--out", str(out), "--model", str(tiny_lm_dir),
               "--no-progress", "--budget", "3", "--method", "random",
               "--export", "messages", "prompt-completion"])
    assert rc == 0, capsys.readouterr().err
    assert len(read_jsonl(out / "selected_prompt_completion.jsonl")) == 3
    cfg = (out / "config.yaml").read_text(encoding="utf-8")
    assert "export:\n- messages\n- prompt-completion\n" in cfg
    rc = main(["select", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "again"),
               "--no-progress"])
    assert rc == 0
    assert (tmp_path / "again" / "selected_messages.jsonl").read_text() == \
        (out / "selected_messages.jsonl").read_text()


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("fmt", ["messages", "prompt-completion"])
def test_trl_sft_trainer_trains_on_the_export(fmt: str, mixed, tiny_lm_dir: Path,
                                             tmp_path: Path) -> None:
    trl = pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sel"
    select_mixed(mixed, tiny_lm_dir, out, export=fmt)
    rows = read_jsonl(out / export_mod.FILES[fmt])
    train = datasets.Dataset.from_list(rows)
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    before = [p.detach().clone() for p in model.parameters()]
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=2,
                         per_device_train_batch_size=2, learning_rate=1e-2, report_to="none",
                         save_strategy="no", logging_steps=1, use_cpu=True, bf16=False,
                         max_length=64, disable_tqdm=True, seed=0)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    result = trainer.train()
    assert result.global_step == 2 and math.isfinite(result.training_loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # TRL read the rows as conversations: the chat template's tokens are in the sequence
    first = trainer.train_dataset[0]
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert start in first["input_ids"]
    learned = [label != -100 for label in first["labels"]]
    if fmt == "prompt-completion":  # the loss is on the completion only
        assert 0 < sum(learned) < len(learned) and not learned[0]
    else:
        assert all(learned)


# --------------------------------------------------------------------------- the README


def readme_python_example() -> str:
    """The Python example of the README's "Use" section, as written there."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    use = readme.split("\n## Use\n", 1)[1]
    return use.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_python_example_runs_as_written(tiny_lm_dir: Path, tmp_path: Path,
                                                   monkeypatch, write_jsonl,
                                                   capsys) -> None:
    from conftest import NOISE_WORDS, PATTERN

    code = readme_python_example()
    assert 'export="messages"' in code and "datasets.load_dataset(" in code
    model_line = 'MODEL = "smollm2-135m"'
    assert code.count(model_line) == 1  # the one line the test changes: the model
    code = code.replace(model_line, f"MODEL = {str(tiny_lm_dir)!r}")
    # the files it reads, in this test's own folder (the Hugging Face cache too)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    rng = __import__("random").Random(0)
    pool = [{"query": "please continue the sequence" if i % 4 == 0 else "say something",
             "response": " ".join(PATTERN[:8] if i % 4 == 0 else rng.sample(NOISE_WORDS, 8))}
            for i in range(40)]
    write_jsonl(tmp_path / "pool.jsonl", pool)
    write_jsonl(tmp_path / "target.jsonl", [
        {"prompt": "please continue the sequence", "completion": " ".join(PATTERN[:8])}] * 3)
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 -- the README's example
    sel, train = namespace["sel"], namespace["train"]
    assert len(sel.selected) == 4  # 10% of 40
    assert f"{sel.selected_ids[:10]}" in capsys.readouterr().out
    assert {r.source for r in sel.pool} == {"pool-0"}
    assert train.column_names == ["messages", "id", "source", "score"]
    assert train["id"] == sel.selected_ids
    assert train[0]["messages"] == [
        {"role": "user", "content": sel.selected[0].raw["query"]},
        {"role": "assistant", "content": sel.selected[0].raw["response"]}]
    assert (tmp_path / "runs" / "first" / "selected_messages.jsonl").is_file()
