"""Compile the CPU kernels on first use when no ahead-of-time build is there (DeepSpeed's scheme).

Two ways to get ``torch.ops.fusedecay.adam_decay_`` on the CPU:

* **ahead of time**: ``setup.py`` builds ``fusedecay._C`` when torch is importable at build time
  (``pip install --no-build-isolation``, ``python setup.py build_ext --inplace``);
* **just in time** (this module): a plain ``pip install .`` builds in an isolated environment without torch,
  so the package installs pure Python plus its C++ sources (``fusedecay/csrc``). When the backends first load
  (the first optimizer constructed), :func:`build_cpu` compiles them with ``torch.utils.cpp_extension.load`` (ninja) into a cache
  folder keyed by torch version, C++ ABI, Python version, machine and a hash of the sources and flags, so a
  new torch (or changed sources) gets its own build and a cached one loads without compiling.

Failures (no compiler, no ninja, a compile error) raise ImportError with the reason; ``fusedecay.backends``
records it and ``backend="auto"`` falls back to the eager reference with one warning.

Environment: ``FUSEDECAY_JIT=0`` never compiles at run time; ``FUSEDECAY_CACHE_DIR`` overrides the cache
root (default ``$XDG_CACHE_HOME/fusedecay`` or ``~/.cache/fusedecay``); ``CXX`` names the compiler (torch's
rule; default ``c++``).

This file imports torch only inside functions: ``setup.py`` loads it for the sources and flags below, which
the ahead-of-time build uses too.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import time
from typing import List, Optional

#: The CPU extension's sources, relative to the csrc folder.
CPU_SOURCES = ("ops.cpp", "cpu/adam_decay_cpu.cpp")
#: Compiler flags of the CPU extension, both builds (-ffp-contract=off: no FMA contraction, so every vector clone
#: and the scalar loop round alike; docs/kernels.md). OpenMP runs the chunks in parallel.
CPU_CXX_FLAGS = ("-O3", "-g0", "-fno-math-errno", "-ffp-contract=off", "-fopenmp")
CPU_LD_FLAGS = ("-fopenmp",)
JIT_NAME = "fusedecay_cpu"

_HERE = os.path.dirname(os.path.abspath(__file__))


def csrc_dir() -> str:
    """The C++ sources: ``fusedecay/csrc`` (a copy in a wheel, a link to the checkout's csrc/ in a clone)."""
    return os.path.join(_HERE, "csrc")


def enabled() -> bool:
    return os.environ.get("FUSEDECAY_JIT", "1") != "0"


def cache_root() -> str:
    if os.environ.get("FUSEDECAY_CACHE_DIR"):
        return os.environ["FUSEDECAY_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fusedecay")


def _source_files(csrc: str) -> List[str]:
    """Every C++ source and header the CPU build can include (sorted, so the hash is stable)."""
    out = []
    for root, _, files in os.walk(csrc, followlinks=True):
        out += [os.path.join(root, f) for f in files if f.endswith((".cpp", ".h", ".cuh"))]
    return sorted(out)


def build_dir(csrc: Optional[str] = None) -> str:
    """The cache folder of this torch build + these sources: one per (torch version, ABI, Python, machine, hash)."""
    import torch

    csrc = csrc or csrc_dir()
    h = hashlib.sha256()
    h.update(" ".join(CPU_CXX_FLAGS + CPU_LD_FLAGS).encode())
    for path in _source_files(csrc):
        h.update(os.path.relpath(path, csrc).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    key = (f"torch{torch.__version__}-cxx11abi{abi}-py{sys.version_info[0]}{sys.version_info[1]}-"
           f"{platform.machine()}-{h.hexdigest()[:12]}")
    return os.path.join(cache_root(), "jit", key)


def _ninja_bin_dir() -> Optional[str]:
    """Where the ``ninja`` PyPI package put its binary, when it is not on PATH (a venv used without activating)."""
    try:
        import ninja
    except ImportError:
        return None
    return getattr(ninja, "BIN_DIR", None)


def build_cpu() -> str:
    """Compile (or load from the cache) the CPU kernels; returns the shared library's path.

    Prints one progress line to stderr before a compile and one after; nothing when the cache has the build.
    """
    import torch
    from torch.utils import cpp_extension

    if not enabled():
        raise ImportError("FUSEDECAY_JIT=0: not compiling the CPU kernels at run time")
    csrc = csrc_dir()
    if not os.path.isfile(os.path.join(csrc, CPU_SOURCES[0])):
        raise ImportError(f"the C++ sources are not installed ({csrc} has no {CPU_SOURCES[0]})")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise ImportError(f"no C++ compiler: {cxx!r} is not on PATH (set CXX, or install g++), so the CPU kernels "
                          "cannot be compiled")
    out_dir = build_dir(csrc)
    os.makedirs(out_dir, exist_ok=True)
    lib = os.path.join(out_dir, JIT_NAME + ".so")
    cached = os.path.isfile(lib)
    old_path = os.environ.get("PATH", "")
    ninja_dir = _ninja_bin_dir()
    if shutil.which("ninja") is None and ninja_dir:
        os.environ["PATH"] = ninja_dir + os.pathsep + old_path
    t0 = time.monotonic()
    if not cached:
        print(f"fusedecay: compiling the CPU kernels for torch {torch.__version__} (first use; about a minute) "
              f"into {out_dir}", file=sys.stderr, flush=True)
    try:
        if not cpp_extension.is_ninja_available():
            raise ImportError("ninja is not installed (pip install ninja), so the CPU kernels cannot be compiled")
        path = cpp_extension.load(
            name=JIT_NAME, sources=[os.path.join(csrc, s) for s in CPU_SOURCES], extra_include_paths=[csrc],
            extra_cflags=list(CPU_CXX_FLAGS), extra_ldflags=list(CPU_LD_FLAGS), build_directory=out_dir,
            is_python_module=False, verbose=False)
    except ImportError:
        raise
    except Exception as e:  # a compile or link error: keep the compiler's last lines
        tail = "\n".join(str(e).strip().splitlines()[-15:])
        raise ImportError(f"compiling the CPU kernels in {out_dir} failed:\n{tail}") from e
    finally:
        os.environ["PATH"] = old_path
    if not cached:
        print(f"fusedecay: CPU kernels compiled in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return path
