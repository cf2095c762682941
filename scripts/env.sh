#!/usr/bin/env bash
# Creates (once) and activates the project's virtual environment in .venv, with the CPU build of
# torch 2.13.0 on machines without CUDA, and builds fastbert._C. Source it: `. scripts/env.sh`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FASTBERT_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.fastbert-deps"
if [ ! -f "$stamp" ] || [ "$root/requirements-dev.txt" -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip setuptools wheel
  if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q torch==2.13.0  # pinned: the CPU wheel; an open range can pull a CUDA build
  fi
  python -m pip install -q -r "$root/requirements-dev.txt"
  touch "$stamp"
fi
(cd "$root" && python -m pip install -q --no-build-isolation --no-deps -e .)
set +euo pipefail
