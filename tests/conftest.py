import os
import sys

# Import the package from this checkout (works for worktrees and un-installed clones alike).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

# Triton kernels run on the CPU through the interpreter when no GPU is present. The flag is read when a
# kernel is defined, so it must be set before anything imports fusedecay.triton_kernels.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# ---------------------------------------------------------------------------------------------
# Triton interpreter check. Some Triton releases' interpreters (seen: triton 3.6.0 with numpy >= 2.4)
# cannot run a loop whose bounds are run-time values: they call int() on a one-element array, which
# newer numpy refuses. The compiled kernels are unaffected; the CPU tests of them are. Tests marked
# `triton` fail with one clear message instead of an interpreter traceback each.
# ---------------------------------------------------------------------------------------------
_interpreter_problem = None


def _triton_interpreter_problem():
    global _interpreter_problem
    if _interpreter_problem is None:
        _interpreter_problem = ""
        try:
            import numpy
            import triton
            import triton.language as tl

            @triton.jit
            def _probe(out_ptr, n):
                acc = 0
                for i in range(0, n, 2):
                    acc += i
                tl.store(out_ptr, acc)

            out = torch.zeros(1, dtype=torch.int32)
            _probe[(1,)](out, 7)
            if int(out) != 12:
                _interpreter_problem = f"probe kernel returned {int(out)}, expected 12"
        except Exception as e:  # noqa: BLE001 - report whatever the interpreter raised
            import numpy
            import triton
            _interpreter_problem = (
                f"the Triton interpreter (triton {triton.__version__}, numpy {numpy.__version__}) cannot run "
                f"a run-time-bounded loop: {type(e).__name__}: {e}. Known cause: triton <= 3.6 with numpy >= 2.4; "
                "install 'numpy<2.4' or a newer triton for the CPU tests of the Triton kernels")
    return _interpreter_problem


def pytest_runtest_setup(item):
    if item.get_closest_marker("triton") and os.environ.get("TRITON_INTERPRET") == "1":
        problem = _triton_interpreter_problem()
        if problem:
            import pytest
            pytest.fail(problem, pytrace=False)
