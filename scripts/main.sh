#!/usr/bin/env bash
# The main job: installs the library into .venv, then builds a CvT-13, moves its weights to every format of the
# other framework and prints how closely the two frameworks agree (extra arguments go to `cvt demo`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh all
export KERAS_BACKEND=tensorflow TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/cvt demo "$@"
