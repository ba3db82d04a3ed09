#!/usr/bin/env bash
# Create .venv (once) and install the project with the extras named in $1, pinned by constraints.txt.
# Re-running is cheap: the install is skipped while pyproject.toml and constraints.txt are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=".venv/.installed-${extras}-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "installing cvt-dual[${extras}] into .venv (pinned by constraints.txt) ..." >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    # constraints.txt keeps torch on its CPU build and the oracle on transformers 4.57.6; pyproject.toml stays open.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[${extras}]"
    touch "$stamp"
fi
