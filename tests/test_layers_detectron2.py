"""Stock detectron2 models built from a config with every registered norm name.

RetinaNet and Mask R-CNN (R18-FPN, tiny images, CPU) run one training step per name; built
models are walked to check that TLU replaced ReLU after FRN, and that GNWS/NF use WS/Scaled WS
convs.
"""
import pytest
import torch
from torch import nn

import d2_norms  # noqa: F401
import d2_norms.layers as L
from d2_norms.layers import FilterResponseNorm2d, ScaledStdConv2d, WSConv2d

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


ALL_NAMES = L.registered_norms() + [""]


@pytest.mark.parametrize("arch", ["retinanet", "mask_rcnn"])
@pytest.mark.parametrize("norm", ALL_NAMES)
def test_training_step_with_every_registered_name(arch, norm):
    model = build(arch, norm)
    losses = train_step(model, make_batch())
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if norm not in ("", "FrozenBN"):  # every stock norm field was honoured
        names = {L.norm_name_of(m) for m in model.modules()}
        types = {type(m) for m in model.modules()}
        if norm == "NF":
            assert ScaledStdConv2d in types
        elif norm in L.norm_registry._detectron2_norm_names():
            # detectron2's own names give detectron2's own layers (import d2_norms changes
            # nothing for them): the stock heads hold what stock get_norm builds.
            stock = type(L.norm_registry._original_get_norm()(norm, 32))
            assert stock in types, f"no {stock.__name__} built for {norm!r}"
        else:
            assert norm in names, f"no layer built for {norm!r}"


def _tlu_modules(model):
    return [m for m in model.modules() if isinstance(m, FilterResponseNorm2d) and m.has_tlu]


def _assert_no_relu_after_tlu(model):
    """Walk every Sequential and detectron2 Conv2d: a TLU-carrying FRN is never followed by ReLU."""
    for mod in model.modules():
        if isinstance(mod, nn.Sequential):
            children = list(mod.children())
            for a, b in zip(children, children[1:]):
                if isinstance(a, FilterResponseNorm2d) and a.has_tlu:
                    assert not isinstance(b, nn.ReLU), mod
        norm = getattr(mod, "norm", None)
        if isinstance(norm, FilterResponseNorm2d) and norm.has_tlu:
            act = getattr(mod, "activation", None)
            assert act is None or not isinstance(act, nn.ReLU)
        if isinstance(norm, FilterResponseNorm2d) and not norm.has_tlu:
            # norms without TLU only where no activation follows directly (FPN, conv3,
            # shortcuts, the last conv of a basic block)
            assert getattr(mod, "activation", None) is None


@pytest.mark.parametrize("norm", ["FRN", "FRN_LEPS"])
def test_tlu_replaces_relu_in_built_models(norm):
    retina, mask = build("retinanet", norm), build("mask_rcnn", norm)
    for model in (retina, mask):
        _assert_no_relu_after_tlu(model)
        stem = model.backbone.bottom_up.stem
        assert stem.conv1.norm.has_tlu
        block = model.backbone.bottom_up.res2[0]
        assert block.conv1.norm.has_tlu and not block.conv2.norm.has_tlu
        assert not model.backbone.fpn_lateral3.norm.has_tlu  # FPN convs have no activation
    for sub in (retina.head.cls_subnet, retina.head.bbox_subnet):
        assert len([m for m in sub if isinstance(m, FilterResponseNorm2d) and m.has_tlu]) == 2
        assert not any(isinstance(m, nn.ReLU) for m in sub)
    for conv in mask.roi_heads.box_head.conv_norm_relus + mask.roi_heads.mask_head.conv_norm_relus:
        assert conv.norm.has_tlu and conv.activation is None
    # the heads' plain lists and the modules are the same objects
    assert mask.roi_heads.box_head.conv_norm_relus[0] is mask.roi_heads.box_head.conv1


