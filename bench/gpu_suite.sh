#!/usr/bin/env bash
# One command for a fresh GPU machine that has torch and triton (no internet needed):
#   1. builds the compiled extensions in place (python setup.py build_ext --inplace; CUDA_HOME is set to
#      the CUDA toolkit if unset; a failure is recorded and the suite goes on with whatever backends import);
#   2. runs the GPU tests (pytest -q -m "cuda or triton" tests: the cuda-marked tests and the Triton tests,
#      which run the compiled kernels where a GPU exists);
#   3. runs the step benchmark (bench/test_bench_step.py, pytest-benchmark) and bench/to_results.py;
#   4. runs bench/bench_paired_step.py, bench/bench_scionc_step.py, bench/bench_newton_schulz.py, in that
#      order (cheapest and most target-relevant first).
# Everything is written under bench/results/. With $OUT set (at most 8 files come back from it), the log
# is written into $OUT/suite.log as it goes, and after every stage $OUT/results.tar.gz is rebuilt from all
# new files under bench/results/ (so a later hang loses nothing); the step table and the paired table are
# also copied as plain .md files for a quick read. At most 5 files in $OUT.
# Everything is time-boxed to FUSEDECAY_SUITE_BUDGET_S seconds (default 520) so that it ends within a
# 10-minute slot; every `timeout` escalates to SIGKILL 15 s after SIGTERM.
#
#   bash bench/gpu_suite.sh
#   FUSEDECAY_COMMIT=<sha> bash bench/gpu_suite.sh    # name the commit when the copy has no .git
#   PYTHON=/path/to/python3 bash bench/gpu_suite.sh   # default: python3
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
T0=$SECONDS
BUDGET=${FUSEDECAY_SUITE_BUDGET_S:-520}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RES=bench/results
mkdir -p "$RES"
LOG=$RES/gpu-suite-$STAMP.log
RAW=$RES/raw-gpu-$STAMP.json
touch "$RES/.suite-start-$STAMP"
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    : > "$OUT/suite.log"
fi

# cap WANT RESERVE: seconds a stage may take (at most WANT, leaving RESERVE for what follows; >= 10)
cap() {
    local want=$1 left=$(( BUDGET - (SECONDS - T0) - $2 ))
    (( left < want )) && want=$left
    (( want < 10 )) && want=10
    echo "$want"
}
to_out() { [[ -n "${OUT:-}" ]] && for f in "$@"; do [[ -s "$f" ]] && cp "$f" "$OUT/"; done; return 0; }
snapshot() {  # $OUT/results.tar.gz := every file written under bench/results/ since the suite started
    [[ -n "${OUT:-}" ]] || return 0
    find "$RES" -type f -newer "$RES/.suite-start-$STAMP" ! -name '.*' -print0 \
        | tar -czf "$OUT/results.tar.gz.tmp" --null -T - && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
    return 0
}
say() {
    local line="[$(date -u +%H:%M:%S) +$(( SECONDS - T0 ))s] $*"
    echo "$line" | tee -a "$LOG"
    [[ -n "${OUT:-}" ]] && echo "$line" >> "$OUT/suite.log"
    return 0
}
run_logged() {
    if [[ -n "${OUT:-}" ]]; then
        "$@" 2>&1 | tee -a "$LOG" "$OUT/suite.log"
    else
        "$@" 2>&1 | tee -a "$LOG"
    fi
    return "${PIPESTATUS[0]}"
}
tbox() { local t=$1; shift; timeout -k 15 "$t" "$@"; }

say "fusedecay GPU suite, budget ${BUDGET}s, python: $(command -v "$PY" || echo "$PY not found")"
run_logged nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
run_logged "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
run_logged "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA device')" \
    || say "WARNING: no CUDA device visible to torch; the GPU stages will skip"
run_logged "$PY" -c "import triton; print('triton', triton.__version__)" || say "triton does not import"

if [[ -z "${CUDA_HOME:-}" ]]; then
    for d in /usr/local/cuda /usr/local/cuda-13* /usr/local/cuda-12* /opt/cuda; do
        if [[ -e "$d/include/cuda_runtime.h" ]]; then export CUDA_HOME=$d; break; fi
    done
fi
say "CUDA_HOME=${CUDA_HOME:-unset}; nvcc: $(command -v nvcc || echo none)"
run_logged bash -c 'nvcc --version | tail -2' || true

say "1/4 build: $PY setup.py build_ext --inplace"
T=$(cap 240 300)
MAX_JOBS=${MAX_JOBS:-16} run_logged tbox "$T" "$PY" setup.py build_ext --inplace
BUILD_RC=$?
say "build rc=$BUILD_RC (timeout ${T}s; 124 = timed out)"
snapshot
run_logged "$PY" - <<'EOF'
import sys
sys.path.insert(0, "python")
import fusedecay
from fusedecay import backends
for name, b in fusedecay.available_backends().items():
    print(f"backend {name}: devices {b.device_types}, dtypes {[str(d) for d in b.dtypes]}")
for mod, why in backends.unavailable_reasons().items():
    print(f"not loaded: {mod}: {why}")
EOF

say "2/4 tests: pytest -q -m 'cuda or triton' tests"
T=$(cap 170 200)
TIMEOUT_FLAG=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_FLAG=(--timeout=90)
run_logged tbox "$T" "$PY" -m pytest -q -m "cuda or triton" tests -p no:cacheprovider -rfEs --durations=15 \
    ${TIMEOUT_FLAG[@]+"${TIMEOUT_FLAG[@]}"}
TEST_RC=$?
say "tests rc=$TEST_RC (timeout ${T}s; 5 = no tests collected)"
snapshot

say "3/4 step benchmark"
T=$(cap 240 110)
export FUSEDECAY_BENCH_DEADLINE=$(( $(date +%s) + T - 30 ))
run_logged tbox "$T" "$PY" -m pytest bench/test_bench_step.py -p no:cacheprovider \
    --benchmark-json="$RAW" --benchmark-columns=median,iqr,rounds --benchmark-sort=name
BENCH_RC=$?
say "step benchmark rc=$BENCH_RC"
STEM=""
if [[ -s "$RAW" ]]; then
    run_logged tbox 60 "$PY" bench/to_results.py "$RAW" --out-dir "$RES" | tee "$RES/.to_results-$STAMP.out"
    STEM=$(sed -n 's/^wrote \(.*\)\.json, \.md, \.png$/\1/p' "$RES/.to_results-$STAMP.out")
    rm -f "$RES/.to_results-$STAMP.out"
    [[ -n "$STEM" ]] && to_out "$STEM.md"
fi
snapshot

say "4/4 other benchmarks"
for f in bench/bench_paired_step.py bench/bench_scionc_step.py bench/bench_newton_schulz.py; do
    [[ -e "$f" ]] || continue
    T=$(cap 90 15)
    if (( BUDGET - (SECONDS - T0) < 40 )); then say "skip $f: budget spent"; continue; fi
    run_logged tbox "$T" "$PY" "$f"
    say "$f rc=$? (timeout ${T}s)"
    snapshot
done
for g in "$RES"/paired-*.md; do [[ "$g" -nt "$RES/.suite-start-$STAMP" ]] && to_out "$g"; done

say "done: build rc=$BUILD_RC, tests rc=$TEST_RC, step benchmark rc=$BENCH_RC, results ${STEM:-none}"
snapshot
[[ -n "${OUT:-}" ]] && ls -la "$OUT"
rm -f "$RES/.suite-start-$STAMP"
exit 0
