"""Stock detectron2 components and d2_norms' names (d2_norms/config_checks.py).

d2_norms leaves detectron2's ``get_norm`` as it is: stock RetinaNet and Mask R-CNN (R18-FPN,
tiny images, CPU) build and train with detectron2's own names after ``import d2_norms``, with
detectron2's own layers. A stock component given a name only d2_norms builds is refused by the
config checks before anything is built, every key at once, each message naming the component,
the key and the d2_norms component to use.
"""
import pytest
import torch
from torch import nn

import d2_norms  # noqa: F401
import d2_norms.layers as L
from d2_norms.config_checks import norm_problems
from d2_norms.layers import detectron2_norm_names

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def eager_frn():
    # The compiled kernels are checked against eager in test_layers_frn; eager keeps this fast.
    previous = L.frn._IMPL
    L.set_frn_impl("eager")
    yield
    L.set_frn_impl(previous)


def make_cfg(arch, norm):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    for field in ("RESNETS", "FPN", "RETINANET", "ROI_BOX_HEAD", "ROI_MASK_HEAD"):
        getattr(cfg.MODEL, field).NORM = norm
    if arch == "retinanet":
        cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
        cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
        cfg.MODEL.RETINANET.NUM_CLASSES = 3
        cfg.MODEL.RETINANET.NUM_CONVS = 2
    else:
        cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
        cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
        cfg.MODEL.MASK_ON = True
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
        cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 32
        cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 200
        cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 50
        cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
        cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
        cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
        cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
        cfg.MODEL.ROI_BOX_HEAD.NUM_CONV = 2
        cfg.MODEL.ROI_BOX_HEAD.CONV_DIM = 64
        cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 1
        cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
        cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
        cfg.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
        cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 2
        cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 64
        cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.FPN.IN_FEATURES = cfg.MODEL.RESNETS.OUT_FEATURES
    return cfg


def make_batch(num_images=2, h=64, w=96):
    from detectron2.structures import BitMasks, Boxes, Instances

    gen = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(num_images):
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 90.0, 60.0]]))
        inst.gt_classes = torch.tensor([0, 2])
        masks = torch.zeros(2, h, w, dtype=torch.bool)
        masks[0, 6:50, 4:40] = True
        masks[1, 10:60, 30:90] = True
        inst.gt_masks = BitMasks(masks)
        batch.append({"image": torch.rand(3, h, w, generator=gen) * 255, "instances": inst,
                      "height": h, "width": w})
    return batch


def build(arch, norm):
    from detectron2.modeling import build_model

    model = build_model(make_cfg(arch, norm))
    model.train()
    return model


def train_step(model, batch):
    from detectron2.utils.events import EventStorage

    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    with EventStorage(0):
        losses = model(batch)
    total = sum(losses.values())
    opt.zero_grad()
    total.backward()
    opt.step()
    return losses


REFUSED = ["FRN", "FRN_LEPS", "GNWS", "GNWS_G16", "NF", "GN_G16"]
HONOURED = sorted(detectron2_norm_names() - {"LN", "nnSyncBN"}) + [""]


@pytest.mark.parametrize("arch", ["retinanet", "mask_rcnn"])
@pytest.mark.parametrize("norm", HONOURED)
def test_stock_components_train_with_detectron2_names(arch, norm):
    from detectron2.layers.batch_norm import get_norm as detectron2_get_norm

    cfg = make_cfg(arch, norm)
    assert norm_problems(cfg) == []  # the checks let detectron2's own names through
    try:
        model = build(arch, norm)
    except ValueError as e:
        if arch == "retinanet" and norm == "GN" and "num_groups" in str(e):
            # detectron2 v0.6's RetinaNetHead builds GroupNorm(32, 1) to read the type: its own
            # bug, unchanged by d2_norms (the import is neutral)
            pytest.skip("detectron2 v0.6's own GN in its own RetinaNetHead")
        raise
    losses = train_step(model, make_batch())
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    types = {type(m) for m in model.modules()}
    assert not any(t.__module__.startswith("d2_norms") for t in types)
    if norm and norm != "FrozenBN":  # detectron2's own names give detectron2's own layers
        assert type(detectron2_get_norm(norm, 32)) in types, norm


# (component, the key whose norm it builds, what the message must tell the user to use)
STOCK = {
    "resnet": ("detectron2's ResNet", "MODEL.RESNETS.NORM", "build_d2n_resnet_fpn_backbone"),
    "fpn": ("detectron2's FPN", "MODEL.FPN.NORM", "build_d2n_resnet_fpn_backbone"),
    "retinanet_head": ("detectron2's RetinaNetHead", "MODEL.RETINANET.NORM",
                       "MODEL.META_ARCHITECTURE: D2NormsRetinaNet"),
    "box_head": ("detectron2's FastRCNNConvFCHead", "MODEL.ROI_BOX_HEAD.NORM",
                 "MODEL.ROI_BOX_HEAD.NAME: D2NormsConvFCHead"),
    "mask_head": ("detectron2's MaskRCNNConvUpsampleHead", "MODEL.ROI_MASK_HEAD.NORM",
                  "MODEL.ROI_MASK_HEAD.NAME: D2NormsMaskHead"),
}
WHY = {"FRN": "pairs with TLU", "FRN_LEPS": "pairs with TLU", "GNWS": "weight-standardized",
       "GNWS_G16": "weight-standardized", "NF": "Scaled WS", "GN_G16": "detectron2's own names"}