def test_negative_tau_survives_in_stock_components():
    """With tau < 0, a ReLU after TLU would zero the negative outputs: they must reach the
    next layer."""
    retina, mask = build("retinanet", "FRN"), build("mask_rcnn", "FRN")
    for model in (retina, mask):
        for m in _tlu_modules(model):
            with torch.no_grad():
                m.tau.fill_(-0.5)
                m.bias.fill_(-3.0)  # push y below tau so that outputs sit at tau < 0
    seen = {}

    def record(name):
        def hook(module, inputs):
            seen[name] = inputs[0].detach().min().item()
        return hook

    hooks = [
        retina.head.cls_subnet[3].register_forward_pre_hook(record("retina head conv2")),
        retina.head.cls_score.register_forward_pre_hook(record("retina cls_score")),
        retina.backbone.bottom_up.res3[0].conv2.register_forward_pre_hook(record("block conv2")),
        retina.backbone.bottom_up.res2[0].register_forward_pre_hook(record("after stem")),
        mask.roi_heads.box_head.conv2.register_forward_pre_hook(record("box conv2")),
        mask.roi_heads.box_head.flatten.register_forward_pre_hook(record("box flatten")),
        mask.roi_heads.mask_head.mask_fcn2.register_forward_pre_hook(record("mask conv2")),
        mask.roi_heads.mask_head.deconv.register_forward_pre_hook(record("mask deconv")),
    ]
    with torch.no_grad():
        from detectron2.utils.events import EventStorage

        with EventStorage(0):
            retina(make_batch(1))
            mask(make_batch(1))
    for h in hooks:
        h.remove()
    # max-pool after the stem keeps the TLU floor at tau
    for name, value in seen.items():
        assert value < -0.1, f"{name}: min input {value} (a ReLU ran after TLU)"


def test_stock_block_forward_matches_written_out_frn_resnet_block():
    model = build("retinanet", "FRN")
    block = model.backbone.bottom_up.res3[0]  # BasicBlock with a projection shortcut
    x = torch.randn(1, 64, 16, 16)
    c1, c2, sc = block.conv1, block.conv2, block.shortcut

    def conv(c, t):
        return nn.functional.conv2d(t, c.weight, c.bias, c.stride, c.padding)

    def frn_ref(n, t):
        out = L.frn_reference(t, n.weight, n.bias, n.tau)
        return out

    expected = torch.relu(frn_ref(c2.norm, conv(c2, frn_ref(c1.norm, conv(c1, x))))
                          + frn_ref(sc.norm, conv(sc, x)))
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_gnws_and_nf_convs_in_stock_components():
    gnws = build("mask_rcnn", "GNWS")
    assert isinstance(gnws.backbone.bottom_up.stem.conv1, WSConv2d)
    assert isinstance(gnws.backbone.bottom_up.res2[0].conv1, WSConv2d)
    assert isinstance(gnws.backbone.fpn_lateral2, WSConv2d)
    assert isinstance(gnws.roi_heads.box_head.conv1, WSConv2d)
    assert gnws.roi_heads.box_head.conv_norm_relus[1] is gnws.roi_heads.box_head.conv2
    assert isinstance(gnws.roi_heads.mask_head.mask_fcn1, WSConv2d)
    assert not isinstance(gnws.roi_heads.mask_head.predictor, WSConv2d)
    retina = build("retinanet", "GNWS")
    assert sum(isinstance(m, WSConv2d) for m in retina.head.cls_subnet) == 2
    assert not isinstance(retina.head.cls_score, WSConv2d)

    nf = build("mask_rcnn", "NF")
    box = nf.roi_heads.box_head
    assert isinstance(box.conv1, ScaledStdConv2d) and box.conv1.norm is None
    assert box.conv1.bias is not None  # the conv bias stock code drops when a norm is named
    assert box.conv1.gamma == 1.0 and box.conv2.gamma == pytest.approx(L.RELU_GAIN)
    assert isinstance(nf.backbone.fpn_output2, ScaledStdConv2d)


def test_building_twice_is_idempotent():
    model = build("retinanet", "FRN")
    before = repr(model)
    L.adapt_norms(model)
    assert repr(model) == before


def test_adapt_norms_on_a_custom_model_keeps_trained_parameters():
    norm = L.get_norm("FRN", 8)
    with torch.no_grad():
        norm.weight.fill_(2.0)
        norm.bias.fill_(-1.0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), norm, nn.ReLU(), nn.Conv2d(8, 4, 1))
    L.adapt_norms(model)
    assert isinstance(model[2], nn.Identity) and model[1].has_tlu
    assert torch.all(model[1].weight == 2.0) and torch.all(model[1].bias == -1.0)
