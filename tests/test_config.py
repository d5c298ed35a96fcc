"""The one typed configuration (finesift.config): help on every option, LoRA declared once,
the API keywords and the CLI flags derived from the same fields, and a run's config.yaml
that runs again to the same selection."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from finesift.config import (
    LoraFields,
    RunConfig,
    check_choice,
    describe,
    docstring_help,
    from_mapping,
    option,
)
from finesift.errors import FinesiftError, InputError, OptionError


def _all_option_classes():
    from finesift.evaluate.auto import AutoOptions
    from finesift.evaluate.finetune import FinetuneOptions
    from finesift.methods import available

    classes = {f"method {name}": cls.Options for name, cls in available().items()}
    classes.update({"auto": AutoOptions, "finetune": FinetuneOptions, "run": RunConfig})
    return classes


def test_every_option_has_a_type_a_default_and_help() -> None:
    missing = []
    for owner, cls in _all_option_classes().items():
        for info in describe(cls):
            if len(info.help.split()) < 2 or info.required or not info.type:
                missing.append(f"{owner}.{info.name}")
    assert not missing, f"options without help, type or default: {missing}"


def test_lora_fields_are_declared_once_and_reach_the_adapter() -> None:
    from finesift.methods import available
    from finesift.methods.base import options_from_dict

    lora = {f.name for f in dataclasses.fields(LoraFields)}
    for name in ("tov", "less", "tracin", "harp", "harp-c", "harp-e"):
        cls = available()[name].Options
        assert issubclass(cls, LoraFields), name
        assert not lora & set(vars(cls).get("__annotations__", {})), f"{name} redeclares LoRA"
        opts = options_from_dict(available()[name], {"lora_rank": "8", "lora_dropout": 0})
        adapter = opts.lora()
        assert (adapter.rank, adapter.alpha, adapter.dropout) == (8, 32, 0.0)


def test_select_keywords_are_the_run_config_fields() -> None:
    """The API is derived from RunConfig: same names, same defaults (plus the two
    in-process-only keywords progress and log)."""
    from finesift.api import select

    params = inspect.signature(select).parameters
    fields = {i.name: i.default for i in describe(RunConfig)}
    assert set(params) - {"progress", "log"} == set(fields)
    for name, default in fields.items():
        if name in ("pool", "target"):
            assert params[name].default is inspect.Parameter.empty
            continue
        want = None if default in ({}, []) else default
        assert params[name].default == want, name


def test_select_flags_are_generated_from_the_run_config() -> None:
    from finesift.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    select_parser = sub.choices["select"]
    dests = {a.dest for a in select_parser._actions}
    cli_fields = {i.name for i in describe(RunConfig) if i.cli}
    assert cli_fields <= dests
    fmt = next(a for a in select_parser._actions if a.dest == "fmt")
    assert fmt.option_strings == ["--format"] and "parquet" in fmt.choices


def test_from_mapping_converts_and_names_bad_values() -> None:
    @dataclass
    class Opts:
        """Test options.

        Attributes:
            rounds: how many.
        """

        rounds: int = 3
        rate: float = option(0.5, "a rate", minimum=0.0)
        mode: str = option("a", "a mode", choices=("a", "b"))
        cap: int | None = option(None, "an optional cap")
        on: bool = option(False, "a flag")

    def make(values):
        return from_mapping(Opts, values, shown=lambda k, v: f"opt {k}={v!r}",
                            unknown=lambda bad, known: f"unknown {bad}; known {known}")

    got = make({"rounds": "4", "rate": "1e-3", "cap": "7", "on": "yes"})
    assert (got.rounds, got.rate, got.cap, got.on) == (4, 1e-3, 7, True)
    assert make({"cap": None}).cap is None
    with pytest.raises(OptionError, match=r"opt rounds='x' is not a number"):
        make({"rounds": "x"})
    with pytest.raises(OptionError, match=r"opt rounds=2.5: expected an integer"):
        make({"rounds": 2.5})
    with pytest.raises(OptionError, match=r"opt mode='c': expected one of a, b"):
        make({"mode": "c"})
    with pytest.raises(OptionError, match=r"opt rate=-1.0: expected at least 0"):
        make({"rate": -1})
    with pytest.raises(OptionError, match=r"unknown \['roundz'\]"):
        make({"roundz": 1})


def test_check_choice_returns_a_choice_and_names_a_bad_value() -> None:
    assert check_choice("b", ("a", "b"), "opt: mode") == "b"
    with pytest.raises(OptionError, match=r"^opt: mode must be one of a, b, got 'c'$"):
        check_choice("c", ("a", "b"), "opt: mode")
    with pytest.raises(ValueError, match=r"^level must be one of 1, 2, got 3$") as info:
        check_choice(3, (1, 2), "level", error=ValueError)
    assert not isinstance(info.value, OptionError)


def test_docstring_help_reads_google_attributes() -> None:
    @dataclass
    class Base:
        """Base.

        Attributes:
            a: first line
                continued here.
        """

        a: int = 1

    @dataclass
    class Child(Base):
        """Child.

        Attributes:
            b, c: shared text.
            d: own (with: a colon).

        Returns nothing.
        """

        b: int = 2
        c: int = 3
        d: int = 4

    assert docstring_help(Child) == {"a": "first line continued here.", "b": "shared text.",
                                     "c": "shared text.", "d": "own (with: a colon)."}


def test_methods_name_prints_each_options_help(capsys) -> None:
    from finesift.cli import main

    assert main(["methods", "dsir"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dsir ")
    assert "num_buckets = 10000  (int)" in out
    assert "hash buckets of the n-gram features" in out
    assert "tov " not in out
    assert main(["methods", "nope"]) == 2
    assert "unknown method nope; available methods: auto," in capsys.readouterr().err


def test_run_config_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "run.yaml"
    bad.write_text("pool: [a.jsonl]\nbudgett: 5\n")
    with pytest.raises(InputError, match=r"run.yaml.*unknown run option\(s\) budgett"):
        RunConfig.from_yaml(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(InputError, match="expected a mapping"):
        RunConfig.from_yaml(bad)
    bad.write_text("seed: [1\n")
    with pytest.raises(InputError, match="not valid YAML"):
        RunConfig.from_yaml(bad)


def test_config_yaml_runs_again_to_the_same_selection(lm_data, tmp_path: Path, capsys) -> None:
    """A run's config.yaml, given to `finesift select --config`, makes the same selection;
    a flag given beside it overrides the file."""
    from finesift.cli import main

    out = tmp_path / "first"
    argv = ["select", "--pool", *map(str, lm_data.pool), "--target", str(lm_data.target),
            "--out", str(out), "--budget", "12", "--method", "dsir", "-o", "sampling=top",
            "--seed", "3", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method"] == "dsir" and saved["method_options"]["sampling"] == "top"
    assert saved["budget"] == "12" and saved["seed"] == 3
    assert all(Path(p).is_absolute() for p in saved["pool"] + saved["target"])

    again = tmp_path / "again"
    assert main(["select", "--config", str(out / "config.yaml"), "--out", str(again),
                 "--no-progress"]) == 0, capsys.readouterr().err
    first = (out / "selected.jsonl").read_text()
    assert first and (again / "selected.jsonl").read_text() == first
    man = json.loads((again / "manifest.json").read_text())
    assert man["seed"] == 3 and man["method_options"]["sampling"] == "top"

    other = tmp_path / "other"
    assert main(["select", "--config", str(out / "config.yaml"), "--out", str(other),
                 "--budget", "5", "--no-progress"]) == 0
    assert len((other / "selected.jsonl").read_text().splitlines()) == 5


def test_a_config_without_pool_says_what_is_missing(tmp_path: Path, capsys) -> None:
    from finesift.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: dsir\nbudget: 5\n")
    assert main(["select", "--config", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "required: --pool, --target, --out" in err
    with pytest.raises(FinesiftError):
        from finesift.cli import build_parser, run_config

        run_config(build_parser().parse_args(["select", "--config", str(cfg)]))
