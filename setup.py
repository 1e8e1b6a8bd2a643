"""fusedecay build (docs/install.md).

The compiled CPU kernels come one of two ways (DeepSpeed's scheme):

    pip install -e .                             # build isolation: no torch at build time, so the package is
                                                 # pure Python + its C++ sources (fusedecay/csrc); the CPU kernels
                                                 # are compiled on first use (fusedecay._jit) and cached
    pip install -e . --no-build-isolation        # torch importable at build time: builds fusedecay._C (CPU) and,
                                                 # with CUDA torch + nvcc, fusedecay._C_cuda ahead of time
    python setup.py build_ext --inplace          # the same ahead-of-time build, without installing
    FUSEDECAY_NO_EXT=1 pip install ...           # no ahead-of-time build even where torch is importable
    FUSEDECAY_NO_CUDA=1 ...                      # skip only the CUDA extension
"""
import glob
import importlib.util
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _jit_module():
    """fusedecay/_jit.py without importing the package (which imports torch): the CPU sources and flags."""
    path = os.path.join(ROOT, "python", "fusedecay", "_jit.py")
    spec = importlib.util.spec_from_file_location("_fusedecay_jit", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _find_cuda_home():
    """Set CUDA_HOME when unset, to the toolkit that has the headers: the real path of the nvcc on PATH
    (``bin/nvcc`` under it), else /usr/local/cuda. torch guesses from ``which nvcc`` alone, which is wrong when
    nvcc is a wrapper script outside the toolkit (then cuda_runtime.h is not found)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    import shutil
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for d in candidates:
        if os.path.exists(os.path.join(d, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = d
            return


def _extensions():
    if os.environ.get("FUSEDECAY_NO_EXT", "0") == "1":
        return [], {}
    _find_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # building without torch: pure-Python package
        return [], {}
    jit = _jit_module()
    csrc = "csrc"
    exts = [CppExtension("fusedecay._C", sources=[f"{csrc}/{s}" for s in jit.CPU_SOURCES],
                         include_dirs=[os.path.join(ROOT, csrc)], extra_compile_args=list(jit.CPU_CXX_FLAGS),
                         extra_link_args=list(jit.CPU_LD_FLAGS))]
    want_cuda = os.environ.get("FUSEDECAY_NO_CUDA", "0") != "1"
    if want_cuda and torch.version.cuda is not None and CUDA_HOME is None:
        print("fusedecay: torch is a CUDA build but no CUDA toolkit was found: fusedecay._C_cuda is NOT built "
              "(set CUDA_HOME to the toolkit with nvcc and include/cuda_runtime.h)")
    if want_cuda and torch.version.cuda is not None and CUDA_HOME is not None:
        exts.append(CUDAExtension(
            "fusedecay._C_cuda",
            sources=[f"{csrc}/cuda/adam_decay_cuda_glue.cpp", f"{csrc}/cuda/adam_decay_cuda.cu"],
            include_dirs=[os.path.join(ROOT, csrc)],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]}))
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fusedecay",
    version="0.1.0",
    description="Fused optimizer kernels for AdamHD, AdamC and ScionC (PyTorch)",
    # python/fusedecay/triton_kernels and python/fusedecay/csrc are symlinks to the top-level triton_kernels/ and
    # csrc/ (kept at the top level by the agreed layout, installed inside the package: the C++ sources are what
    # the just-in-time build compiles).
    packages=find_packages("python"),
    package_dir={"": "python"},
    package_data={"fusedecay": ["csrc/*.h", "csrc/*.cpp", "csrc/cpu/*.h", "csrc/cpu/*.cpp", "csrc/cuda/*.h",
                                "csrc/cuda/*.cpp", "csrc/cuda/*.cu"]},
    # The versions CI tests (README, "Tested versions"): torch 2.11 is the oldest, Python 3.11 and 3.12.
    python_requires=">=3.11",
    install_requires=["torch>=2.11", "ninja"],
    extras_require={
        "triton": ["triton"],
        "demo": ["matplotlib", "tqdm"],
        # Everything tests/ imports; the framework tests (Trainer, Lightning) fail rather than skip under CI=true.
        "test": ["pytest", "pytest-benchmark", "numpy", "matplotlib", "tqdm", "transformers", "accelerate",
                 "lightning", "triton; platform_system == 'Linux'"],
    },
    entry_points={"console_scripts": ["fusedecay-demo=fusedecay.demo.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
