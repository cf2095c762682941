#!/usr/bin/env bash
# Sets everything up (.venv, dependencies, the C++ extension) and runs the main job: BERT pretraining
# (MLM + NSP) on the corpus embedded in the package. Extra arguments go to `fastbert pretrain`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
set -euo pipefail
python -m fastbert pretrain "$@"
