"""d2_norms' components in a detectron2-style LazyConfig model graph.

detectron2's own LazyConfigs describe the model as a graph of LazyCall nodes
(``configs/common/models/retinanet.py``, ``mask_rcnn_fpn.py``) that users edit in place
(``model.backbone.bottom_up.stages.depth = 101``). :func:`d2_norms_model` turns such a graph into
the same graph built from d2_norms' components, each built for the normalizer from the start::

    from detectron2.config import LazyConfig
    from d2_norms.lazy.components import d2_norms_model

    model = d2_norms_model(LazyConfig.load("configs/common/models/retinanet.py").model, "FRN")

The result is plain LazyCall data (saveable with ``LazyConfig.save``) and stays editable:
``model.backbone.bottom_up.depth``, ``model.head.norm``, ``model.roi_heads.box_head.conv_dims``.
It equals the model of the yacs cell with the same settings (``tests/test_lazy_components.py``:
module types, parameter names, shapes and outputs with shared weights, for every normalizer).

What changes, node by node (the norm of each part follows ``d2_norms.recipes.norm_fields``, the
rule of the shipped configs):

================================  =========================================================
node                              becomes
================================  =========================================================
``backbone``                      ``NormFPN`` (FPN norm)
``backbone.bottom_up``            :func:`d2n_resnet` (norm-aware ResNet, NF-ResNet for "NF"),
                                  depth / out_features / stem taken over; from scratch:
                                  ``freeze_at=0``, stride in the 3x3 conv
``backbone.top_block``            RetinaNet: ``NormLastLevelP6P7`` (activation of the FPN norm)
``head`` (RetinaNet)              ``D2NormsRetinaNetHead`` (``norm_per_level`` as the cells:
                                  one norm per pyramid level); ``_target_`` -> ``D2NormsRetinaNet``
``proposal_generator.head``       ``D2NormsRPNHead`` (norm "NF" for NF, else none)
``roi_heads.box_head``            ``D2NormsConvFCHead``, 4conv1fc (GN paper's head) when
                                  ``box_head_convs=4`` (the default)
``roi_heads.mask_head``           ``D2NormsMaskHead``
``pixel_std``                     unit-variance inputs, ImageNet std (from scratch, as every
                                  cell; NF's signal propagation needs them): detectron2's
                                  common models have ``pixel_std=[1, 1, 1]`` (caffe2 weights)
================================  =========================================================

``norm`` is one of the recipe's names (BN, SyncBN, GN, GNWS, FRN, NF: each part as the shipped
cells normalize it) or any other registered name (``FRN_LEPS``, ``GN_G16``, a third-party norm,
detectron2's ``LN``): every part gets it, the RPN head none unless the norm needs Scaled WS
convs. ``parts`` overrides single parts (``{"fpn": "GN", "head": "FRN_LEPS"}``; keys
``backbone``, ``fpn``, ``head``, ``rpn``, ``box_head``, ``mask_head``). What was changed is
logged (logger ``d2_norms.lazy``).
"""
import logging
from typing import Any, Optional, Sequence

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

__all__ = ["d2n_resnet", "d2_norms_model", "PART_KEYS"]

logger = logging.getLogger("d2_norms.lazy")

#: the parts ``d2_norms_model(parts=...)`` takes, and the yacs key each one stands for
PART_KEYS = {"backbone": "MODEL.RESNETS.NORM", "fpn": "MODEL.FPN.NORM",
             "head": "MODEL.RETINANET.NORM", "rpn": "MODEL.RPN.NORM",
             "box_head": "MODEL.ROI_BOX_HEAD.NORM", "mask_head": "MODEL.ROI_MASK_HEAD.NORM"}


def d2n_resnet(*, depth: int = 50, norm: str = "GN", out_features: Sequence[str] = ("res5",),
               freeze_at: int = 0, stem_out_channels: int = 64,
               res2_out_channels: Optional[int] = None,
               num_groups: int = 1, width_per_group: int = 64, stride_in_1x1: bool = False,
               res5_dilation: int = 1, zero_init_residual: bool = False,
               nf: Optional[dict] = None, in_channels: int = 3):
    """d2_norms' ResNet with explicit arguments (the LazyCall-able face of
    ``build_d2n_resnet_backbone``: the same builders, the same network): the norm-aware ResNet,
    or with ``norm="NF"`` the NF-ResNet (``nf``: ``MODEL.D2NORMS.NF`` keys in lower case, e.g.
    ``{"alpha": 0.2, "skip_gain_init": 0.0}``). ``res2_out_channels`` None: 64 for ResNet-18/34
    (basic blocks), 256 otherwise."""
    from detectron2.config import get_cfg

    from d2_norms.config import add_d2_norms_config
    from d2_norms.modeling.backbone import build_d2n_resnet_backbone

    cfg = add_d2_norms_config(get_cfg())
    r = cfg.MODEL.RESNETS
    r.DEPTH, r.NORM, r.OUT_FEATURES = int(depth), norm, list(out_features)
    if res2_out_channels is None:
        res2_out_channels = 64 if int(depth) in (18, 34) else 256
    r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS = int(stem_out_channels), int(res2_out_channels)
    r.NUM_GROUPS, r.WIDTH_PER_GROUP = int(num_groups), int(width_per_group)
    r.STRIDE_IN_1X1, r.RES5_DILATION = bool(stride_in_1x1), int(res5_dilation)
    cfg.MODEL.BACKBONE.FREEZE_AT = int(freeze_at)
    cfg.MODEL.D2NORMS.ZERO_INIT_RESIDUAL = bool(zero_init_residual)
    for key, value in (nf or {}).items():
        if key.upper() not in cfg.MODEL.D2NORMS.NF:
            raise KeyError(f"d2n_resnet: nf={{{key!r}: ...}} is not an NF-ResNet setting; the "
                           f"settings are {sorted(k.lower() for k in cfg.MODEL.D2NORMS.NF)}")
        setattr(cfg.MODEL.D2NORMS.NF, key.upper(), value)
    return build_d2n_resnet_backbone(cfg, ShapeSpec(channels=int(in_channels)))


