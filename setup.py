"""fusedecay build.

Pure-Python install works everywhere; compiled backends are added by csrc/ (see README "Building").
    pip install -e . --no-build-isolation
"""
from setuptools import find_packages, setup

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
)
