"""fusedecay build.

Pure-Python install works everywhere; compiled backends come from csrc/ (see docs/kernels.md):

    pip install -e . --no-build-isolation        # builds fusedecay._C (CPU) and, with CUDA torch + nvcc,
                                                 # fusedecay._C_cuda, in place inside python/fusedecay/
    python setup.py build_ext --inplace          # the same, without installing
    FUSEDECAY_NO_EXT=1 pip install -e .          # pure Python (backend "auto" falls back to the reference)
    FUSEDECAY_NO_CUDA=1 ...                      # skip only the CUDA extension
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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
    cxx = ["-O3", "-g0", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
    csrc = "csrc"
    exts = [CppExtension("fusedecay._C", sources=[f"{csrc}/ops.cpp", f"{csrc}/cpu/adam_decay_cpu.cpp"],
                         include_dirs=[os.path.join(ROOT, csrc)], extra_compile_args=cxx,
                         extra_link_args=["-fopenmp"])]
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
    # python/fusedecay/triton_kernels is a symlink to the top-level triton_kernels/ (kept at the top level
    # by the agreed layout, installed inside the package).
    packages=find_packages("python"),
    package_dir={"": "python"},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={"triton": ["triton"], "test": ["pytest", "pytest-benchmark", "numpy"],
                    "demo": ["matplotlib", "tqdm"]},
    entry_points={"console_scripts": ["fusedecay-demo=fusedecay.demo.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
