#!/usr/bin/env bash
# One command for a fresh GPU machine that has torch and triton (no internet needed):
#   1. builds the compiled extension in place (python setup.py build_ext --inplace; a failure is
#      recorded and the suite goes on with whatever backends import);
#   2. runs the GPU tests (pytest -q -m cuda tests);
#   3. runs the step benchmark (bench/test_bench_step.py, pytest-benchmark) and bench/to_results.py,
#      then the other bench/bench_*.py scripts if present;
#   4. writes everything under bench/results/ and, if $OUT is set, copies into $OUT (at most 8 files):
#      suite.log, the raw pytest-benchmark JSON, the rows JSON, the .md table, the .png plot, and
#      results.tar.gz (all new files under bench/results/, logs included).
# Everything is time-boxed to FUSEDECAY_SUITE_BUDGET_S seconds (default 560) so that it ends within a
# 10-minute slot.
#
#   bash bench/gpu_suite.sh
#   FUSEDECAY_COMMIT=<sha> bash bench/gpu_suite.sh    # name the commit when the copy has no .git
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

T0=$SECONDS
BUDGET=${FUSEDECAY_SUITE_BUDGET_S:-560}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RES=bench/results
mkdir -p "$RES"
LOG=$RES/gpu-suite-$STAMP.log
RAW=$RES/raw-gpu-$STAMP.json
touch "$RES/.suite-start-$STAMP"

# cap WANT RESERVE: seconds a stage may take (at most WANT, leaving RESERVE for what follows; >= 10)
cap() {
    local want=$1 left=$(( BUDGET - (SECONDS - T0) - $2 ))
    (( left < want )) && want=$left
    (( want < 10 )) && want=10
    echo "$want"
}
say() { echo "[$(date -u +%H:%M:%S) +$(( SECONDS - T0 ))s] $*" | tee -a "$LOG"; }
run_logged() { "$@" 2>&1 | tee -a "$LOG"; return "${PIPESTATUS[0]}"; }

say "fusedecay GPU suite, budget ${BUDGET}s"
run_logged nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
run_logged python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
run_logged python -c "import triton; print('triton', triton.__version__)" || say "triton does not import"

say "1/4 build: python setup.py build_ext --inplace"
T=$(cap 240 300)
MAX_JOBS=${MAX_JOBS:-16} run_logged timeout "$T" python setup.py build_ext --inplace
BUILD_RC=$?
say "build rc=$BUILD_RC (timeout ${T}s; 124 = timed out)"
run_logged python - <<'EOF'
import sys
sys.path.insert(0, "python")
import fusedecay
from fusedecay import backends
for name, b in fusedecay.available_backends().items():
    print(f"backend {name}: devices {b.device_types}, dtypes {[str(d) for d in b.dtypes]}")
for mod, why in backends.unavailable_reasons().items():
    print(f"not loaded: {mod}: {why}")
EOF

say "2/4 tests: pytest -q -m cuda tests"
T=$(cap 150 200)
run_logged timeout "$T" python -m pytest -q -m cuda tests -p no:cacheprovider
TEST_RC=$?
say "tests rc=$TEST_RC (timeout ${T}s; 5 = no cuda-marked tests collected)"

say "3/4 step benchmark"
T=$(cap 240 60)
export FUSEDECAY_BENCH_DEADLINE=$(( $(date +%s) + T - 30 ))
run_logged timeout "$T" python -m pytest bench/test_bench_step.py -p no:cacheprovider \
    --benchmark-json="$RAW" --benchmark-columns=median,iqr,rounds --benchmark-sort=name
BENCH_RC=$?
say "step benchmark rc=$BENCH_RC"
STEM=""
if [[ -s "$RAW" ]]; then
    run_logged python bench/to_results.py "$RAW" --out-dir "$RES" | tee "$RES/.to_results-$STAMP.out"
    STEM=$(sed -n 's/^wrote \(.*\)\.json, \.md, \.png$/\1/p' "$RES/.to_results-$STAMP.out")
    rm -f "$RES/.to_results-$STAMP.out"
fi

say "4/4 other benchmarks"
for f in bench/bench_*.py; do
    [[ -e "$f" ]] || continue
    T=$(cap 90 15)
    if (( BUDGET - (SECONDS - T0) < 40 )); then say "skip $f: budget spent"; continue; fi
    run_logged timeout "$T" python "$f"
    say "$f rc=$? (timeout ${T}s)"
done

say "done: build rc=$BUILD_RC, tests rc=$TEST_RC, step benchmark rc=$BENCH_RC, results ${STEM:-none}"
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    cp "$LOG" "$OUT/suite.log"
    [[ -s "$RAW" ]] && cp "$RAW" "$OUT/"
    for ext in json md png; do [[ -n "$STEM" && -e "$STEM.$ext" ]] && cp "$STEM.$ext" "$OUT/"; done
    find "$RES" -type f -newer "$RES/.suite-start-$STAMP" -print0 | tar -czf "$OUT/results.tar.gz" --null -T -
    ls -la "$OUT"
fi
rm -f "$RES/.suite-start-$STAMP"
exit 0
