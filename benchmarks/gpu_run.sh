#!/usr/bin/env bash
# One-command GPU run: build the extension, the CUDA tests, the benchmarks and the report, in a
# budget that fits one device call. Usage (from anywhere): bash benchmarks/gpu_run.sh OUTDIR
#
# On the lent GPU machine (Python 3.12, torch 2.11.0+cu130, triton 3.6.0, transformers 5.17.0, numpy
# 2.5, nvcc 13.0, pytest, pytest-benchmark, pytest-xdist, matplotlib; no network; python3 has torch),
# carry the bert_pytorch wheel, which that machine lacks. Once, here, from the repository root
# (.whl/ is in .gitignore, so it travels only when carried):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl bert-pytorch==0.0.1a4    # 22 kB, py3-none-any
# then the device tool's run, exactly:
#   command: bash benchmarks/gpu_run.sh $OUT      carry: [".whl"]      timeout_s: 600
# The script installs .whl/*.whl with pip --target /tmp/fastbert-site (put on PYTHONPATH); without the
# wheel the bert_pytorch comparisons skip (tests/test_model.py, test_reference_ops.py, the bert_pytorch
# benchmark providers), nothing aborts.
#
# Order (issue 19): first the CUDA tests of what has never run on a GPU (stage tests-new: the fused
# block, FusedOp and dispatch, device-side dropout seeds, the graphed step, the stable-ABI CUDA module,
# the patched transformers model, ModernBERT's fused layer: added after the dry runs below, about 15 s
# in the interpreter), then the in-place and pretraining benchmarks (bench-pre:
# bench_hf.py::test_hf_inplace, issue 21's patched ModernBERT step, bench_pretrain.py, issue 21's window
# cases at S = 8192, the compile baselines; the issue 21 cases were added after the dry runs below), then the kernel test files (tests-kernels), the
# other benchmarks (bench), the report, and the CPU-only test files (tests-cpu) with what is left.
#
# Every stage has a timeout and the whole run a budget (GPU_RUN_BUDGET_S, default 480 s: inside the
# device call's 600 s limit with margin for stages that overrun their timeout, and it leaves room in
# a session's 15 device minutes for the machine's start and a short second call): a stage gets
# min(its own limit, what the budget leaves after reserving time for the stages after it).
# A stage that fails or times out does not stop the later ones; statuses are printed at the end.
# Stage sizes, from two dry runs of this script on the 2-core CPU VM (shared) with that stack (torch
# 2.11.0+cu130 wheel, triton 3.6.0, transformers 5.17.0, numpy 2.3.5 since the triton 3.6 interpreter
# needs < 2.4, Python 3.11; no GPU: the kernels ran in the Triton interpreter, the benchmarks at
# their CPU sizes), budget 480 s. Run 1 (cold caches, the earlier limits in its column): 491 s in
# all; run 2 (the limits here, warm caches): 436 s.
#   stage          limit reserve | run 1: limit took | run 2: took  what ran
#   build            120     320 |          180  21s |        21s  pip -e . (C++ and CUDA modules), 2 jobs
#   info              30     320 |           60   3s |         3s
#   tests-new        140     290 |          120 128s |        82s  run 1 cut at 182 of 189 tests, run 2
#                                |                   |             all (2 failures, see below)
#   bench-pre        100     190 |          120  90s |        23s  bench_pretrain (CPU providers) and the
#                                |                   |             8 test_hf_inplace cases, all ran
#   tests-kernels     90     100 |           90  99s |       102s  cut at 311 / 445 of 489 tests
#   bench             80      35 |          100  83s |        74s  FASTBERT_BENCH_BUDGET_S = limit - 20:
#                                |                   |             95 / 17 results before it ran out
#   report            20      15 |           30   3s |         4s
#   tests-cpu        120      15 |           52  63s |       126s  what was left, cut both times
# Run 3 (2026-12-02, after the issue 21 additions, warm caches): every stage ok, 315 s in all; tests-new
# 66 s (185 passed), bench-pre 18 s, tests-kernels 73 s (488 passed, not cut), bench 70 s, tests-cpu 70 s.
# (reserve: seconds kept for the stages after it. A stage stopped by its timeout overran it by
# 8-12 s there: SIGINT, then pytest writes its junit/JSON and exits.) Both runs failed the same two
# tests: tests/test_hf_patch.py::test_torch_compile_fullgraph under torch 2.11 (dynamo cannot trace
# the encoder's self.__dict__.pop; torch 2.13 can). On the GPU the kernels do not run interpreted
# but a cold Triton cache makes the kernel stages pay JIT compiles; a stage cut by its timeout still
# writes its junit and JSON and the next one starts. GPU_RUN_BUDGET_S up to about 540 runs more
# inside the same call.
# OUTDIR receives at most 8 files (the device tool returns no more):
#   build.log (pip build, nvidia-smi, python -m fastbert.info), tests.log (all test stages),
#   junit.xml (the CUDA test stages, merged), bench.log, bench.json (both bench stages, merged),
#   RESULTS.md, throughput_vs_seq.png, roofline.png
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
run_stage build 120 320 "$OUT/build.log" -- \
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
run_stage info 30 320 "$OUT/build.log" -- "$PY" -m fastbert.info

