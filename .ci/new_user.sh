#!/usr/bin/env bash
# CI stage: the README's two commands, as a new user runs them, in a fresh venv on a fresh copy of the tree.
#
#   1. a venv from this machine's python3 with nothing in it (no torch: the install must bring it);
#   2. a copy of the working tree (tracked + untracked, not ignored files: no in-place .so of a developer's build);
#   3. the Quick start's first command (pip's default build isolation, so the package installs without compiled
#      kernels and compiles them on first use), with the demo shortened to a few steps; its "compiling the CPU
#      kernels" line must appear and the demo must have run on the compiled "cpu" backend;
#   4. the Quick start's second command: test dependencies + the whole test suite;
#   5. the numerics tests again under two other BLAS / ATen kernel settings (.ci/numerics_matrix.sh).
# The commands are read from README.md, so the README cannot drift from what CI runs. The just-in-time build goes to
# a cache inside this stage's temp folder (FUSEDECAY_CACHE_DIR), so every CI run compiles it.
#
# Usage: bash .ci/new_user.sh        (PYTHON=... picks the interpreter; default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="$(mktemp -d /tmp/fusedecay-newuser.XXXXXX)"
# FUSEDECAY_CI_TRASH (set by .ci/run): leave the folder there, for .ci/run to delete while the next stage runs.
trap 'if [ -n "${FUSEDECAY_CI_TRASH:-}" ]; then mv "$WORK" "$FUSEDECAY_CI_TRASH/"; else rm -rf "$WORK"; fi' EXIT
T0=$SECONDS
say() { echo "[new_user +$(( SECONDS - T0 ))s] $*"; }

# The two commands: the first two lines of the first ```bash block under "## Quick start", comments cut off.
mapfile -t CMDS < <(awk '/^## Quick start/{q=1} q && /^```bash/{b=1; next} b && /^```/{exit} b' README.md \
                    | sed -E 's/[[:space:]]+#[[:space:]].*$//' | sed -n '1,2p')
if [ "${#CMDS[@]}" -ne 2 ] || [[ "${CMDS[0]}" != *"fusedecay.demo"* ]] || [[ "${CMDS[1]}" != *pytest* ]]; then
  echo "new_user.sh: could not read the two Quick start commands from README.md (got: ${CMDS[*]:-nothing})" >&2
  exit 2
fi
# .ci/run names the test command it expects (README_TEST_CMD); the README's must be that one.
if [ -n "${README_TEST_CMD:-}" ] && [ "${CMDS[1]}" != "$README_TEST_CMD" ]; then
  echo "new_user.sh: README's test command is '${CMDS[1]}', .ci/run expects '$README_TEST_CMD'" >&2
  exit 2
fi
say "command 1: ${CMDS[0]}"
say "command 2: ${CMDS[1]}"

"${PYTHON:-python3}" -m venv "$WORK/venv"
mkdir -p "$WORK/src"
git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$WORK/src"
cd "$WORK/src"
export PATH="$WORK/venv/bin:$PATH" VIRTUAL_ENV="$WORK/venv" FUSEDECAY_CACHE_DIR="$WORK/cache" PIP_PROGRESS_BAR=off
unset PYTHONPATH
if python -c "import torch" 2>/dev/null; then
  echo "new_user.sh: the fresh venv already has torch; it must come with the install" >&2
  exit 2
fi

# Command 1, with the demo cut to a few steps of a small model (the full run takes minutes).
DEMO_ARGS=(--n-layer 2 --n-embd 64 --n-head 2 --steps 8 --batch-size 4 --seq-len 64 --eval-every 4 --val-batches 2
           --layer-sparsities 0.5 --global-sparsities 0.5 --no-progress --out "$WORK/demo")
eval "${CMDS[0]} ${DEMO_ARGS[*]}" 2>&1 | { grep -v "^WARNING: Location" || true; } | tee "$WORK/cmd1.log"
python -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
grep -q "fusedecay: compiling the CPU kernels" "$WORK/cmd1.log" \
  || { echo "new_user.sh: the first command did not compile the CPU kernels on first use" >&2; exit 1; }
python - "$WORK/demo" <<'EOF'
import json, pathlib, sys
# The demo records the backend that ran the Adam update: it must be the compiled one, not the reference fallback.
text = json.dumps(json.loads((pathlib.Path(sys.argv[1]) / "metrics.json").read_text()))
if '"adam_decay": "cpu"' not in text:
    sys.exit(f"the demo did not run on the compiled cpu backend (no adam_decay: cpu in {sys.argv[1]}/metrics.json)")
print("demo ran on the compiled cpu backend")
EOF
say "command 1 done"

# Command 2 (its pytest is the README's; -p no:cacheprovider only keeps the copy clean).
eval "${CMDS[1]} -p no:cacheprovider" 2>&1 | { grep -v "^WARNING: Location" || true; }
python -c "import transformers, lightning; print('transformers', transformers.__version__, 'lightning', lightning.__version__)"
say "command 2 done"

# The numerics tests again under MKL_CBWR=AVX2 and ATEN_CPU_CAPABILITY=default (+ FUSEDECAY_CPU_VECTORS=split), in
# this venv.
bash .ci/numerics_matrix.sh --parallel   # the two settings at the same time (their outputs one after the other)
say "done"
