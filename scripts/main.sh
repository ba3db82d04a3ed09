#!/usr/bin/env bash
# The main job: installs the library into .venv, then trains a CvT on the handwritten digits set shipped with
# scikit-learn, converts it to the other framework and prints validation accuracy in both and their top-1
# agreement (extra arguments go to `cvt train`, e.g. --data DIR --framework keras).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh all
export KERAS_BACKEND=tensorflow TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/cvt train "$@"
