"""Triton kernels, installed as ``fusedecay.triton_kernels``. Importing this package needs triton."""