# --- tests on CUDA -------------------------------------------------------------------------------
# Two stages of CUDA test files: first what has never run on a GPU (NEW_TESTS), after the headline
# benchmarks the kernel files (KERNEL_TESTS); the CPU-only files (data, training loops, reference
# ops, report), which CI runs on every change, come last in stage tests-cpu with whatever budget is
# left. One attention config per kernel (FASTBERT_ATTN_AUTOTUNE=0): the tests check results, not
# speed, and autotuning every test shape would spend the stage compiling.
XDIST=()
if [ "$WORKERS" -gt 0 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then
  XDIST=(-n "$WORKERS" --dist loadfile)
fi
NEW_TESTS=(tests/test_fused_block.py tests/test_hf_patch.py tests/test_hf_inputs.py tests/test_graphs.py
           tests/test_dropout_stats.py tests/test_csrc_abi.py tests/test_embed.py tests/test_mlm_mask.py
           tests/test_dispatch.py tests/test_modern_block.py)  # the last: ModernBERT's fused layer (issue 21)
KERNEL_TESTS=(tests/test_packing.py tests/test_model_fused.py tests/test_attention.py tests/test_layer_norm.py
              tests/test_bias_gelu.py tests/test_geglu.py tests/test_rotary.py
              tests/test_train_heads.py::test_linear_cross_entropy_bf16_autocast
              tests/test_train_pretrain.py::test_pretrain_on_cuda tests/test_csrc_nvcc.py)
CPU_TESTS=()
for f in tests/test_*.py; do
  case " ${NEW_TESTS[*]} ${KERNEL_TESTS[*]} " in *" $f "*) ;; *) CPU_TESTS+=("$f") ;; esac
done
: >"$OUT/tests.log"
run_stage tests-new 140 290 "$OUT/tests.log" -- env FASTBERT_ATTN_AUTOTUNE=0 \
  "$PY" -m pytest "${NEW_TESTS[@]}" -q -rfEs -p no:cacheprovider "${XDIST[@]}" --junitxml="$OUT/junit.xml"

# --- the pretraining and in-place benchmarks ------------------------------------------------------
# The pretraining step (issue 12: padded, packed, packed + CUDA graph against HF and bert_pytorch;
# the graphed provider runs under torch.cuda.set_sync_debug_mode("warn"), so a sync in the replayed
# step shows in bench.log) and the patched transformers model against stock (issue 19:
# bench_hf.py::test_hf_inplace, first: 8 short cases, the issue's acceptance numbers); the other
# benchmarks come after the kernel tests. The two JSON files are merged into bench.json.
: >"$OUT/bench.log"
BENCH_OPTS=(-q -rfEs -p no:cacheprovider --benchmark-only --benchmark-columns=median,iqr,rounds
            --benchmark-group-by=group)