def _depth_of(bottom_up) -> int:
    stages = bottom_up.get("stages") if hasattr(bottom_up, "get") else None
    if stages is not None and "depth" in stages:
        return int(stages["depth"])
    return int(bottom_up.get("depth", 50))


def _target_name(node) -> str:
    target = node.get("_target_") if hasattr(node, "get") else None
    return getattr(target, "__name__", str(target))


def _fields_for(detector: str, norm: str) -> dict:
    """The norm of each part (yacs keys) for ``norm``: :func:`d2_norms.recipes.normalizer_fields`
    (the recipe's rule for its names, the same name everywhere, RPN only for Scaled WS, for any
    other registered name)."""
    import difflib

    from d2_norms import recipes
    from d2_norms.config import NORM_KEYS
    from d2_norms.engine.errors import LazyConfigError
    from d2_norms.layers import UnknownNormError, detectron2_norm_names, registered_norms

    try:
        fields = recipes.normalizer_fields(detector, norm)
    except UnknownNormError:
        names = sorted(set(registered_norms()) | set(detectron2_norm_names()))
        close = ([n for n in names if n.lower() == str(norm).lower()]
                 or difflib.get_close_matches(str(norm), names, n=3, cutoff=0.5))
        raise LazyConfigError(
            f"d2_norms_model: unknown normalizer {norm!r}"
            + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else "")
            + f"; registered: {', '.join(names)}; parametric GN_G<groups>, GN_C<k>, "
            "GNWS_G<groups>, GNWS_C<k>; register your own with "
            "d2_norms.layers.register_norm") from None
    return {k: v for k, v in fields.items() if k in NORM_KEYS}


def model_parts(detector: str) -> tuple:
    """The parts (keys of :data:`PART_KEYS`) a ``detector`` model has."""
    return ("backbone", "fpn") + (("head",) if detector == "retinanet"
                                  else ("rpn", "box_head", "mask_head"))


def fields_with_parts(detector: str, norm: str, parts: Optional[dict] = None,
                      where: str = "") -> dict:
    """The norm of each part (yacs keys) for ``norm`` with ``parts`` ({part: norm}) replacing
    single parts (the RPN takes the name as it is; the others as that name's rule gives it)."""
    from d2_norms.engine.errors import LazyConfigError

    fields = _fields_for(detector, norm)
    for part, part_norm in (parts or {}).items():
        if part not in model_parts(detector):
            raise LazyConfigError(
                f"{where}parts={{{part!r}: ...}}: a {detector} model has the parts "
                f"{', '.join(model_parts(detector))}")
        key = PART_KEYS[part]
        fields[key] = _fields_for(detector, part_norm)[key] if part != "rpn" else part_norm
    return fields


