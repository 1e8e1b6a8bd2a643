"""fusedecay build.

Pure-Python install works everywhere; compiled backends are added by csrc/ (see README "Building").
    pip install -e . --no-build-isolation
"""
from setuptools import setup

setup(
    name="fusedecay",
    version="0.1.0",
    description="Fused optimizer kernels for AdamHD, AdamC and ScionC (PyTorch)",
    packages=["fusedecay", "fusedecay.reference", "fusedecay.optim", "fusedecay.triton_kernels"],
    package_dir={"fusedecay": "python/fusedecay", "fusedecay.triton_kernels": "triton_kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={"triton": ["triton"], "test": ["pytest", "pytest-benchmark", "numpy"],
                    "demo": ["matplotlib", "tqdm"]},
)
