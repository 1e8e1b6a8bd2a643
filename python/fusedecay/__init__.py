"""fusedecay: fused optimizer kernels for AdamHD (Huber decay), AdamC and ScionC (corrected decay).

    from fusedecay import AdamHD, AdamC, ScionC, param_groups

    opt = AdamHD(param_groups(model, "adamhd"), lr=3e-4, weight_decay=0.1)

See README.md for the update rules, backends and how each is tested.
"""
from . import functional, reference
from .backends import available_backends
from .groups import ParamGroups, param_groups, param_roles
from .optim import AdamC, AdamHD, ScionC, load_adam_state

__version__ = "0.1.0"
__all__ = ["AdamHD", "AdamC", "ScionC", "param_groups", "param_roles", "ParamGroups", "load_adam_state", "functional",
           "reference", "available_backends", "__version__"]
