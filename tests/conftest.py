import os
import sys

# Import the package from this checkout (works for worktrees and un-installed clones alike).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

# Triton kernels run on the CPU through the interpreter when no GPU is present. The flag is read when a
# kernel is defined, so it must be set before anything imports fusedecay.triton_kernels.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
