"""d2_norms: batch-independent normalizers (FRN+TLU, GN, GN+WS, NF-ResNets) for Detectron2."""
from . import compat

compat.apply()

__version__ = "0.1.0"
