"""Near-duplicate detection in the pool (``--dedup``) and the contamination warning
(target examples that are also in the pool): planted exact and near duplicates are found,
``--dedup`` keeps the first of each group and scores nothing else, the manifest counts
them, and contamination names the planted target/pool pairs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

import finesift
from finesift.cli import main
from finesift.data.dedup import find_contamination, find_duplicates, jaccard, normalise, shingles
from finesift.errors import OptionError
from finesift.testing import BASE_WORDS

WORDS = [w for w in BASE_WORDS if w.isalpha()]


def sentence(rng: np.random.Generator, n: int = 40) -> str:
    return " ".join(rng.choice(WORDS, n))


def one_word_changed(text: str, at: int = 20) -> str:
    words = text.split()
    words[at] = "zebra" if words[at] != "zebra" else "yak"
    return " ".join(words)


# -------------------------------------------------------------------------- the finder


def test_planted_exact_and_near_duplicates_are_found() -> None:
    rng = np.random.default_rng(0)
    texts = [sentence(rng) for _ in range(30)]
    texts[7] = "  " + texts[2].upper().replace(" ", "\n  ")  # exact up to case and spaces
    texts[12] = one_word_changed(texts[4])  # near: one word of 40 changed
    texts[20] = one_word_changed(texts[12], at=30)  # near both 12 and 4
    texts[25] = texts[12]  # an exact copy of a near duplicate
    found = find_duplicates(texts, 0.8)

    assert found.representative == {7: 2, 12: 4, 20: 4, 25: 4}
    assert found.exact == {7}  # 25 repeats 12, not its kept representative 4
    assert found.groups == {2: [7], 4: [12, 20, 25]}
    assert found.kept == [i for i in range(30) if i not in (7, 12, 20, 25)]
    # the reported similarity is the exact Jaccard of the shingle sets, above the threshold
    sh = [shingles(normalise(t)) for t in texts]
    assert found.similarity[7] == 1.0
    for i in (12, 20):
        assert found.similarity[i] == pytest.approx(jaccard(sh[i], sh[4]))
        assert 0.8 <= found.similarity[i] < 1.0
    # the unrelated random sentences are far below the threshold
    assert max(jaccard(sh[0], sh[j]) for j in range(1, 6)) < 0.5


def test_the_threshold_decides_near_duplicates_and_exact_ones_always_count() -> None:
    rng = np.random.default_rng(1)
    a = sentence(rng, 30)
    words = a.split()
    b = " ".join(words[:24] + list(rng.choice(WORDS, 6)))  # 2/3 of the shingles shared
    sim = jaccard(shingles(normalise(a)), shingles(normalise(b)))
    assert 0.6 < sim < 0.78
    assert find_duplicates([a, b], 0.8).representative == {}
    assert find_duplicates([a, b], sim - 0.05).representative == {1: 0}
    # exact duplicates, even of tiny or empty texts and at threshold 1
    tiny = ["ok", "OK ", "", "  ", "fine", a, a.title()]
    found = find_duplicates(tiny, 1.0)
    assert found.representative == {1: 0, 3: 2, 6: 5}
    assert found.exact == {1, 3, 6}
    with pytest.raises(OptionError, match="dedup-threshold 0: expected a Jaccard"):
        find_duplicates(tiny, 0)
    for bad in (1.5, 0.3, True, "0.8"):
        with pytest.raises(OptionError, match="expected a Jaccard similarity from 0.5 to 1"):
            find_duplicates(tiny, bad)


def test_contamination_names_every_pool_copy_of_a_target() -> None:
    rng = np.random.default_rng(2)
    pool = [sentence(rng) for _ in range(50)]
    pool[30] = pool[10].upper()  # a second copy of pool 10
    target = [pool[10], one_word_changed(pool[40]), sentence(rng), pool[5] + " "]
    assert find_contamination(pool, target, 0.8) == {0: [10, 30], 1: [40], 3: [5]}
    assert find_contamination(pool, [sentence(rng)], 0.8) == {}


# -------------------------------------------------------------------------- in a run


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory, write_jsonl):
    """Two pool files with planted duplicates (inside and across files, across record
    shapes) and a target with two examples that are in the pool."""
    rng = np.random.default_rng(3)
    folder = tmp_path_factory.mktemp("dedup")
    texts = [sentence(rng, 30) for _ in range(24)]
    a = [{"id": f"a{i}", "text": t} for i, t in enumerate(texts[:12])]
    a[5]["text"] = a[1]["text"].upper()  # exact duplicate of a1
    a[9]["text"] = one_word_changed(a[3]["text"], at=15)  # near duplicate of a3
    b = [{"id": f"b{i}", "prompt": " ".join(t.split()[:10]), "completion": " ".join(t.split()[10:])}
         for i, t in enumerate(texts[12:])]
    # the text of a7, as a prompt/completion record in the other file: exact duplicate
    b[4] = {"id": "b4", "prompt": " ".join(a[7]["text"].split()[:10]),
            "completion": " ".join(a[7]["text"].split()[10:])}
    pool = [write_jsonl(folder / "pool_a.jsonl", a), write_jsonl(folder / "pool_b.jsonl", b)]
    def split(text: str) -> dict[str, str]:
        return {"prompt": " ".join(text.split()[:10]), "completion": " ".join(text.split()[10:])}

    near_b8 = one_word_changed(f"{b[8]['prompt']} {b[8]['completion']}")
    target = write_jsonl(folder / "target.jsonl", [
        {"id": "t-copy", **split(a[2]["text"])},  # a2's text, as prompt and completion
        {"id": "t-near", **split(near_b8)},  # b8 with one word changed
        {"id": "t-new", **split(sentence(rng, 30))},
    ])
    return pool, target


def test_dedup_keeps_one_of_each_group_and_counts_them(planted, tiny_lm_dir: Path,
                                                       tmp_path: Path) -> None:
    pool, target = planted
    messages: list[str] = []
    sel = finesift.select(pool, target, budget="50%", method="random", model=str(tiny_lm_dir),
                          out=tmp_path / "out", dedup=True, log=messages.append)
    dropped = {"a5", "a9", "b4"}
    all_ids = [f"a{i}" for i in range(12)] + [f"b{i}" for i in range(12)]
    kept = [i for i in all_ids if i not in dropped]
    assert [r.id for r in sel.pool] == kept
    table = pq.read_table(tmp_path / "out" / "scores.parquet").to_pydict()
    assert table["id"] == kept  # the duplicates were not scored
    assert len(sel.selected) == round(len(kept) / 2)  # the budget counts the deduped pool
    assert not dropped & set(sel.selected_ids)

    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    d = man["dedup"]
    assert (d["enabled"], d["threshold"], d["pool_examples"], d["groups"], d["duplicates"],
            d["exact_duplicates"], d["near_duplicates"], d["dropped"], d["kept"]) == (
        True, 0.8, 24, 3, 3, 2, 1, 3, 21)
    pairs = {(p["kept"], p["duplicate"]) for p in d["example_pairs"]}
    assert pairs == {("a1", "a5"), ("a3", "a9"), ("a7", "b4")}
    assert "dedup" in man["stages"]
    assert any(m.startswith("dedup: dropped 3 duplicate(s) in 3 group(s) (2 exact, 1 near")
               for m in messages)

    # contamination: the planted target/pool pairs, named in the manifest and a warning
    c = man["contamination"]
    assert c["pairs"] == {"t-copy": ["a2"], "t-near": ["b8"]}
    assert (c["contaminated"], c["target_examples"], c["pool_examples"]) == (2, 3, 2)
    warning = next(m for m in messages if m.startswith("warning: 2 of 3 target"))
    assert "t-copy ~ a2" in warning and "t-near ~ b8" in warning

    # config.yaml runs again with the same options
    cfg = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert (cfg["dedup"], cfg["dedup_threshold"]) == (True, 0.8)


def test_without_dedup_nothing_is_dropped_but_everything_is_reported(
        planted, tiny_lm_dir: Path, caplog) -> None:
    pool, target = planted
    with caplog.at_level(logging.INFO, logger="finesift"):
        sel = finesift.select(pool, target, budget=5, method="random", model=str(tiny_lm_dir))
    assert len(sel.pool) == 24
    d = sel.manifest["dedup"]
    assert (d["enabled"], d["duplicates"], d["groups"], d["dropped"], d["kept"]) == (
        False, 3, 3, 0, 24)
    assert sel.manifest["contamination"]["pairs"] == {"t-copy": ["a2"], "t-near": ["b8"]}
    # without a log callable the messages go to the "finesift" logger
    levels = {r.getMessage().split(":")[0]: r.levelno for r in caplog.records
              if r.name == "finesift"}
    assert levels["warning"] == logging.WARNING  # the contamination warning
    assert any(r.levelno == logging.INFO and "--dedup keeps one of each group" in r.getMessage()
               for r in caplog.records)


def test_cli_dedup_flags(planted, tiny_lm_dir: Path, tmp_path: Path, capsys) -> None:
    pool, target = planted
    out = tmp_path / "cli"
    rc = main(["select", "--method", "random", "--pool", *map(str, pool), "--target",
               str(target), "--model", str(tiny_lm_dir), "--budget", "4", "--out", str(out),
               "--dedup", "--dedup-threshold", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    man = json.loads((out / "manifest.json").read_text())
    # at threshold 1 the one-word change is no longer a duplicate, nor a contamination
    assert (man["dedup"]["threshold"], man["dedup"]["dropped"]) == (1.0, 2)
    assert man["contamination"]["pairs"] == {"t-copy": ["a2"]}
    assert "warning: 1 of 3 target example(s) also appear in the pool" in err
    rc = main(["select", "--method", "random", "--pool", *map(str, pool), "--target",
               str(target), "--model", str(tiny_lm_dir), "--budget", "4", "--out", str(out),
               "--dedup-threshold", "0", "--no-progress"])
    assert rc == 2
    assert ("finesift: error: --dedup-threshold 0.0: expected a Jaccard similarity from 0.5 "
            "to 1") in capsys.readouterr().err
