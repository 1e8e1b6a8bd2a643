#!/usr/bin/env bash
# CI stage: the versions the GPU machines run (Python 3.12, torch 2.11.0+cu130, triton 3.6.0), on this CPU
# runner, installed the ahead-of-time way (pip --no-build-isolation). torch 2.11 and Python 3.12 are also the
# oldest torch and the newest Python the README claims.
#
#   1. a separate venv from Python 3.12 with the CUDA build of torch 2.11.0 (it imports and runs on a machine
#      without a GPU) and triton 3.6.0; numpy < 2.4 because triton 3.6's interpreter cannot run run-time-bounded
#      loops with newer numpy (tests/conftest.py explains; the compiled kernels are unaffected);
#   2. a copy of the working tree (tracked + untracked, not ignored files), so in-place extensions of a
#      developer's build (against another torch) are left alone;
#   3. `pip install --no-build-isolation -e ".[test]"` there: torch is importable at build time, so setup.py
#      builds BOTH extensions ahead of time, fusedecay._C and fusedecay._C_cuda (nvcc + torch's CUDA headers,
#      sm_80 + sm_90), i.e. the glue .cpp that .ci/compile_cuda.sh cannot compile is compiled and linked;
#   4. imports _C_cuda and checks that it registered the CUDA kernel of fusedecay::adam_decay_, and that the CPU
#      kernels came from the ahead-of-time fusedecay._C (not a just-in-time build);
#   5. runs the whole test suite there (GPU tests skip; the Triton kernels run in the interpreter) in two pytest-xdist
#      workers: one pytest process keeps ~1.2 of this runner's 2 cores busy (compiles, subprocesses, Python); two
#      workers took the suite from 239 s to 165 s on this machine's own venv (torch 2.13), and this stage's suite
#      from ~223 s to 149-200 s in CI. The README's own command (one process) runs in .ci/new_user.sh.
#
# Usage: bash .ci/device_versions.sh                        the whole stage
#        bash .ci/device_versions.sh --prepare DIR          only make the venv DIR (step 1; .ci/run does this in
#                                                           the background while the other stages run)
#        FUSEDECAY_DEVVER_VENV=DIR bash .ci/device_versions.sh   the stage, with a venv prepared that way
# FUSEDECAY_DEVVER_TORCH / _TRITON / _PYTHON override the pins.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${FUSEDECAY_DEVVER_TORCH:-torch==2.11.0}"
TRITON_SPEC="${FUSEDECAY_DEVVER_TRITON:-triton==3.6.0}"
T0=$SECONDS

prepare_venv() {  # $1: the venv folder to create
  # Python 3.12: the GPU image's. Under pyenv, `python3.12` on PATH may be a shim that refuses to run, so each
  # candidate is tried.
  local python_bin="${FUSEDECAY_DEVVER_PYTHON:-}" cand
  if [ -z "$python_bin" ]; then
    for cand in python3.12 "$(pyenv root 2>/dev/null || echo /root/.pyenv)"/versions/3.12*/bin/python3.12; do
      if "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then python_bin="$cand"; break; fi
    done
  fi
  [ -n "$python_bin" ] || { echo "device_versions.sh: no Python 3.12 found (set FUSEDECAY_DEVVER_PYTHON)" >&2; exit 2; }
  "$python_bin" -m venv "$1"
  # (pip's own failures stop the script: `|| true` only covers grep finding nothing to print)
  "$1/bin/python" -m pip install -q --upgrade pip 2>&1 | { grep -v "^WARNING: Location" || true; }
  "$1/bin/python" -m pip install -q "$TORCH_SPEC" "$TRITON_SPEC" "numpy<2.4" ninja setuptools wheel pytest-xdist 2>&1 \
      | { grep -v "^WARNING: Location" || true; }
}

if [ "${1:-}" = "--prepare" ]; then
  prepare_venv "$2"
  echo "[device_versions] venv prepared in $2 (+$(( SECONDS - T0 ))s)"
  exit 0
fi

WORK="$(mktemp -d /tmp/fusedecay-devver.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
if [ -n "${FUSEDECAY_DEVVER_VENV:-}" ]; then
  VENV="$FUSEDECAY_DEVVER_VENV"
else
  VENV="$WORK/venv"
  prepare_venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -c "import sys, torch, triton; print('device versions: python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
"$PY" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 'this torch is not a CUDA build: no CUDA extension to check')"
echo "[device_versions] venv ready (+$(( SECONDS - T0 ))s)"

mkdir -p "$WORK/src"
git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$WORK/src"

if [ -z "${CUDA_HOME:-}" ]; then
  if [ -d /usr/local/cuda/include ]; then
    export CUDA_HOME=/usr/local/cuda
  else
    NVCC_BIN="$(command -v nvcc)"
    export CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$NVCC_BIN")")")"
  fi
fi
(
  cd "$WORK/src"
  # The pins above stay: torch/triton satisfy the test extra's ranges, so pip changes neither.
  CUDA_HOME="$CUDA_HOME" TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS="${MAX_JOBS:-2}" \
      "$PY" -m pip install -q --no-build-isolation -e ".[test]" "$TORCH_SPEC" "$TRITON_SPEC" "numpy<2.4" 2>&1 \
      | { grep -vE "^(WARNING: Location|W[0-9]{4} .*No CUDA runtime is found)" || true; }
  ls python/fusedecay/_C.*.so python/fusedecay/_C_cuda.*.so
)
echo "[device_versions] installed, extensions built ahead of time (+$(( SECONDS - T0 ))s)"

cd "$WORK/src"
"$PY" - <<'EOF'
import sys
sys.path.insert(0, "python")
import torch
import fusedecay._C  # noqa: F401  (defines the op)
import fusedecay._C_cuda  # noqa: F401  (registers its CUDA kernel)
import fusedecay
from fusedecay import _cpp_backend
print("CPU kernels from:", _cpp_backend.cpu_kernels_origin)
if _cpp_backend.cpu_kernels_origin != "fusedecay._C":
    sys.exit("the CPU kernels did not come from the ahead-of-time build fusedecay._C")
for key in ("CPU", "CUDA", "Meta"):
    ok = torch._C._dispatch_has_kernel_for_dispatch_key("fusedecay::adam_decay_", key)
    print(f"fusedecay::adam_decay_ {key} kernel: {ok}")
    if not ok:
        sys.exit(f"no {key} kernel registered for fusedecay::adam_decay_")
b = fusedecay.available_backends()
print("backends:", sorted(b))
if "cuda" not in b:
    sys.exit("backend 'cuda' did not load with _C_cuda built")
EOF
"$PY" -c "import transformers, lightning; print('transformers', transformers.__version__, 'lightning', lightning.__version__)"
"$PY" -m pytest -q tests -p no:cacheprovider -n 2
echo "[device_versions] done (+$(( SECONDS - T0 ))s)"