def _set(cfg, key, value):
    node = cfg
    for part in key.split(".")[:-1]:
        node = getattr(node, part)
    setattr(node, key.split(".")[-1], value)


def _cfg_with_only(component, norm):
    arch = "retinanet" if component == "retinanet_head" else "mask_rcnn"
    cfg = make_cfg(arch, "")
    _set(cfg, STOCK[component][1], norm)
    return cfg


@pytest.mark.parametrize("norm", REFUSED)
@pytest.mark.parametrize("component", sorted(STOCK))
def test_config_checks_refuse_names_a_stock_component_cannot_build(component, norm):
    what, key, use = STOCK[component]
    problems = norm_problems(_cfg_with_only(component, norm))
    assert len(problems) == 1, problems
    msg = problems[0]
    assert msg.startswith(f"{key}={norm!r}") and what in msg, msg
    assert use in msg and WHY[norm] in msg, msg
    if norm == "NF" and component == "resnet":
        assert "residual scaling" in msg  # not just the convs: the NF-ResNet


@pytest.mark.parametrize("component", sorted(STOCK))
def test_stock_component_given_a_d2_norms_name_fails_in_detectron2_itself(component):
    """Without the checks, detectron2 refuses the name its own way (its get_norm is not
    changed): the checks exist so that this happens before anything is built or written."""
    from detectron2.modeling import build_model

    with pytest.raises(KeyError):
        build_model(_cfg_with_only(component, "FRN"))


def test_config_checks_report_every_key_at_once():
    cfg = make_cfg("mask_rcnn", "")
    cfg.MODEL.RESNETS.NORM = "FRN"
    cfg.MODEL.FPN.NORM = "GNWS"
    cfg.MODEL.ROI_BOX_HEAD.NORM = "FNR"  # a typo
    cfg.MODEL.ROI_MASK_HEAD.NORM = "NF"
    cfg.MODEL.RPN.NORM = "GN"  # read only by D2NormsRPNHead
    problems = norm_problems(cfg)
    keys = [p.split("=")[0] for p in problems]
    assert keys == ["MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.RPN.NORM",
                    "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM"], problems
    assert "Did you mean 'FRN'" in problems[3]
    assert "D2NormsRPNHead" in problems[2] and "ignore" in problems[2]


def test_config_checks_accept_d2_norms_components_and_refuse_typos_there():
    cfg = make_cfg("mask_rcnn", "GN")
    cfg.MODEL.BACKBONE.NAME = "build_d2n_resnet_fpn_backbone"
    cfg.MODEL.RPN.HEAD_NAME = "D2NormsRPNHead"
    cfg.MODEL.ROI_BOX_HEAD.NAME = "D2NormsConvFCHead"
    cfg.MODEL.ROI_MASK_HEAD.NAME = "D2NormsMaskHead"
    for norm in ("FRN", "FRN_LEPS", "GNWS", "GN_G16", "BN", ""):
        for field in ("RESNETS", "FPN", "RPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD"):
            getattr(cfg.MODEL, field).NORM = norm
        assert norm_problems(cfg) == [], norm
    cfg.MODEL.ROI_MASK_HEAD.NORM = "GNSW"
    cfg.MODEL.ROI_BOX_HEAD.NUM_CONV = 0
    cfg.MODEL.ROI_BOX_HEAD.NORM = "GN"
    problems = norm_problems(cfg)
    assert len(problems) == 2, problems
    assert problems[0].startswith("MODEL.ROI_BOX_HEAD.NORM='GN' but MODEL.ROI_BOX_HEAD.NUM_CONV")
    assert problems[1].startswith("MODEL.ROI_MASK_HEAD.NORM='GNSW': unknown")
    assert "Did you mean 'GNWS'" in problems[1]


def test_config_checks_leave_third_party_components_alone():
    cfg = make_cfg("mask_rcnn", "")
    cfg.MODEL.ROI_BOX_HEAD.NAME = "SomeProjectsBoxHead"
    cfg.MODEL.ROI_BOX_HEAD.NORM = "WhateverItBuilds"
    assert norm_problems(cfg) == []


def test_nf_with_detectron2_pixel_std_is_refused_with_the_value_to_set():
    cfg = make_cfg("retinanet", "")
    cfg.MODEL.BACKBONE.NAME = "build_d2n_retinanet_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.NORM = "NF"
    cfg.MODEL.PIXEL_STD = [1.0, 1.0, 1.0]  # detectron2's default for caffe2-style weights
    problems = norm_problems(cfg)
    assert len(problems) == 1 and problems[0].startswith("MODEL.PIXEL_STD"), problems
    assert "57.375" in problems[0] and "unit-variance" in problems[0]
    cfg.MODEL.PIXEL_STD = [57.375, 57.12, 58.395]
    assert norm_problems(cfg) == []


def test_lazyconfig_d2norms_head_honours_frn():
    from detectron2.config import LazyCall, instantiate
    from detectron2.layers import ShapeSpec

    from d2_norms.modeling.heads import D2NormsRetinaNetHead

    kwargs = dict(input_shape=[ShapeSpec(channels=32)], num_classes=2, num_anchors=1,
                  conv_dims=[32, 32], norm="FRN")
    head = instantiate(LazyCall(D2NormsRetinaNetHead)(**kwargs))
    assert [type(m) for m in head.cls_subnet].count(nn.ReLU) == 0
    frns = [m for m in head.cls_subnet if isinstance(m, L.FilterResponseNorm2d)]
    assert len(frns) == 2 and all(m.has_tlu for m in frns)