def d2_norms_model(model: Any, norm: str, *, box_head_convs: int = 4,
                   parts: Optional[dict] = None, input_std: Optional[Sequence[float]] = None):
    """``model`` (a detectron2 LazyConfig model node: RetinaNet or GeneralizedRCNN with an FPN
    backbone, as in detectron2's ``configs/common/models``) rebuilt from d2_norms' components for
    ``norm`` (see the module docstring). ``input_std``: the pixel std to set (None: ImageNet's,
    unit-variance inputs as the from-scratch cells; ``False`` keeps the graph's). Returns the
    node (changed in place)."""
    from d2_norms import recipes
    from d2_norms.config_checks import UNIT_VARIANCE_PIXEL_STD
    from d2_norms.engine.errors import LazyConfigError
    from d2_norms.modeling.fpn import NormFPN, NormLastLevelP6P7
    from d2_norms.modeling.heads import (D2NormsConvFCHead, D2NormsMaskHead, D2NormsRetinaNet,
                                         D2NormsRetinaNetHead, D2NormsRPNHead)

    meta = _target_name(model)
    if "head" in model and "backbone" in model and "RetinaNet" in meta:
        detector = "retinanet"
    elif "roi_heads" in model and "proposal_generator" in model:
        detector = "mask_rcnn"
    else:
        raise LazyConfigError(
            f"d2_norms_model: a {meta} model node is neither a RetinaNet nor a GeneralizedRCNN "
            "(Mask / Faster R-CNN) graph as in detectron2's configs/common/models")
    if "bottom_up" not in model.backbone:
        raise LazyConfigError("d2_norms_model: model.backbone has no bottom_up: an FPN backbone "
                              "(detectron2's configs/common/models) is needed")
    fields = fields_with_parts(detector, norm, parts, "d2_norms_model: ")
    changes = []
    bottom_up = model.backbone.bottom_up
    stem = bottom_up.get("stem") or {}
    model.backbone.bottom_up = L(d2n_resnet)(
        depth=_depth_of(bottom_up), norm=fields["MODEL.RESNETS.NORM"],
        out_features=list(bottom_up.get("out_features", ["res5"])), freeze_at=0,
        stem_out_channels=int(stem.get("out_channels", 64)),
        in_channels=int(stem.get("in_channels", 3)))
    changes.append(f"backbone.bottom_up: d2n_resnet (norm {fields['MODEL.RESNETS.NORM']!r}, "
                   "freeze_at 0)")
    model.backbone._target_ = NormFPN
    model.backbone.norm = fields["MODEL.FPN.NORM"]
    changes.append(f"backbone: NormFPN (norm {fields['MODEL.FPN.NORM']!r})")
    if input_std is not False and "pixel_std" in model:
        std = list(UNIT_VARIANCE_PIXEL_STD) if input_std is None else list(input_std)
        if str(model.get("input_format", "BGR")).upper() == "RGB" and input_std is None:
            std = std[::-1]
        if [float(v) for v in model.pixel_std] != std:
            changes.append(f"pixel_std: {list(model.pixel_std)} -> {std} (unit-variance inputs "
                           "for training from scratch; NF's signal propagation assumes them)")
            model.pixel_std = std
    if "pixel_std" in model and any(_conv_kind(v) == "scaled_ws" for v in fields.values()):
        from d2_norms.config_checks import nf_input_problem

        problem = nf_input_problem(model.pixel_std, "model.pixel_std", "model.pixel_std")
        if problem is not None:  # only where input_std=False kept detectron2's
            raise LazyConfigError(f"d2_norms_model: {problem}")
    if detector == "retinanet":
        model._target_ = D2NormsRetinaNet
        top = model.backbone.top_block
        model.backbone.top_block = L(NormLastLevelP6P7)(
            in_channels=top.get("in_channels", 2048), out_channels=top.get("out_channels", 256),
            in_feature=top.get("in_feature", "res5"), norm=fields["MODEL.FPN.NORM"])
        model.head._target_ = D2NormsRetinaNetHead
        model.head.norm = fields["MODEL.RETINANET.NORM"]
        # one norm per pyramid level where the recipe's RetinaNet cells have one (issue 13 item 7)
        head_norm = fields["MODEL.RETINANET.NORM"]
        model.head.norm_per_level = bool(head_norm) and bool(
            recipes.normalizer_fields(detector, head_norm)["MODEL.RETINANET.NORM_PER_LEVEL"])
        changes.append(f"RetinaNet: D2NormsRetinaNet, head D2NormsRetinaNetHead (norm "
                       f"{head_norm!r}, norm_per_level {model.head.norm_per_level})")
        _log(changes)
        return model
    model.proposal_generator.head._target_ = D2NormsRPNHead
    model.proposal_generator.head.norm = fields.get("MODEL.RPN.NORM", "")
    changes.append(f"proposal_generator.head: D2NormsRPNHead (norm "
                   f"{fields.get('MODEL.RPN.NORM', '')!r})")
    roi = model.roi_heads
    box = roi.box_head
    box._target_ = D2NormsConvFCHead
    box.conv_norm = fields["MODEL.ROI_BOX_HEAD.NORM"]
    if box_head_convs:
        box.conv_dims = [256] * int(box_head_convs)
        box.fc_dims = [1024]
    changes.append(f"roi_heads.box_head: D2NormsConvFCHead (norm "
                   f"{fields['MODEL.ROI_BOX_HEAD.NORM']!r}, conv_dims {list(box.conv_dims)})")
    if "mask_head" in roi:
        roi.mask_head._target_ = D2NormsMaskHead
        roi.mask_head.conv_norm = fields["MODEL.ROI_MASK_HEAD.NORM"]
        changes.append(f"roi_heads.mask_head: D2NormsMaskHead (norm "
                       f"{fields['MODEL.ROI_MASK_HEAD.NORM']!r})")
    _log(changes)
    return model


def _conv_kind(norm) -> str:
    from d2_norms.layers import norm_conv_kind

    try:
        return norm_conv_kind(norm)
    except Exception:
        return "plain"


def _log(changes) -> None:
    logger.info("d2_norms_model changed:\n  " + "\n  ".join(changes))
