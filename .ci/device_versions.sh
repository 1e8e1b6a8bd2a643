#!/usr/bin/env bash
# CI stage 2: the versions the GPU machines run (torch 2.11.0+cu130, triton 3.6.0), on this CPU runner.
#
#   1. a separate venv with the CUDA build of torch 2.11.0 (it imports and runs on a machine without a
#      GPU) and triton 3.6.0; numpy < 2.4 because triton 3.6's interpreter cannot run run-time-bounded
#      loops with newer numpy (tests/conftest.py explains; the compiled kernels are unaffected);
#   2. a copy of the working tree (tracked + untracked, not ignored files), so the in-place extensions
#      of stage 1 (built against the CPU torch) are left alone;
#   3. builds BOTH extensions there: fusedecay._C and fusedecay._C_cuda (nvcc + torch's CUDA headers,
#      sm_80 + sm_90), i.e. the glue .cpp that .ci/compile_cuda.sh cannot compile is compiled and linked;
#   4. imports _C_cuda and checks that it registered the CUDA kernel of fusedecay::adam_decay_;
#   5. runs the README's test command there (GPU tests skip; the Triton kernels run in the interpreter).
#
# Usage: bash .ci/device_versions.sh       (FUSEDECAY_DEVVER_TORCH / _TRITON override the pins)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${FUSEDECAY_DEVVER_TORCH:-torch==2.11.0}"
TRITON_SPEC="${FUSEDECAY_DEVVER_TRITON:-triton==3.6.0}"
WORK="$(mktemp -d /tmp/fusedecay-devver.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
T0=$SECONDS

python3 -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -m pip install -q "$TORCH_SPEC" "$TRITON_SPEC" "numpy<2.4" ninja setuptools wheel pytest pytest-benchmark \
    matplotlib tqdm transformers 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -c "import torch, triton; print('device versions: torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
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
  CUDA_HOME="$CUDA_HOME" TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS="${MAX_JOBS:-2}" \
      "$PY" setup.py -q build_ext --inplace 2>&1 | grep -vE "^(W[0-9]{4} .*No CUDA runtime is found|copying )" || true
  ls python/fusedecay/_C.*.so python/fusedecay/_C_cuda.*.so
)
echo "[device_versions] extensions built (+$(( SECONDS - T0 ))s)"

cd "$WORK/src"
"$PY" - <<'EOF'
import sys
sys.path.insert(0, "python")
import torch
import fusedecay._C  # noqa: F401  (defines the op)
import fusedecay._C_cuda  # noqa: F401  (registers its CUDA kernel)
import fusedecay
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
"$PY" -m pytest -q tests -p no:cacheprovider
echo "[device_versions] done (+$(( SECONDS - T0 ))s)"
