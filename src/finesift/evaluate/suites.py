"""Data for the benchmark suites shipped in ``benchmarks/``."""

from __future__ import annotations

SUITES: dict[str, str] = {}
