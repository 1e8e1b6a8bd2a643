#!/usr/bin/env bash
# CI stage: the numerics tests under other BLAS / ATen kernel choices than the runner's defaults, so that no test
# can rest on two different library calls rounding alike on one machine (e.g. MKL's bmm vs mm on Intel CPUs).
#   MKL_CBWR=AVX2                the code path MKL takes on AVX2-only CPUs (e.g. older AMD EPYC)
#   ATEN_CPU_CAPABILITY=default  ATen's non-vectorised CPU kernels, together with
#   FUSEDECAY_CPU_VECTORS=split  our CPU kernel's vector code as CPUs without AVX-512 run it (csrc/cpu, VectorForm)
# The numerics tests: every kernel, reference and truth comparison; not the framework, build, demo or
# multi-process tests (same code, run once by the main test command).
# Usage: bash .ci/numerics_matrix.sh [--parallel] [SETTING ...]   (a SETTING is one or more VAR=value separated by
#        spaces; default: the two above; runs the `python3` on PATH). --parallel runs the settings at the same time
#        (CI: the tests are mostly single-threaded Python, so two runs share a 2-core machine well) and prints each
#        one's output when all have ended; it fails if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."
parallel=0
if [ "${1:-}" = "--parallel" ]; then parallel=1; shift; fi
settings=("$@")
[ ${#settings[@]} -gt 0 ] || settings=("MKL_CBWR=AVX2" "ATEN_CPU_CAPABILITY=default FUSEDECAY_CPU_VECTORS=split")
NUMERICS=(tests/test_reference_adam.py tests/test_reference_scion.py tests/test_cpp_kernels.py
          tests/test_triton_adam.py tests/test_newton_schulz.py tests/test_scionc_fast.py tests/test_scionc_truth.py
          tests/test_delta_truth.py tests/test_spectral_nd.py tests/test_step_contract.py tests/test_determinism.py
          tests/test_tolerances.py tests/test_switch_optimizer.py tests/test_state8.py)
run_one() {
  # shellcheck disable=SC2086  # a setting may hold several VAR=value words
  env $1 python3 -m pytest -q -p no:cacheprovider -m "not distributed" "${NUMERICS[@]}"
}
if [ "$parallel" = 0 ]; then
  for s in "${settings[@]}"; do
    echo "[numerics_matrix] $s"
    run_one "$s"
  done
  exit 0
fi
LOGS="$(mktemp -d)"
trap 'rm -rf "$LOGS"' EXIT
pids=()
for k in "${!settings[@]}"; do
  run_one "${settings[$k]}" > "$LOGS/$k.log" 2>&1 &
  pids+=($!)
done
failed=0
for k in "${!settings[@]}"; do
  rc=0
  wait "${pids[$k]}" || rc=$?
  echo "[numerics_matrix] ${settings[$k]} (exit $rc)"
  cat "$LOGS/$k.log"
  [ "$rc" = 0 ] || failed=1
done
exit "$failed"
