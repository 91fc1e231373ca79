"""d2_norms' models: backbones and heads, registered in detectron2's registries on import.

* ``build_d2n_resnet_backbone`` - ResNet-18/34/50/101/152 with any registry norm and its paired
  activation (FRN -> TLU everywhere), or the NF-ResNet with ``MODEL.RESNETS.NORM: "NF"``;
* ``build_d2n_resnet_fpn_backbone`` - + FPN P2-P6 (Mask R-CNN);
* ``build_d2n_retinanet_resnet_fpn_backbone`` - + FPN P3-P7 (RetinaNet).

Heads (:mod:`d2_norms.modeling.heads`): ``D2NormsRetinaNet`` (META_ARCHITECTURE),
``D2NormsRPNHead``, ``D2NormsConvFCHead``, ``D2NormsMaskHead``. Config keys:
:mod:`d2_norms.config`; see docs/backbones.md.
Signal Propagation Plots: :mod:`d2_norms.modeling.spp` and ``tools/spp.py``.
"""
from .backbone import (build_d2n_resnet_backbone, build_d2n_resnet_fpn_backbone,
                       build_d2n_retinanet_resnet_fpn_backbone)
from .fpn import NormFPN, NormLastLevelP6P7
from . import heads  # noqa: F401  (registers D2NormsRetinaNet and the RPN / box / mask heads)
from .nf_resnet import NFBasicBlock, NFBottleneckBlock, NFStem, build_nf_resnet, nf_betas
from .resnet import NormBasicBlock, NormBottleneckBlock, NormStem, build_norm_resnet

__all__ = [
    "build_d2n_resnet_backbone",
    "build_d2n_resnet_fpn_backbone",
    "build_d2n_retinanet_resnet_fpn_backbone",
    "build_norm_resnet",
    "build_nf_resnet",
    "nf_betas",
    "NormBasicBlock",
    "NormBottleneckBlock",
    "NormStem",
    "NFBasicBlock",
    "NFBottleneckBlock",
    "NFStem",
    "NormFPN",
    "NormLastLevelP6P7",
]
