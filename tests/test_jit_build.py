"""The just-in-time build of the CPU kernels (fusedecay._jit), as a `pip install` with build isolation gets it.

Each case runs in a fresh interpreter in which the ahead-of-time ``fusedecay._C`` cannot be imported (as after an
isolated install), with its own cache folder:

* first use compiles once (one progress line), into a folder named by torch version, C++ ABI, Python, machine
  and source hash, and the compiled "cpu" backend then steps like the reference; a second process loads the
  cached build without compiling;
* no compiler: the package still works, on the reference, with one warning that says why; nothing is built;
* the cache key changes with the sources and nothing else does.
"""
import os
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from fusedecay import _jit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_NO_AOT = """
import sys
class _NoAheadOfTimeBuild:
    def find_spec(self, name, path=None, target=None):
        if name in ("fusedecay._C", "fusedecay._C_cuda"):
            raise ImportError(f"{name} is not installed (blocked for this test)")
sys.meta_path.insert(0, _NoAheadOfTimeBuild())
sys.path.insert(0, sys.argv[1])
"""

_STEP_VS_REFERENCE = _NO_AOT + """
import warnings
import torch
from fusedecay import AdamHD, _cpp_backend, available_backends
assert "cpu" in available_backends()
torch.manual_seed(0)
shapes = [(37,), (5, 7), (0,), (65, 130)]
a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
b = [torch.nn.Parameter(p.detach().clone()) for p in a]
fast = AdamHD(a, lr=1e-2, weight_decay=0.1, backend="cpu")
ref = AdamHD(b, lr=1e-2, weight_decay=0.1, backend="reference")
for _ in range(3):
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p); q.grad = p.grad.clone()
    fast.step(); ref.step()
for p, q in zip(a, b):
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for k in ("exp_avg", "exp_avg_sq", "delta_mu"):
        torch.testing.assert_close(fast.state[p][k], ref.state[q][k], rtol=1e-5, atol=1e-6)
print("ORIGIN", _cpp_backend.cpu_kernels_origin)
"""


def _run(code, cache, **env):
    full_env = {k: v for k, v in os.environ.items() if k not in ("FUSEDECAY_JIT", "TRITON_INTERPRET", "CXX")}
    full_env.update(FUSEDECAY_CACHE_DIR=str(cache), **env)
    out = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "python")],
                         capture_output=True, text=True, timeout=600, env=full_env)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.mark.slow  # one compile of the CPU kernels (about 40 s on 2 cores)
def test_first_use_compiles_once_into_a_versioned_cache_and_the_kernels_run(tmp_path):
    first = _run(_STEP_VS_REFERENCE, tmp_path)
    assert first.stderr.count("fusedecay: compiling the CPU kernels") == 1, first.stderr
    assert "fusedecay: CPU kernels compiled in" in first.stderr, first.stderr
    origin = first.stdout.split("ORIGIN ", 1)[1].strip()
    folder = os.path.basename(os.path.dirname(origin))
    assert os.path.dirname(os.path.dirname(origin)) == str(tmp_path / "jit"), origin
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    assert folder.startswith(f"torch{torch.__version__}-cxx11abi{abi}-{py}-{platform.machine()}-"), folder
    assert os.path.isfile(origin)

    again = _run(_STEP_VS_REFERENCE, tmp_path)
    assert "compiling" not in again.stderr, again.stderr
    assert again.stdout.split("ORIGIN ", 1)[1].strip() == origin


def test_without_a_compiler_the_reference_runs_with_one_warning_that_says_why(tmp_path):
    code = _NO_AOT + textwrap.dedent("""
    import warnings
    import torch
    from fusedecay import AdamHD, available_backends, backends
    assert "cpu" not in available_backends()
    reason = backends.unavailable_reasons()["fusedecay._cpp_backend"]
    assert "no C++ compiler" in reason and "/nonexistent/c++" in reason, reason
    p = torch.nn.Parameter(torch.randn(5, 3)); q = torch.nn.Parameter(p.detach().clone())
    a, b = AdamHD([p], lr=1e-2), AdamHD([q], lr=1e-2, backend="reference")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            p.grad = torch.ones_like(p); q.grad = torch.ones_like(q)
            a.step(); b.step()
    msgs = [str(x.message) for x in w if "fusedecay" in str(x.message)]
    assert len(msgs) == 1 and "reference" in msgs[0] and "no C++ compiler" in msgs[0], msgs
    assert torch.equal(p, q)
    print("ok")
    """)
    out = _run(code, tmp_path, CXX="/nonexistent/c++")
    assert out.stdout.strip().endswith("ok")
    assert "compiling" not in out.stderr
    assert not any(f.endswith(".so") for _, _, files in os.walk(tmp_path) for f in files)


def test_cache_key_follows_the_sources_and_the_cache_root(tmp_path, monkeypatch):
    src = tmp_path / "csrc"
    shutil.copytree(_jit.csrc_dir(), src)
    monkeypatch.setenv("FUSEDECAY_CACHE_DIR", str(tmp_path / "cache"))
    key = _jit.build_dir(str(src))
    assert os.path.dirname(key) == str(tmp_path / "cache" / "jit")
    assert _jit.build_dir(str(src)) == key  # deterministic
    header = src / "adam_decay_math.h"
    header.write_text(header.read_text() + "\n// edited\n")
    assert _jit.build_dir(str(src)) != key  # a changed header is a new build
    monkeypatch.setenv("FUSEDECAY_CACHE_DIR", str(tmp_path / "other"))
    assert os.path.dirname(_jit.build_dir(str(src))) == str(tmp_path / "other" / "jit")
