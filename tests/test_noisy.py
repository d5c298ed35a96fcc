"""The instruct-gsm8k-noisy suite: consistent corruption of GSM8K solutions, its share and
determinism, and the suite's data (val/test identical to instruct-gsm8k's)."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import yaml

from finesift.evaluate.gsm8k_noise import (
    ANNOTATION,
    Slip,
    SlipRejected,
    apply_slip,
    candidate_slips,
    corrupt_answer,
    corrupt_answer_simple,
    corrupt_pool,
    final_answer,
    format_number,
    parse_number,
    safe_eval,
)

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

QUESTION = ("Janet's ducks lay 16 eggs per day. She eats 3 for breakfast every morning and "
            "bakes muffins with 4. She sells the rest at $2 per egg. How much does she make "
            "in 10 weeks?")
# every step's first operand is the previous step's result
ANSWER = ("Janet has 16 - 3 - 4 = <<16-3-4=9>>9 eggs left each day.\n"
          "She makes 9 * 2 = $<<9*2=18>>18 every day.\n"
          "In a week she makes 18 * 7 = $<<18*7=126>>126.\n"
          "In 10 weeks she makes 126 * 10 = $<<126*10=1260>>1,260.\n"
          "#### 1260")
PROSE_NUMBER = re.compile(r"(?<![\w.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w])")


def _mask(text: str) -> str:
    """The answer with every number and + / - blanked: its format."""
    return re.sub(r"[\d.,]+", "#", text).replace("+", "±").replace("-", "±")


def _assert_consistent(original: str, corrupted: str) -> None:
    """Every annotation is right for its operands, the prose copies each expression and
    its result, each step's first operand is the previous result (the chain of ANSWER)
    except at the slip (the first changed step: a miscopied operand is a possible slip),
    the final answer is the last result (as in the original), and it changed."""
    assert _mask(corrupted) == _mask(original)
    steps = list(ANNOTATION.finditer(corrupted))
    before = ANNOTATION.findall(original)
    assert len(steps) == len(before)
    slip = next(i for i, m in enumerate(steps) if m.groups() != before[i])
    results = []
    for i, m in enumerate(steps):
        expr, res = m.group(1), m.group(2)
        value = safe_eval(expr)
        assert value == parse_number(res), m.group(0)
        operands = [Fraction(t) for t in re.findall(r"\d+(?:\.\d+)?", expr)]
        line_start = corrupted.rfind("\n", 0, m.start()) + 1
        prose = [parse_number(t) for t in PROSE_NUMBER.findall(corrupted[line_start:m.start()])]
        assert prose[-len(operands):] == operands, "the prose copies the expression"
        shown = PROSE_NUMBER.match(corrupted, m.end())
        assert shown is not None and parse_number(shown.group(0)) == value
        if results and i != slip:
            assert operands[0] == results[-1], "each step uses the previous result"
        results.append(value)
    assert final_answer(corrupted) == results[-1]
    assert final_answer(corrupted) != final_answer(original)
    assert re.search(r"\n#### \d+\Z", corrupted)


# --------------------------------------------------------------------------- arithmetic


def test_safe_eval_is_exact_and_refuses_anything_but_arithmetic() -> None:
    assert safe_eval("16-3-4") == 9
    assert safe_eval("(2+3)*4/8") == Fraction(5, 2)
    assert safe_eval(".5*3") == Fraction(3, 2) and safe_eval("0.1+0.2") == Fraction(3, 10)
    assert safe_eval("-48+21+(-3)") == -30
    for bad in ("__import__('os')", "2**10", "x+1", "1 if 1 else 2", "(1).real", "3/0",
                "[1]", "1;2", "", "True+1", "2 // 3", "1e3"):
        with pytest.raises(ValueError):
            safe_eval(bad)


def test_numbers_keep_their_style() -> None:
    assert format_number(Fraction(130010), "130,000") == "130,010"
    assert format_number(Fraction(1260), "1260") == "1260"
    assert format_number(Fraction(3, 4), ".5") == ".75"
    assert format_number(Fraction(3, 2), "1.50") == "1.50"
    assert format_number(Fraction(16), "15.00") == "16.00"
    assert parse_number("80,000") == 80000 and parse_number(".5") == Fraction(1, 2)


# --------------------------------------------------------------------------- one answer


def test_a_slipped_operand_propagates_to_the_end() -> None:
    out = apply_slip(QUESTION, ANSWER, Slip(0, "operand", 2, Fraction(1)))
    assert out == ("Janet has 16 - 3 - 5 = <<16-3-5=8>>8 eggs left each day.\n"
                   "She makes 8 * 2 = $<<8*2=16>>16 every day.\n"
                   "In a week she makes 16 * 7 = $<<16*7=112>>112.\n"
                   "In 10 weeks she makes 112 * 10 = $<<112*10=1120>>1,120.\n"
                   "#### 1120")
    _assert_consistent(ANSWER, out)


def test_a_flipped_sign_propagates_to_the_end() -> None:
    out = apply_slip(QUESTION, ANSWER, Slip(0, "operator", 0))
    assert out.startswith("Janet has 16 + 3 - 4 = <<16+3-4=15>>15 eggs")
    assert out.endswith("15 * 2 = $<<15*2=30>>30 every day.\n"
                        "In a week she makes 30 * 7 = $<<30*7=210>>210.\n"
                        "In 10 weeks she makes 210 * 10 = $<<210*10=2100>>2,100.\n"
                        "#### 2100")
    _assert_consistent(ANSWER, out)


def test_every_accepted_slip_is_consistent() -> None:
    slips = candidate_slips(ANSWER, np.random.default_rng(0))
    accepted = []
    for slip in slips:
        try:
            out = apply_slip(QUESTION, ANSWER, slip)
        except SlipRejected:
            continue
        _assert_consistent(ANSWER, out)
        accepted.append(slip)
    assert len(accepted) >= 10
    assert {s.step for s in accepted} == {0, 1, 2, 3}  # a slip anywhere reaches the end
    for seed in range(20):
        out = corrupt_answer(QUESTION, ANSWER, np.random.default_rng(seed))
        assert out is not None
        _assert_consistent(ANSWER, out)


def test_a_result_stated_before_its_calculation_changes_too() -> None:
    question = "A quilt uses 11 small squares of 3 square feet and 8 medium ones of 4."
    answer = ("The small shirts give 33 square feet because 11 x 3 = <<11*3=33>>33\n"
              "The medium shirts give 32 square feet because 8 x 4 = <<8*4=32>>32\n"
              "The quilt is 65 square feet because 33 + 32 = <<33+32=65>>65\n"
              "#### 65")
    out = apply_slip(question, answer, Slip(0, "operand", 0, Fraction(1)))
    assert out == ("The small shirts give 36 square feet because 12 x 3 = <<12*3=36>>36\n"
                   "The medium shirts give 32 square feet because 8 x 4 = <<8*4=32>>32\n"
                   "The quilt is 68 square feet because 36 + 32 = <<36+32=68>>68\n"
                   "#### 68")


def test_slips_that_cannot_be_carried_consistently_are_refused() -> None:
    q = "Tom has 7 boxes of 6 pens and gives 2 away."
    # the final answer is computed outside any annotation: a slip would not reach it
    loose = "Tom has 7 * 6 = <<7*6=42>>42 pens.\nHe keeps 42 - 2 = 40 pens.\n#### 40"
    assert corrupt_answer(q, loose, np.random.default_rng(0)) is None
    # no annotations at all
    assert corrupt_answer(q, "He keeps 7 * 6 - 2 = 40 pens.\n#### 40",
                          np.random.default_rng(0)) is None
    # a changed result would be confused with the question's 6
    with pytest.raises(SlipRejected):
        apply_slip("Tom has 2 boxes of 3 pens and 6 pencils.",
                   "He has 2 * 3 = <<2*3=6>>6 pens.\nSo 6 + 6 = <<6+6=12>>12.\n#### 12",
                   Slip(0, "operand", 0, Fraction(1)))
    # a division that no longer comes out whole
    with pytest.raises(SlipRejected):
        apply_slip("7 friends share 21 apples.",
                   "Each gets 21 / 7 = <<21/7=3>>3 apples.\n#### 3",
                   Slip(0, "operand", 0, Fraction(1)))


def test_the_fallback_changes_the_final_statement_and_answer() -> None:
    answer = "The difference is 50% - 25% = 25%.\n#### 25"
    out = corrupt_answer_simple(answer, np.random.default_rng(0))
    new = final_answer(out)
    assert new != 25 and abs(new - 25) <= 2
    assert out == f"The difference is 50% - 25% = {new}%.\n#### {new}"
    annotated = "So 7*2=<<7*2=14>>14 in all.\n#### 14"
    out = corrupt_answer_simple(annotated, np.random.default_rng(0))
    new = final_answer(out)
    assert new != 14 and out == f"So 7*2=<<7*2={new}>>{new} in all.\n#### {new}"


# --------------------------------------------------------------------------- a pool


def _synthetic_pool(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b, c = 11 + i, 5 + i % 7, 3 + i % 4
        if i % 3 == 2:  # no annotations: never corrupted consistently
            ans = (f"She has {a} + {b} = {a + b} cards, then {(a + b) * c} in all.\n"
                   f"#### {(a + b) * c}")
        else:
            ans = (f"She has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} cards.\n"
                   f"Then {a + b} * {c} = <<{a + b}*{c}={(a + b) * c}>>{(a + b) * c} in all.\n"
                   f"#### {(a + b) * c}")
        rows.append({"id": f"p-{i}", "question": f"Q{i}: {a} cards, {b} more, {c} times?",
                     "answer": ans})
    return rows


def test_the_pool_is_corrupted_at_the_share_in_every_block_deterministically() -> None:
    rows = _synthetic_pool(123)
    a = corrupt_pool(rows, seed=0)
    assert a == corrupt_pool(rows, seed=0)  # deterministic for a seed
    b = corrupt_pool(rows, seed=1)
    flags = [r["corrupted"] for r in a]
    assert {r["id"] for r in a if r["corrupted"]} != {r["id"] for r in b if r["corrupted"]}
    assert sum(flags) == round(0.4 * 123) == 49
    assert [sum(flags[s:s + 50]) for s in (0, 50, 100)] == [20, 20, 9]
    for orig, row in zip(rows, a, strict=True):
        assert row["id"] == orig["id"] and row["question"] == orig["question"]
        assert isinstance(row["corrupted"], bool)
        if not row["corrupted"]:
            assert row["answer"] == orig["answer"]
            continue
        assert final_answer(row["answer"]) != final_answer(orig["answer"])
        assert _mask(row["answer"]) == _mask(orig["answer"])
        assert "<<" in orig["answer"]  # enough consistent candidates: the fallback unused
        for m in ANNOTATION.finditer(row["answer"]):
            assert safe_eval(m.group(1)) == parse_number(m.group(2))


def test_a_block_short_of_candidates_is_filled_by_the_fallback() -> None:
    rows = [r for i, r in enumerate(_synthetic_pool(150)) if i % 3 == 2]  # no annotations
    out = corrupt_pool(rows, seed=0)
    assert sum(r["corrupted"] for r in out) == 20 == round(0.4 * len(rows))
    for orig, row in zip(rows, out, strict=True):
        if row["corrupted"]:
            assert final_answer(row["answer"]) != final_answer(orig["answer"])
            assert re.search(r"\n#### \d+\Z", row["answer"])


# --------------------------------------------------------------------------- the suite


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    pytest.importorskip("finesift.bundled")
    from finesift.evaluate.suites import build_suite_data

    root = tmp_path_factory.mktemp("noisy")
    try:
        build_suite_data("instruct-gsm8k", root / "plain")
        build_suite_data("instruct-gsm8k-noisy", root / "noisy" / "data")
    except Exception as exc:  # noqa: BLE001 - the data packages are optional
        pytest.skip(f"bundled data unavailable: {exc}")
    return root / "plain", root / "noisy" / "data"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.mark.real
def test_noisy_suite_keeps_val_and_test_and_corrupts_40_percent(built) -> None:
    plain, noisy = built
    for name in ("gsm8k_val", "gsm8k_test", "gsm8k_pool", "sharegpt"):
        assert (noisy / f"{name}.jsonl").read_bytes() == (plain / f"{name}.jsonl").read_bytes()
    pool, rows = _rows(plain / "gsm8k_pool.jsonl"), _rows(noisy / "gsm8k_pool_noisy.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in pool]
    flags = [r["corrupted"] for r in rows]
    assert all(isinstance(f, bool) for f in flags)
    assert sum(flags) == round(0.4 * len(rows)) and sum(flags[:50]) == 20
    n_changed_steps = 0
    for orig, row in zip(pool, rows, strict=True):
        assert row["question"] == orig["question"]
        if not row["corrupted"]:
            assert row["answer"] == orig["answer"]
            continue
        assert final_answer(row["answer"]) != final_answer(orig["answer"])
        assert _mask(row["answer"]) == _mask(orig["answer"])
        before = ANNOTATION.findall(orig["answer"])
        after = ANNOTATION.findall(row["answer"])
        for old, new in zip(before, after, strict=True):
            if old != new:  # every rewritten step is right for its operands
                n_changed_steps += 1
                assert safe_eval(new[0]) == parse_number(new[1])
    assert n_changed_steps >= sum(flags)


@pytest.mark.real
def test_noisy_records_read_with_their_flag_and_the_config_loads(built, tmp_path) -> None:
    from finesift.data.readers import read_file
    from finesift.evaluate import bench

    _, noisy = built
    recs = read_file(noisy / "gsm8k_pool_noisy.jsonl")
    assert {r.shape for r in recs} == {"prompt_completion"}
    assert sum(r.raw["corrupted"] is True for r in recs) == round(0.4 * len(recs))

    raw = yaml.safe_load((BENCHMARKS / "instruct-gsm8k-noisy.yaml").read_text())
    plain = yaml.safe_load((BENCHMARKS / "instruct-gsm8k.yaml").read_text())
    assert raw["flags"] == ["corrupted"]
    assert raw["target"] == plain["target"]
    assert raw["pool"] == [{"name": "sharegpt", "path": "data/sharegpt.jsonl", "limit": 150},
                           {"name": "gsm8k-noisy", "path": "data/gsm8k_pool_noisy.jsonl",
                            "limit": 100}]
    for key in ("task", "model", "max_length"):
        assert raw[key] == plain[key]
    if "flags" not in bench.OPTIONAL_KEYS:  # the harness learns `flags` separately
        del raw["flags"]
    cfg_path = noisy.parent / "instruct-gsm8k-noisy.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = bench.load_config(cfg_path)
    data = bench.prepare_data(cfg, tmp_path / "out")
    assert len(data.test) == raw["target"]["test_limit"] == 150 and len(data.val) == 64
    noisy_pool = [r for r in data.pool if data.source_of.get(r.source) == "gsm8k-noisy"]
    assert len(noisy_pool) == 100 and sum(r.raw["corrupted"] is True for r in noisy_pool) == 40
