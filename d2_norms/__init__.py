"""d2_norms: batch-independent normalizers (FRN+TLU, GN, GN+WS, NF-ResNets) for Detectron2.

``import d2_norms`` applies the compatibility shims for pure-Python detectron2 v0.6, then
registers the normalizers (detectron2's ``get_norm`` names), the backbones
(``BACKBONE_REGISTRY``) and the synthetic datasets (``DatasetCatalog``).
"""
from . import compat

compat.apply()
compat.check_detectron2()  # a clear error naming the version and what is missing

from . import layers  # noqa: E402  (normalizer registry; patches detectron2's get_norm)
from . import modeling  # noqa: E402  (backbones)
from . import data  # noqa: E402  (synthetic datasets, input checks)
from . import evaluation  # noqa: E402
from .config import add_d2_norms_config  # noqa: E402

__version__ = "0.1.0"
__all__ = ["add_d2_norms_config", "compat", "layers", "modeling", "data", "evaluation"]
