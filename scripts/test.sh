#!/usr/bin/env bash
# Install lorakit with its test dependencies into .venv and run lint + the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh train,serve,test
ruff check .
ruff format --check .
python -m pytest "$@"
