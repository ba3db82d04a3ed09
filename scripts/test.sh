#!/usr/bin/env bash
# The test suite: installs what it needs into .venv, then runs pytest (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
export KERAS_BACKEND=tensorflow TF_CPP_MIN_LOG_LEVEL=2
# the import layers of pyproject.toml ([tool.importlinter]) before the tests
.venv/bin/lint-imports --no-cache
# two pytest-xdist workers (CVT_TEST_WORKERS; 0 runs in this process): most of the suite's time is Python and graph
# building, not the two cores' arithmetic, so two workers halve it on a 2-core machine. --dist loadfile keeps each
# test file on one worker, so a file's module fixtures (checkpoints, exports, training runs) are built once, not
# once per worker; the session's transformers references are shared through tests/conftest.py. --durations=30 puts
# the slowest tests in every log
exec .venv/bin/python -m pytest -n "${CVT_TEST_WORKERS:-2}" --dist loadfile --durations=30 "$@"
