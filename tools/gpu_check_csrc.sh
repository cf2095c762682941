#!/usr/bin/env bash
# Device check of the C++/CUDA ops (one call on a GPU machine): build fastbert._C with its CUDA
# kernels, check that C++ errors reach Python, run the op tests and the op benchmarks.
# Usage: bash tools/gpu_check_csrc.sh OUTDIR
set -u -o pipefail
OUT=${1:-/tmp/out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=1
unset FASTBERT_BACKEND TRITON_INTERPRET
t0=$(date +%s)
build() {
  if ! python3 -m pip install --no-build-isolation --no-deps --no-index -v -e . >"$OUT/build.log" 2>&1; then
    grep -E "error|Error" "$OUT/build.log" | head -60
    exit 1
  fi
  echo "build: $(( $(date +%s) - t0 ))s"
}
repro() {
  local bad=0
  for c in "mlm vocab 0 (mlm_args check)" "mlm bad id (check_ids)" "embed 1-D ids (embed_args)" \
           "embed bad id (check_ids_cpu)"; do
    python3 tools/csrc_error_check.py "$c" 2>&1 | tail -4 || true
    python3 tools/csrc_error_check.py "$c" >/dev/null 2>&1 || bad=1
  done
  return $bad
}
build
grep "fastbert setup" "$OUT/build.log"
ldd fastbert/_C*.so | grep -E "stdc|gomp|gcc_s"
# C++ errors must reach Python as ValueError (a statically linked libstdc++ made them segfault)
repro || echo "REPRO FAILED: an op error crashed the interpreter"
python3 -c "import torch; from fastbert import _ext; print('CUDA kernels', _ext.has_cuda(), _ext.cuda_load_error, torch.cuda.get_device_name())"
timeout 150 python3 -m pytest -q -rfEs -p no:cacheprovider tests/test_embed.py tests/test_mlm_mask.py \
  -k "not bad_inputs" 2>&1 | tee "$OUT/tests.log" | grep -vE "^\s*$" | tail -25
timeout 60 python3 -m pytest -q -rfEs -p no:cacheprovider tests/test_embed.py tests/test_mlm_mask.py \
  -k "bad_inputs and cuda" 2>&1 | tee "$OUT/tests_bad.log" | grep -vE "^\s*$" | tail -12
timeout 150 python3 -m pytest -q -p no:cacheprovider benchmarks/bench_embed.py benchmarks/bench_mlm_mask.py \
  --benchmark-only --benchmark-columns=median,rounds --benchmark-group-by=group \
  --benchmark-json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
python3 - "$OUT/bench.json" <<'PY'
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    e = b["extra_info"]
    print(f"{b['name']:55s} {b['stats']['median']*1e3:9.3f} ms  gbps={e.get('gbps', 0):7.1f}  "
          f"frac={e.get('roofline_frac', 0):.3f}  gpu_ms={e.get('gpu_median_ms', 0):.3f}")
PY
echo "total: $(( $(date +%s) - t0 ))s"
