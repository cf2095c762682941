#!/usr/bin/env bash
# The plain install path, as a user of the field runs it: an environment that already holds its own
# torch, then `pip install .` with build isolation on (pip picks the torch that builds fastbert._C:
# the newest, today 2.14.1, a CUDA build, so with nvcc present the CUDA kernels are built too), then
# `python -m pytest` from the repository root on the csrc tests, which must run on the installed,
# compiled extension (FASTBERT_REQUIRE_EXTENSION=1: no silent fallback to the reference), and a
# benchmark smoke run. The default environment torch, 2.13.0 CPU (a local wheel on the project's
# machines), differs from the build torch in version and in kind: the stable ABI has to carry the CPU
# ops across, and the CUDA module (fastbert._C_cuda) must stay out of the way.
#
# FASTBERT_PLAIN_VENV   the environment (default /tmp/fastbert-plain; made anew each run)
# FASTBERT_PLAIN_TORCH  the torch the environment starts with (default torch==2.13.0)
. "$(dirname "$0")/venv_lib.sh"  # strict mode, cd to the repository root, fresh_venv
venv="${FASTBERT_PLAIN_VENV:-/tmp/fastbert-plain}"
torch_spec="${FASTBERT_PLAIN_TORCH:-torch==2.13.0}"
py="$venv/bin/python"
t0=$(date +%s)
fresh_venv "$venv" "$torch_spec"
t1=$(date +%s)
echo "== plain install: $torch_spec in a fresh venv ($(( t1 - t0 )) s); pip install '.[test,bench]'"
"$py" -m pip install -q ".[test,bench]"
t2=$(date +%s)
echo "== pip install took $(( t2 - t1 )) s"
(cd "$venv" && "$py" -m fastbert.info)
export FASTBERT_REQUIRE_EXTENSION=1
"$py" -m pytest -q -p no:cacheprovider tests/test_csrc_abi.py tests/test_embed.py tests/test_mlm_mask.py \
  tests/test_packaging.py
# the benchmark command users run, on the C++ ops only (CPU), timed briefly
"$py" -m pytest -q -p no:cacheprovider benchmarks/ --benchmark-only -k "embed or mlm" \
  --benchmark-max-time=0.05 --benchmark-min-rounds=1
echo "== plain install path: $(( $(date +%s) - t0 )) s in all"
