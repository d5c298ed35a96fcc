"""``report.html`` next to a selection's outputs: written by every select (and merge),
self-contained, with the run, the plots, the composition, the best and last selected
examples (escaped) and the duplicate and contamination counts; a failure to draw it loses
nothing else; and it renders in headless Chromium where one is installed."""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import finesift
from finesift.data.records import Record
from finesift.store import select_report

CHROMIUM = Path("/usr/bin/chromium")


class _Page(HTMLParser):
    """The ids, image sources and table rows of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.images: list[str] = []
        self.external: list[str] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs) -> None:
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.images.append(a.get("src", ""))
        for key in ("src", "href"):
            if a.get(key) and not a[key].startswith("data:"):
                self.external.append(a[key])
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    return p


@pytest.fixture(scope="module")
def run_dir(lm_data, tiny_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("report") / "run"
    sel = finesift.select(lm_data.pool, lm_data.target, budget=12, method="random",
                          model=str(tiny_lm_dir), out=out, dedup=True)
    return out, sel


def test_report_is_written_with_its_sections_and_counts(run_dir) -> None:
    out, sel = run_dir
    page = (out / "report.html").read_text(encoding="utf-8")
    man = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    doc = parse(page)
    assert {"composition", "top", "bottom", "dedup", "dedup-counts",
            "contamination-counts", "plots-status"} <= doc.ids
    # two plots, embedded PNGs; nothing loaded from elsewhere
    assert len(doc.images) == 2 and doc.external == []
    for src in doc.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # the run
    assert "<b>method</b>: random" in page
    assert f"<b>model</b>: {sel.manifest['model']['name']}" in page
    assert "<b>budget</b>: 12 = 12 examples" in page
    assert f"<b>selected</b>: 12 of {len(sel.pool)} pool examples" in page
    # the composition table: pool and selection counts per source, as the manifest has them
    by_source = man["selected"]["by_source"]
    comp = {r[1]: r for r in doc.rows if len(r) == 6 and r[1] != "path"}
    assert set(comp) == {r.source for r in sel.pool}
    for src, row in comp.items():
        assert row[4] == str(by_source.get(src, 0))
        assert row[2] == str(sum(r.source == src for r in sel.pool))
    # the best and the last five selected, in selection order, with their scores
    ranked = [r for r in doc.rows if len(r) == 5 and r[0].isdigit()]
    assert [r[2] for r in ranked] == sel.selected_ids[:5] + sel.selected_ids[-5:]
    assert [r[0] for r in ranked] == [str(i) for i in (1, 2, 3, 4, 5, 8, 9, 10, 11, 12)]
    score_of = dict(zip([r.id for r in sel.pool], sel.scores, strict=True))
    assert ranked[0][1] == f"{score_of[sel.selected_ids[0]]:+.5f}"
    # dedup (lm_data's planted records repeat 3 patterns) and contamination counts
    d = man["dedup"]
    assert d["dropped"] > 0
    counts = re.sub(r"<[^>]+>", "", page.split('id="dedup-counts">')[1].split("</p>")[0])
    assert f"{d['duplicates']} in {d['groups']} group(s)" in counts
    assert f"{d['dropped']} dropped" in counts
    cont = re.sub(r"<[^>]+>", "", page.split('id="contamination-counts"')[1].split("</p>")[0])
    assert f"{man['contamination']['contaminated']} of 12" in cont


def _columns(records: list[Record], scores: list[float], chosen: list[int]) -> dict:
    rank = np.full(len(records), -1)
    rank[chosen] = np.arange(len(chosen))
    return {"id": [r.id for r in records], "source": [r.source for r in records],
            "score": np.array(scores), "selection_rank": rank}


def test_texts_are_escaped_and_truncated() -> None:
    evil = "<script>alert('x')</script> & " + "word " * 200
    records = [Record(id=f"r{i}", source="p.jsonl", row=i, shape="text", raw={},
                      text=evil if i == 0 else f"plain {i}") for i in range(3)]
    manifest = {"method": "<b>m</b>", "budget": {"requested": "2", "count": 2},
                "model": {"name": "x"}}
    page = select_report.render(_columns(records, [3.0, 2.0, 1.0], [0, 1]), manifest,
                                records[:2])
    assert "<script>alert" not in page and "<b>m</b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; word" in page
    row = next(r for r in parse(page).rows if r and r[2] == "r0")
    assert row[4].endswith(" ...") and len(row[4]) == select_report.TEXT_CHARS + 4
    # no duplicate check recorded: said so
    assert "No duplicate check was recorded" in page


def test_a_failure_to_draw_loses_no_other_output(lm_data, tiny_lm_dir: Path, tmp_path: Path,
                                                 monkeypatch, caplog) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.html").write_text("an earlier run's report")

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(select_report, "plot_histogram", broken)
    with caplog.at_level(logging.WARNING, logger="finesift"):
        sel = finesift.select(lm_data.pool, lm_data.target, budget=5, method="random",
                              model=str(tiny_lm_dir), out=out)
    assert len(sel.selected) == 5
    for name in ("scores.parquet", "selected.jsonl", "manifest.json", "config.yaml"):
        assert (out / name).is_file(), name
    assert not (out / "report.html").exists()  # not the stale one either
    warned = [r.getMessage() for r in caplog.records if r.name == "finesift.report"]
    assert len(warned) == 1 and "could not write" in warned[0]
    assert "RuntimeError: no fonts" in warned[0]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_report_renders_in_chromium(run_dir, tmp_path: Path) -> None:
    out, _ = run_dir

    def render(page: Path) -> tuple[str, str]:
        proc = subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
             f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120, check=False)
        return proc.stdout, proc.stderr

    dom, log = render(out / "report.html")
    assert [line for line in log.splitlines() if ":CONSOLE" in line] == []
    assert 'data-plots-loaded="2"' in dom
    assert "2 of 2 plots rendered" in dom
    # the check can fail: a corrupt plot is not counted
    broken = tmp_path / "broken.html"
    broken.write_text((out / "report.html").read_text().replace("base64,iVBOR", "base64,XXXX", 1))
    dom, _ = render(broken)
    assert 'data-plots-loaded="1"' in dom
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