PRE_LIMIT=$(stage_limit 100 190)
export FASTBERT_BENCH_BUDGET_S=$(( PRE_LIMIT > 60 ? PRE_LIMIT - 20 : PRE_LIMIT / 2 + 1 ))
# issue 21's acceptance cases ride along (after the in-place BERT ones, the window after the pretraining): the
# patched ModernBertForMaskedLM fine-tuning step against stock, and the windowed against the global
# attention kernel, forward + backward; the bench stage deselects them.
ISSUE21=(benchmarks/bench_hf.py::test_hf_family[modernbert-finetune-32-hf-sdpa]
         benchmarks/bench_hf.py::test_hf_family[modernbert-finetune-32-fastbert-patch]
         benchmarks/bench_attention.py::test_attention_window[fastbert_window-S8192-fwd_bwd]
         benchmarks/bench_attention.py::test_attention_window[fastbert_global-S8192-fwd_bwd])
run_stage bench-pre 100 190 "$OUT/bench.log" -- \
  "$PY" -m pytest benchmarks/bench_hf.py benchmarks/bench_pretrain.py benchmarks/bench_attention.py \
  -k "test_hf_inplace or test_pretrain or (test_hf_family and modernbert and finetune) or \
(test_attention_window and S8192 and fwd_bwd and fastbert)" \
  --benchmark-json "$OUT/bench-pretrain.json" "${BENCH_OPTS[@]}"

# --- the kernel test files --------------------------------------------------------------------------
run_stage tests-kernels 90 100 "$OUT/tests.log" -- env FASTBERT_ATTN_AUTOTUNE=0 \
  "$PY" -m pytest "${KERNEL_TESTS[@]}" -q -rfEs -p no:cacheprovider "${XDIST[@]}" \
  --junitxml="$OUT/junit-kernels.xml"

# --- the other benchmarks ------------------------------------------------------------------------
BENCH_LIMIT=$(stage_limit 80 35)
export FASTBERT_BENCH_BUDGET_S=$(( BENCH_LIMIT > 60 ? BENCH_LIMIT - 20 : BENCH_LIMIT / 2 + 1 ))
run_stage bench 80 35 "$OUT/bench.log" -- \
  "$PY" -m pytest benchmarks/ --ignore=benchmarks/bench_pretrain.py \
  --deselect benchmarks/bench_hf.py::test_hf_inplace "${ISSUE21[@]/#/--deselect=}" \
  --benchmark-json "$OUT/bench.json" "${BENCH_OPTS[@]}"
"$PY" - "$OUT" <<'PYEOF' >>"$OUT/bench.log" 2>&1
import json, os, sys
import xml.etree.ElementTree as ET

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
# the two CUDA test stages' junit files, as one <testsuites>
parts = [p for p in (os.path.join(out, "junit.xml"), os.path.join(out, "junit-kernels.xml")) if os.path.exists(p)]
if len(parts) == 2 or (parts and parts[0].endswith("junit-kernels.xml")):
    merged = ET.Element("testsuites")
    for p in parts:
        try:
            root = ET.parse(p).getroot()
        except ET.ParseError as exc:
            print("junit unreadable:", p, exc)
            continue
        merged.extend([root] if root.tag == "testsuite" else list(root))
    ET.ElementTree(merged).write(os.path.join(out, "junit.xml"), encoding="utf-8", xml_declaration=True)
    if os.path.exists(os.path.join(out, "junit-kernels.xml")):
        os.remove(os.path.join(out, "junit-kernels.xml"))
    print("merged junit files into junit.xml:", ", ".join(os.path.basename(p) for p in parts))
PYEOF

# --- report --------------------------------------------------------------------------------------
run_stage report 20 15 "$OUT/bench.log" -- \
  "$PY" -m fastbert.bench report "$OUT/bench.json" --out "$OUT/RESULTS.md" --plots "$OUT"

# --- the CPU-only test files, with what is left ---------------------------------------------------
echo "== tests-cpu: ${CPU_TESTS[*]}" >>"$OUT/tests.log"
run_stage tests-cpu 120 15 "$OUT/tests.log" -- \
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
