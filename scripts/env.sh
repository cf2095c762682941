#!/usr/bin/env bash
# Creates (once) and activates the project's virtual environment in .venv, with the CPU build of
# torch 2.13.0 on machines without CUDA, and builds fastbert._C (again only when setup.py,
# pyproject.toml or csrc/ changed). Source it: `. scripts/env.sh`.
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
# the editable install and fastbert._C again only when what they are built from changed: a stamp of
# this checkout's path, setup.py, pyproject.toml, csrc/ and the torch version (pip takes ~50 s even when
# nothing changed)
build_key="$(cd "$root" && {
  echo "$root"
  python -c "import torch; print(torch.__version__)" 2>/dev/null || echo "no torch"
  find setup.py pyproject.toml csrc -type f -print0 | sort -z | xargs -0 sha256sum
} | sha256sum | cut -d' ' -f1)"
build_stamp="$venv/.fastbert-build"
if [ "$(cat "$build_stamp" 2>/dev/null)" != "$build_key" ] || ! ls "$root"/fastbert/_C*.so >/dev/null 2>&1 \
   || ! (cd / && python -c "import sys, fastbert; sys.exit(fastbert.__file__ != sys.argv[1])" \
         "$root/fastbert/__init__.py" 2>/dev/null); then
  (cd "$root" && python -m pip install -q --no-build-isolation --no-deps -e .)
  echo "$build_key" > "$build_stamp"
fi
set +euo pipefail
