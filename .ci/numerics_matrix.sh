#!/usr/bin/env bash
# CI stage: the suite under other BLAS / ATen kernel choices than the runner's defaults, so that no test can
# rest on two different library calls rounding alike on one machine (e.g. MKL's bmm vs mm on Intel CPUs).
#   MKL_CBWR=AVX2                the code path MKL takes on AVX2-only CPUs (e.g. older AMD EPYC)
#   ATEN_CPU_CAPABILITY=default  ATen's non-vectorised CPU kernels
# Distributed tests are left to the main run (they spawn processes; their numerics are the same code).
# Usage: bash .ci/numerics_matrix.sh [SETTING ...]      (default: the two above)
set -euo pipefail
cd "$(dirname "$0")/.."
settings=("$@")
[ ${#settings[@]} -gt 0 ] || settings=("MKL_CBWR=AVX2" "ATEN_CPU_CAPABILITY=default")
for s in "${settings[@]}"; do
  echo "[numerics_matrix] $s"
  env "$s" python3 -m pytest -q tests -p no:cacheprovider -m "not distributed"
done
