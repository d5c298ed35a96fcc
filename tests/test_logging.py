"""finesift logs through :mod:`logging` (the ``finesift`` logger and its children): a run's
messages go to a ``log`` callable when one is given, else to the logger (warnings at
WARNING); the command line writes them to stderr as they are, ``-q`` keeps only warnings and
``-v`` adds debug messages."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import finesift
from finesift.cli import main
from finesift.logs import as_log, emit, is_warning

WARNING = "warning: skipped 1 pool record(s) while reading"  # lm_data's reply-less chat
INFO = "the pool holds"  # lm_data's planted records repeat: reported, not dropped
DEBUG = "dedup: 80 texts"  # finesift.dedup's detail


def test_warnings_are_told_from_the_rest() -> None:
    assert is_warning("warning: skipped 2 records")
    assert is_warning("harp: warning: every leaf is larger than the budget")
    assert is_warning("auto [tov, fold 1/2, seed 0]: warning: skipped 1 pool record(s)")
    assert not is_warning("tov: round 1/2 trained")
    assert not is_warning("warnings: none")
    mine = []
    assert as_log(mine.append) == mine.append and as_log(None) is emit


def run_cli(lm_data, model: Path, out: Path, capsys, *flags: str, before: tuple = ()) -> str:
    rc = main([*before, "select", "--method", "random", "--pool", *map(str, lm_data.pool),
               "--target", str(lm_data.target), "--model", str(model), "--budget", "5",
               "--out", str(out), "--no-progress", *flags])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "selected 5 of 80 pool examples" in captured.out  # stdout never changes
    return captured.err


def test_cli_quiet_and_verbose(lm_data, tiny_lm_dir: Path, tmp_path: Path, capsys) -> None:
    logger = logging.getLogger("finesift")
    before = (logger.level, list(logger.handlers))

    err = run_cli(lm_data, tiny_lm_dir, tmp_path / "default", capsys)
    assert f"\n{WARNING}" in f"\n{err}" and f"\n{INFO}" in f"\n{err}"  # as before: no prefix
    assert DEBUG not in err

    err = run_cli(lm_data, tiny_lm_dir, tmp_path / "quiet", capsys, "-q")
    assert WARNING in err
    assert INFO not in err and DEBUG not in err

    err = run_cli(lm_data, tiny_lm_dir, tmp_path / "verbose", capsys, "--verbose")
    assert WARNING in err and INFO in err and DEBUG in err
    assert "wrote " in err and "report.html" in err  # finesift.report's debug line

    # before the subcommand too
    err = run_cli(lm_data, tiny_lm_dir, tmp_path / "quiet2", capsys, before=("-q",))
    assert WARNING in err and INFO not in err

    # the command leaves the logger as it found it
    assert (logger.level, list(logger.handlers)) == before
    with pytest.raises(SystemExit):
        main(["select", "-q", "-v"])  # one or the other
    assert "not allowed with argument" in capsys.readouterr().err


def test_api_log_callable_or_logger(lm_data, tiny_lm_dir: Path, caplog) -> None:
    messages: list[str] = []
    with caplog.at_level(logging.DEBUG, logger="finesift"):
        finesift.select(lm_data.pool, lm_data.target, budget=5, method="random",
                        model=str(tiny_lm_dir), log=messages.append)
    assert any(m.startswith(WARNING) for m in messages)
    assert any(m.startswith(INFO) for m in messages)
    # a callable receives the run's messages instead of the logger (nothing twice) ...
    assert not [r for r in caplog.records if r.name == "finesift"]
    assert any(r.name == "finesift.dedup" and r.levelno == logging.DEBUG for r in caplog.records)
    caplog.clear()
    # ... and without one they go to the logger, warnings at WARNING
    with caplog.at_level(logging.INFO, logger="finesift"):
        finesift.select(lm_data.pool, lm_data.target, budget=5, method="random",
                        model=str(tiny_lm_dir))
    got = {r.getMessage().split(" (")[0][:40]: r.levelno for r in caplog.records
           if r.name == "finesift"}
    assert logging.WARNING in got.values() and logging.INFO in got.values()
    assert all(level == logging.WARNING for msg, level in got.items()
               if msg.startswith("warning:"))
    assert all(level == logging.INFO for msg, level in got.items()
               if not msg.startswith("warning:"))
