#!/usr/bin/env bash
# One-command GPU run: build the extension, run the whole test suite on CUDA, the benchmark suite,
# and the report. Usage (from anywhere): bash benchmarks/gpu_run.sh OUTDIR
#
# Meant for a fresh GPU machine with torch, triton, nvcc, pytest, pytest-benchmark, transformers,
# tokenizers and matplotlib installed and no network; python3 is the interpreter that has torch.
# If the repo holds a folder .whl/ (wheels carried along, e.g. bert-pytorch), they are installed
# into a --target folder put on PYTHONPATH.
#
# Every stage has a timeout and the whole run a budget (GPU_RUN_BUDGET_S, default 480 s): a stage
# gets min(its own limit, what the budget leaves after reserving time for the stages after it).
# A stage that fails or times out does not stop the later ones; statuses are printed at the end.
# OUTDIR receives at most 8 files (the device tool returns no more):
#   build.log (pip build, nvidia-smi, python -m fastbert.info), tests.log (both test stages),
#   junit.xml (the CUDA test files),
#   bench.log, bench.json, RESULTS.md, throughput_vs_seq.png, roofline.png
# Knobs: GPU_RUN_BUDGET_S, GPU_RUN_TEST_WORKERS (pytest-xdist workers for tests/, default 4, 0 = off),
#   FASTBERT_BENCH_ROUNDS (timed rounds per benchmark, default 15), PYTHON (default python3).
set -u -o pipefail

if [ $# -lt 1 ]; then
  echo "usage: bash benchmarks/gpu_run.sh OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

PY=${PYTHON:-python3}
BUDGET=${GPU_RUN_BUDGET_S:-480}
WORKERS=${GPU_RUN_TEST_WORKERS:-4}
START=$(date +%s)
export PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export FASTBERT_BENCH_ROUNDS=${FASTBERT_BENCH_ROUNDS:-15}
unset TRITON_INTERPRET FASTBERT_BACKEND  # compiled kernels, default dispatch

STAGES=()
record() {  # record NAME STATUS SECONDS
  STAGES+=("$(printf '%-10s %-22s %5ss' "$1" "$2" "$3")")
}

elapsed() { echo $(( $(date +%s) - START )); }

# stage_limit MAX RESERVE: seconds this stage may use
stage_limit() {
  local left=$(( BUDGET - $(elapsed) - $2 ))
  if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}

# run_stage NAME MAX RESERVE LOG -- command...: runs under timeout (SIGINT first, so pytest still
# writes its JSON/XML), appends to LOG, records the status
run_stage() {
  local name=$1 max=$2 reserve=$3 log=$4
  shift 5
  local limit
  limit=$(stage_limit "$max" "$reserve")
  if [ "$limit" -lt 10 ]; then
    record "$name" "skipped (no time left)" 0
    echo "== $name: skipped, budget spent" >>"$log"
    return 1
  fi
  echo "== $name (limit ${limit}s): $*" >>"$log"
  echo "[$(elapsed)s] $name: started (limit ${limit}s, log $(basename "$log"))"
  local t0 rc
  t0=$(date +%s)
  timeout -s INT -k 20 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ "$rc" -eq 0 ]; then
    record "$name" "ok" "$dt"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    record "$name" "TIMEOUT after ${limit}s" "$dt"
  else
    record "$name" "FAILED (rc=$rc)" "$dt"
  fi
  echo "== $name: rc=$rc in ${dt}s" >>"$log"
  echo "[$(elapsed)s] $name: rc=$rc in ${dt}s"
  return "$rc"
}

echo "gpu_run: repo $ROOT, output $OUT, budget ${BUDGET}s"

