"""The backbones d2_norms registers in detectron2's ``BACKBONE_REGISTRY``.

| MODEL.BACKBONE.NAME                       | network                                            |
|-------------------------------------------|----------------------------------------------------|
| ``build_d2n_resnet_backbone``             | ResNet (C4 / plain features: stem, res2..res5)     |
| ``build_d2n_resnet_fpn_backbone``         | ResNet + FPN P2-P6 (Mask R-CNN, Faster R-CNN)      |
| ``build_d2n_retinanet_resnet_fpn_backbone`` | ResNet + FPN P3-P7 (RetinaNet)                   |

``MODEL.RESNETS.NORM`` picks the network: any name of the d2_norms norm registry gives the
norm-aware ResNet (BN, SyncBN, GN, GNWS, FRN, "" ...), ``"NF"`` gives the NF-ResNet. One key
for all normalizers, so a normalizer sweep changes one YAML field and never the backbone name.
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY

from d2_norms.config import NF_NORM
from .fpn import build_fpn
from .nf_resnet import build_nf_resnet
from .resnet import build_norm_resnet

__all__ = [
    "build_d2n_resnet_backbone",
    "build_d2n_resnet_fpn_backbone",
    "build_d2n_retinanet_resnet_fpn_backbone",
]


def _check_cfg_has_d2norms(cfg) -> None:
    if "D2NORMS" not in cfg.MODEL or "NF" not in cfg.MODEL.D2NORMS:
        raise KeyError(
            "cfg.MODEL.D2NORMS is missing: call d2_norms.add_d2_norms_config(cfg) before "
            "merging a d2_norms YAML."
        )


@BACKBONE_REGISTRY.register()
def build_d2n_resnet_backbone(cfg, input_shape: ShapeSpec):
    """Norm-aware ResNet, or NF-ResNet when ``MODEL.RESNETS.NORM == "NF"``."""
    _check_cfg_has_d2norms(cfg)
    from d2_norms.config_checks import check_norm_field_applied

    check_norm_field_applied(cfg)
    if cfg.MODEL.RESNETS.NORM == NF_NORM:
        return build_nf_resnet(cfg, input_shape)
    return build_norm_resnet(cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_d2n_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet + FPN with P2-P6 (P6 = max-pool of P5), for Mask R-CNN."""
    return build_fpn(cfg, build_d2n_resnet_backbone(cfg, input_shape), retinanet=False)


@BACKBONE_REGISTRY.register()
def build_d2n_retinanet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet + FPN with P3-P7 (P6/P7 = stride-2 convs on C5), for RetinaNet."""
    return build_fpn(cfg, build_d2n_resnet_backbone(cfg, input_shape), retinanet=True)
