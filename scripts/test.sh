#!/usr/bin/env bash
# Sets everything up (.venv, dependencies, the C++ extension) and runs lint and the test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
set -euo pipefail
python -m fastbert.info
ruff check .
python -m pytest tests/ -q "$@"
# the benchmark suite once, untimed, so it cannot rot (exit 5 = nothing collected)
rc=0; python -m pytest benchmarks/ -q --benchmark-disable || rc=$?
[ "$rc" = 0 ] || [ "$rc" = 5 ] || exit "$rc"
