from ._checkpoint import load_adam_state
from .adam_decay import AdamC, AdamHD
from .scionc import ScionC

__all__ = ["AdamHD", "AdamC", "ScionC", "load_adam_state"]
