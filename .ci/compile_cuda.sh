#!/usr/bin/env bash
# Compile every .cu under csrc/ for sm_80 and sm_90 with warnings as errors (no GPU needed); ptxas
# register spills and local-memory use count as warnings, so a kernel that starts spilling fails CI.
# The .cu files are torch-free (cuda_runtime.h + our headers), so this works on a CPU-only runner.
# Usage: .ci/compile_cuda.sh            (NVCC=/path/to/nvcc to override)
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/bin/nvcc)}"
if [ ! -x "$NVCC" ]; then
  echo "compile_cuda.sh: nvcc not found (set NVCC=...)" >&2
  exit 2
fi
mapfile -t SOURCES < <(find csrc -name '*.cu' | sort)
if [ "${#SOURCES[@]}" -eq 0 ]; then
  echo "compile_cuda.sh: no .cu files under csrc/" >&2
  exit 2
fi
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
status=0
for src in "${SOURCES[@]}"; do
  obj="$OUT/$(echo "$src" | tr '/' '_').o"
  if "$NVCC" -std=c++17 -O3 -Icsrc \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      --Werror all-warnings -Xptxas -warn-spills,-warn-lmem-usage -Xcompiler -Wall,-Wextra,-Werror \
      -c "$src" -o "$obj"; then
    echo "ok    $src"
  else
    echo "FAIL  $src" >&2
    status=1
  fi
done
exit $status
