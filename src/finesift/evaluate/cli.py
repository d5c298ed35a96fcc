"""The ``finesift eval`` and ``finesift bench`` subcommands (registered by ``finesift.cli``)."""

from __future__ import annotations

import argparse
from typing import Any


def register_eval_commands(sub: Any) -> None:
    """Add ``eval``, ``bench`` and ``bench-data`` to the ``finesift`` subparsers ``sub``."""
    p = sub.add_parser("eval", help="fine-tune on a subset and measure test loss (F1 / EM)")
    p.add_argument("--train", nargs="+", required=True, help="training file(s), e.g. selected.jsonl")
    p.add_argument("--test", nargs="+", required=True, help="test file(s)")
    p.add_argument("--task", choices=["lm", "ner"], default="lm")
    p.set_defaults(func=lambda args: _not_ready(args))


def _not_ready(args: argparse.Namespace) -> int:  # replaced below as the harness lands
    from finesift.errors import FinesiftError

    raise FinesiftError(f"'{args.command}' is not available yet")
