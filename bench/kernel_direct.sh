#!/usr/bin/env bash
# Builds bench/kernel_direct.cpp against this checkout's csrc/ with the CPU extension's compiler flags
# (fusedecay/_jit.py) and runs it. Arguments go to the program: [elements] [threads] [rounds] [cold].
#   bash bench/kernel_direct.sh                         # 2^17 elements (in L2), 1 thread
#   bash bench/kernel_direct.sh 16777216 2              # out of cache, 2 threads
#   bash bench/kernel_direct.sh 16777216 2 15 1         # cold: caches overwritten before each call (median)
#   FUSEDECAY_NO_AVX512=1 bash bench/kernel_direct.sh   # the build a CPU without AVX-512 runs (split vectors)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="${KERNEL_DIRECT_BIN:-${TMPDIR:-/tmp}/fusedecay_kernel_direct}"
read -r -a FLAGS < <("$PY" - "$ROOT" <<'PYEOF'
import importlib.util, os, sys
import torch.utils.cpp_extension as ce
spec = importlib.util.spec_from_file_location("j", os.path.join(sys.argv[1], "python", "fusedecay", "_jit.py"))
j = importlib.util.module_from_spec(spec); spec.loader.exec_module(j)
libs = ce.library_paths()
print(" ".join(list(j.CPU_CXX_FLAGS) + ["-I" + p for p in ce.include_paths()] + ["-L" + p for p in libs] +
               ["-Wl,-rpath," + p for p in libs] + list(j.CPU_LD_FLAGS)))
PYEOF
)
EXTRA=()
if [[ "${FUSEDECAY_NO_AVX512:-0}" == 1 ]]; then EXTRA+=(-DFUSEDECAY_NO_AVX512); fi
"${CXX:-g++}" -std=c++17 -Wno-psabi "${EXTRA[@]}" -I"$ROOT/csrc" "$ROOT/bench/kernel_direct.cpp" \
  "$ROOT/csrc/cpu/adam_decay_cpu.cpp" "${FLAGS[@]}" -ltorch_cpu -lc10 -o "$OUT"
lscpu | sed -n 's/^Model name: *//p'
"$OUT" "$@"
