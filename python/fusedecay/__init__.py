"""fusedecay: fused optimizer kernels for AdamHD (Huber decay), AdamC and ScionC (corrected decay).

    from fusedecay import AdamHD, AdamC, ScionC

See README.md for the update rules, backends and how each is tested.
"""
from . import functional, reference
from .backends import available_backends
from .optim import AdamC, AdamHD, ScionC

__version__ = "0.1.0"
__all__ = ["AdamHD", "AdamC", "ScionC", "functional", "reference", "available_backends", "__version__"]