# --- carried wheels (bert-pytorch) ------------------------------------------------------------
if ls .whl/*.whl >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/fastbert-site .whl/*.whl >"$OUT/build.log" 2>&1; then
    export PYTHONPATH=/tmp/fastbert-site${PYTHONPATH:+:$PYTHONPATH}
    record wheels ok 0
  else
    record wheels "FAILED" 0
  fi
else
  echo "no .whl/ folder: nothing carried" >"$OUT/build.log"
  record wheels "none carried" 0
fi

# --- build -------------------------------------------------------------------------------------
{ echo "== nvidia-smi"; nvidia-smi 2>&1; echo "== nvcc"; nvcc --version 2>&1 | tail -2; } >>"$OUT/build.log"
run_stage build 180 150 "$OUT/build.log" -- \
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
run_stage info 60 150 "$OUT/build.log" -- "$PY" -m fastbert.info

# --- tests on CUDA -------------------------------------------------------------------------------
# The files that run CUDA code first, the ones whose results matter most on top (whole model, csrc
# CPU == CUDA identity, kernels against the reference); the CPU-only files (data, training loops,
# reference ops, report), which CI runs on every change, come after the benchmarks in stage
# tests-cpu with whatever budget is left. One attention config per kernel
# (FASTBERT_ATTN_AUTOTUNE=0): the tests check results, not speed, and autotuning every test shape
# would spend the stage compiling.
XDIST=()
if [ "$WORKERS" -gt 0 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then
  XDIST=(-n "$WORKERS" --dist loadfile)
fi
GPU_TESTS=(tests/test_fused_block.py tests/test_hf_inputs.py tests/test_hf_patch.py
           tests/test_graphs.py tests/test_packing.py tests/test_model_fused.py tests/test_embed.py tests/test_mlm_mask.py tests/test_attention.py
           tests/test_layer_norm.py tests/test_bias_gelu.py tests/test_geglu.py tests/test_rotary.py
           tests/test_train_heads.py::test_linear_cross_entropy_bf16_autocast
           tests/test_train_pretrain.py::test_pretrain_on_cuda tests/test_dispatch.py tests/test_csrc_nvcc.py)
CPU_TESTS=()
for f in tests/test_*.py; do
  case " ${GPU_TESTS[*]} " in *" $f "*) ;; *) CPU_TESTS+=("$f") ;; esac
done
: >"$OUT/tests.log"
run_stage tests 150 120 "$OUT/tests.log" -- env FASTBERT_ATTN_AUTOTUNE=0 \
  "$PY" -m pytest "${GPU_TESTS[@]}" -q -rfEs -p no:cacheprovider "${XDIST[@]}" --junitxml="$OUT/junit.xml"

# --- benchmarks ----------------------------------------------------------------------------------
# The pretraining step first (issue 12: padded, packed, packed + CUDA graph against HF and
# bert_pytorch; the graphed provider runs under torch.cuda.set_sync_debug_mode("warn"), so a sync in
# the replayed step shows in bench.log), then the rest; the two JSON files are merged into bench.json.
: >"$OUT/bench.log"
PRE_LIMIT=$(stage_limit 150 120)
export FASTBERT_BENCH_BUDGET_S=$(( PRE_LIMIT > 60 ? PRE_LIMIT - 30 : PRE_LIMIT / 2 + 1 ))
run_stage bench-pre 150 120 "$OUT/bench.log" -- \
  "$PY" -m pytest benchmarks/bench_pretrain.py --benchmark-only --benchmark-json "$OUT/bench-pretrain.json" \
  -q -rfEs -p no:cacheprovider --benchmark-columns=median,iqr,rounds --benchmark-group-by=group
BENCH_LIMIT=$(stage_limit 240 30)
export FASTBERT_BENCH_BUDGET_S=$(( BENCH_LIMIT > 60 ? BENCH_LIMIT - 30 : BENCH_LIMIT / 2 + 1 ))
run_stage bench 240 30 "$OUT/bench.log" -- \
  "$PY" -m pytest benchmarks/ --ignore=benchmarks/bench_pretrain.py --benchmark-only \
  --benchmark-json "$OUT/bench.json" -q -rfEs \
  -p no:cacheprovider --benchmark-columns=median,iqr,rounds --benchmark-group-by=group
"$PY" - "$OUT" <<'PYEOF' >>"$OUT/bench.log" 2>&1
import json, os, sys
out = sys.argv[1]
pre, main = os.path.join(out, "bench-pretrain.json"), os.path.join(out, "bench.json")
if os.path.exists(pre):
    first = json.load(open(pre))
    if os.path.exists(main):
        rest = json.load(open(main))
        first["benchmarks"] += rest.get("benchmarks", [])
        if "not_measured" in rest:
            first["not_measured"] = first.get("not_measured", []) + rest["not_measured"]
    json.dump(first, open(main, "w"), indent=1)
    os.remove(pre)  # OUTDIR keeps at most 8 files
    print("merged bench-pretrain.json into bench.json:", len(first["benchmarks"]), "results")
PYEOF

# --- report --------------------------------------------------------------------------------------
run_stage report 30 0 "$OUT/bench.log" -- \
  "$PY" -m fastbert.bench report "$OUT/bench.json" --out "$OUT/RESULTS.md" --plots "$OUT"

# --- the CPU-only test files, with what is left ---------------------------------------------------
echo "== tests-cpu: ${CPU_TESTS[*]}" >>"$OUT/tests.log"
run_stage tests-cpu 120 0 "$OUT/tests.log" -- \
  "$PY" -m pytest "${CPU_TESTS[@]}" -q -rfEs -p no:cacheprovider "${XDIST[@]}"

# --- summary -------------------------------------------------------------------------------------
echo
echo "=================== gpu_run summary ($(elapsed)s of ${BUDGET}s) ==================="
printf '%-10s %-22s %6s\n' stage status time
for line in "${STAGES[@]}"; do echo "$line"; done
"$PY" - "$OUT" <<'PYEOF'
import json, os, sys
import xml.etree.ElementTree as ET

out = sys.argv[1]
junit = os.path.join(out, "junit.xml")
if os.path.exists(junit):
    try:
        root = ET.parse(junit).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        print("tests: {tests} run, {failures} failed, {errors} errors, {skipped} skipped".format(**tot))
        bad = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
               if c.find("failure") is not None or c.find("error") is not None]
        for name in bad[:25]:
            print("  FAILED", name)
        if len(bad) > 25:
            print(f"  ... and {len(bad) - 25} more (tests.log)")
    except Exception as exc:  # noqa: BLE001
        print("tests: junit.xml unreadable:", exc)
else:
    print("tests: no junit.xml")
log = os.path.join(out, "tests.log")
if os.path.exists(log):  # pytest's closing line of each test stage
    import re

    for line in open(log, errors="replace"):
        if re.match(r"^=*\s*\d+ (passed|failed|error)", line.strip()) or (line.startswith("== tests") and ": rc=" in line):
            print("  " + line.strip())
bench = os.path.join(out, "bench.json")
if os.path.exists(bench):
    try:
        print("benchmarks:", len(json.load(open(bench))["benchmarks"]), "results in bench.json")
    except Exception as exc:  # noqa: BLE001
        print("benchmarks: bench.json unreadable:", exc)
else:
    print("benchmarks: no bench.json")
md = os.path.join(out, "RESULTS.md")
if os.path.exists(md):
    text = open(md).read()
    start = text.find("## Speedup")
    end = text.find("## All results")
    print()
    if start < 0:
        print(text.strip()[:3000])
    else:
        print(text[:start].strip())
        print()
        print(text[start:end if end > 0 else None].strip()[:7000])
PYEOF
ls -la "$OUT"

fail=0
for line in "${STAGES[@]}"; do
  case "$line" in *FAILED*|*TIMEOUT*) fail=1 ;; esac
done
exit "$fail"
