#!/usr/bin/env bash
# The main job on a fresh machine: install lorakit with the embedded default model, then run `lorakit train`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh train
lorakit train "$@"
