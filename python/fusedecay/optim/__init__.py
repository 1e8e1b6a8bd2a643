from .adam_decay import AdamC, AdamHD
from .scionc import ScionC

__all__ = ["AdamHD", "AdamC", "ScionC"]
