#!/usr/bin/env bash
# One build, several torch versions. Builds fastbert once, as a wheel, against the torch of the build
# python (fastbert._C is on the LibTorch stable ABI, target 2.10), then installs that same wheel, without
# rebuilding, into one virtual environment per other torch and runs the csrc tests there from the
# repository root (the root conftest.py makes them test the installed copy).
#
#   bash tools/abi_check.sh                      # runtime torch==2.14.1
#   bash tools/abi_check.sh torch==2.14.1 torch==2.11.0
#   bash tools/abi_check.sh /path/to/python3.12:torch==2.14.1   # another CPython too (the wheel is abi3)
#
# FASTBERT_ABI_BUILD_PY  python whose torch builds the wheel (default .venv/bin/python: torch 2.13.0 CPU)
# FASTBERT_ABI_WORK      scratch folder for the wheel and the environments (default /tmp/fastbert-abi);
#                        an environment made by an earlier run is reused (a CUDA torch is GBs)
# Prints one line per torch: which torch ran the tests and which torch built the module.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
build_py="${FASTBERT_ABI_BUILD_PY:-$root/.venv/bin/python}"
work="${FASTBERT_ABI_WORK:-/tmp/fastbert-abi}"
specs=("$@")
[ "${#specs[@]}" -gt 0 ] || specs=("torch==2.14.1")
mkdir -p "$work"
rm -rf "$work/wheel"
echo "== build once with $("$build_py" -c 'import torch; print("torch", torch.__version__)')"
start=$(date +%s)
"$build_py" -m pip wheel -q --no-build-isolation --no-deps -w "$work/wheel" "$root"
wheel=$(ls "$work"/wheel/fastbert-*.whl)
echo "   $(basename "$wheel") in $(( $(date +%s) - start )) s"
status=0
summary=()
for spec in "${specs[@]}"; do
  interp=python3
  if [[ "$spec" == *:* ]]; then interp="${spec%%:*}"; spec="${spec#*:}"; fi
  pyver=$("$interp" -c 'import sys; print(f"py{sys.version_info[0]}.{sys.version_info[1]}")')
  name="${spec//==/-}"
  [ "$interp" = python3 ] || name="$name-$pyver"
  env="$work/${name//[^A-Za-z0-9.-]/_}"
  echo "== $spec on $pyver ($env)"
  if [ ! -x "$env/bin/python" ]; then
    "$interp" -m venv "$env"
    "$env/bin/python" -m pip install -q "$spec"
  fi
  # the same wheel file, no rebuild; its dependencies are already met by the torch above
  "$env/bin/python" -m pip install -q --force-reinstall --no-deps "$wheel"
  "$env/bin/python" -m pip install -q "$wheel" pytest
  # (from outside the checkout: `python -c` would import the checkout's fastbert/)
  versions=$(cd "$work" && "$env/bin/python" -c 'import sys, torch, fastbert._C as C; print(f"ran under torch {torch.__version__} on Python {sys.version.split()[0]}, built with torch {C.built_with_torch()}, ABI target {C.abi_target()}")')
  echo "   $versions"
  rc=0
  FASTBERT_REQUIRE_EXTENSION=1 "$env/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_csrc_abi.py tests/test_embed.py tests/test_mlm_mask.py || rc=$?
  summary+=("$spec: rc=$rc; $versions")
  [ "$rc" = 0 ] || status=1
done
echo "== summary"
printf '%s\n' "${summary[@]}"
exit "$status"
