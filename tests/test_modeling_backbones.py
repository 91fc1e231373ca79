"""d2_norms backbones inside RetinaNet and Mask R-CNN: build from YAML, shapes, losses, ReLU-free
FRN, init, detectron2 parity (BN), checkpoints.

Small on purpose (2 shared CPU cores): 64-96 px images, FPN width 64, R18 and R50.
"""
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import d2_norms  # noqa: F401  (shims)
import d2_norms.layers as L
from d2_norms.config import add_d2_norms_config
from d2_norms.modeling import (NFBasicBlock, NFBottleneckBlock, NormBasicBlock,
                               NormBottleneckBlock, NormFPN, build_d2n_resnet_backbone)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORMS = ["BN", "GN", "GNWS", "FRN", "NF", ""]
DETECTORS = ["retinanet", "mask_rcnn"]
FPN_CHANNELS = 64


pytestmark = pytest.mark.usefixtures("eager_frn_one_thread")


def _heads_norm(norm):
    # Heads get the backbone's normalizer; NF models default to no activation normalization.
    return "" if norm in ("", "NF") else norm


def detector_cfg(tmp_path, detector, norm, depth=18, fpn_norm=None, head_norm=None,
                 extra_yaml=""):
    """A detectron2 cfg built the way users do: repo base YAML + a d2_norms YAML file."""
    cfg = get_cfg()
    add_d2_norms_config(cfg)
    base = "Base-RetinaNet.yaml" if detector == "retinanet" else "Base-RCNN-FPN.yaml"
    cfg.merge_from_file(os.path.join(REPO, "configs", base))
    backbone = ("build_d2n_retinanet_resnet_fpn_backbone" if detector == "retinanet"
                else "build_d2n_resnet_fpn_backbone")
    fpn_norm = _heads_norm(norm) if fpn_norm is None else fpn_norm
    head = _heads_norm(norm) if head_norm is None else head_norm
    # d2_norms' registered heads, as the shipped configs select them (issue 11).
    heads_yaml = ("  META_ARCHITECTURE: D2NormsRetinaNet\n"
                  f"  RETINANET: {{NORM: \"{head}\", NUM_CLASSES: 3, NUM_CONVS: 2}}\n"
                  if detector == "retinanet" else
                  f"  MASK_ON: True\n"
                  f"  ROI_HEADS: {{NUM_CLASSES: 3, BATCH_SIZE_PER_IMAGE: 32}}\n"
                  f"  ROI_BOX_HEAD: {{NAME: D2NormsConvFCHead, NORM: \"{head}\", NUM_CONV: 2,"
                  f" NUM_FC: 1, CONV_DIM: 32, FC_DIM: 64}}\n"
                  f"  ROI_MASK_HEAD: {{NAME: D2NormsMaskHead, NORM: \"{head}\", NUM_CONV: 1,"
                  f" CONV_DIM: 32}}\n"
                  f"  RPN: {{HEAD_NAME: D2NormsRPNHead, POST_NMS_TOPK_TRAIN: 64,"
                  f" PRE_NMS_TOPK_TRAIN: 200}}\n")
    text = (
        "MODEL:\n"
        "  DEVICE: cpu\n"
        f"  BACKBONE: {{NAME: {backbone}, FREEZE_AT: 0}}\n"
        f"  RESNETS: {{DEPTH: {depth}, NORM: \"{norm}\", "
        f"RES2_OUT_CHANNELS: {64 if depth < 50 else 256}}}\n"
        f"  FPN: {{NORM: \"{fpn_norm}\", OUT_CHANNELS: {FPN_CHANNELS}}}\n"
        + heads_yaml + extra_yaml + "VERSION: 2\n"
    )
    path = tmp_path / f"{detector}_{norm or 'none'}_{depth}.yaml"
    path.write_text(text)
    cfg.merge_from_file(str(path))
    return cfg


def batched_inputs(n=2, size=96, seed=0):
    """Images with two boxes (and their polygon masks) each, as a detectron2 mapper yields."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        image = torch.randint(0, 256, (3, size, size), generator=g).float()
        inst = Instances((size, size))
        boxes = torch.tensor([[8.0, 10.0, 50.0, 60.0], [40.0, 30.0, 90.0, 80.0]])
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.tensor([0, 2])
        inst.gt_masks = PolygonMasks(
            [[np.array([b[0], b[1], b[2], b[1], b[2], b[3], b[0], b[3]], dtype=np.float64)]
             for b in boxes.tolist()])
        out.append({"image": image, "instances": inst, "height": size, "width": size})
    return out


EXPECTED_LEVELS = {
    "retinanet": {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128},
    "mask_rcnn": {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64},
}


# ---------------------------------------------------------------------------------------------
# every detector x normalizer (x depth): build from YAML, shapes, finite losses and gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("detector", DETECTORS)
def test_detector_builds_and_trains_one_step(tmp_path, detector, norm, depth):
    torch.manual_seed(0)
    cfg = detector_cfg(tmp_path, detector, norm, depth)
    model = build_model(cfg)
    backbone = model.backbone
    block_type = {(True, True): NFBasicBlock, (True, False): NFBottleneckBlock,
                  (False, True): NormBasicBlock, (False, False): NormBottleneckBlock}[
        (norm == "NF", depth < 50)]
    assert isinstance(backbone, NormFPN) and isinstance(backbone.bottom_up.res3[0], block_type)

    # Feature names, strides and channels as detectron2's FPN builders give them.
    shapes = backbone.output_shape()
    assert {k: s.stride for k, s in shapes.items()} == EXPECTED_LEVELS[detector]
    assert all(s.channels == FPN_CHANNELS for s in shapes.values())
    bottom = backbone.bottom_up.output_shape()
    c2 = 64 if depth < 50 else 256
    for name, mult, stride in (("res3", 2, 8), ("res4", 4, 16), ("res5", 8, 32)):
        assert bottom[name].stride == stride and bottom[name].channels == c2 * mult

    _one_training_step(model)
    # Real outputs at the feature sizes the strides promise (96 px input, padded to 96/128).
    feats = backbone(torch.randn(1, 3, 128, 128))
    for name, stride in EXPECTED_LEVELS[detector].items():
        assert feats[name].shape == (1, FPN_CHANNELS, max(1, 128 // stride), max(1, 128 // stride))


def _one_training_step(model):
    """One forward/backward at 96 px: every loss finite, every backbone gradient finite."""
    model.train()
    with EventStorage(0):
        losses = model(batched_inputs())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("detector", DETECTORS)
def test_nf_detector_with_scaled_ws_fpn_and_heads(tmp_path, detector):
    # The optional "NF" (Scaled WS, no statistics) in MODEL.FPN.NORM and the head norms.
    torch.manual_seed(0)
    model = build_model(detector_cfg(tmp_path, detector, "NF", 18, fpn_norm="NF", head_norm="NF"))
    assert isinstance(model.backbone.fpn_output5, L.ScaledStdConv2d)
    _one_training_step(model)


@pytest.mark.parametrize("depth", [34, 101])
@pytest.mark.parametrize("norm", ["GN", "NF"])
def test_deeper_backbones_block_counts(depth, norm):
    net = build_d2n_resnet_backbone(_plain_cfg(norm, depth), ShapeSpec(channels=3))
    counts = [len(getattr(net, f"res{i}")) for i in range(2, 6)]
    assert counts == {34: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth]
    out = net(torch.randn(1, 3, 64, 64))
    assert out["res5"].shape == (1, (64 if depth < 50 else 256) * 8, 2, 2)


# ---------------------------------------------------------------------------------------------
# FRN: TLU everywhere, no ReLU anywhere in the backbone (module walk and a trace of aten ops)
# ---------------------------------------------------------------------------------------------
class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


RELU_OPS = {"relu", "relu_", "threshold", "threshold_", "hardtanh", "hardtanh_", "clamp_min",
            "clamp_min_"}


@pytest.mark.parametrize("detector", DETECTORS)
@pytest.mark.parametrize("depth", [18, 50])
def test_frn_backbone_has_no_relu(tmp_path, detector, depth):
    cfg = detector_cfg(tmp_path, detector, "FRN", depth)
    backbone = build_backbone(cfg)
    assert not [n for n, m in backbone.named_modules() if isinstance(m, nn.ReLU)]
    # Each block ends with TLU after the add; inside, the FRN layers carry TLU (fused) except
    # the branch's last one, which has no activation.
    blocks = [m for m in backbone.modules() if isinstance(m, (NormBasicBlock, NormBottleneckBlock))]
    assert blocks
    for b in blocks:
        assert isinstance(b.act, L.TLU)
        convs = [b.conv1, b.conv2] + ([b.conv3] if hasattr(b, "conv3") else [])
        assert all(isinstance(c.norm, L.FilterResponseNorm2d) for c in convs)
        assert [c.norm.has_tlu for c in convs] == [True] * (len(convs) - 1) + [False]
    assert backbone.bottom_up.stem.conv1.norm.has_tlu
    if detector == "retinanet":
        assert isinstance(backbone.top_block.act, L.TLU)
    rec = _OpRecorder()
    with torch.no_grad(), rec:
        backbone(torch.randn(1, 3, 64, 64))
    assert "convolution" in rec.ops and "maximum" in rec.ops  # the trace sees the real ops
    assert not (rec.ops & RELU_OPS), rec.ops & RELU_OPS


def test_gn_backbone_keeps_relu_pairing(tmp_path):
    backbone = build_backbone(detector_cfg(tmp_path, "retinanet", "GN", 18))
    blocks = [m for m in backbone.modules() if isinstance(m, NormBasicBlock)]
    assert all(isinstance(b.act, nn.ReLU) and isinstance(b.conv1.activation, nn.ReLU)
               and b.conv2.activation is None for b in blocks)
    assert isinstance(backbone.top_block.act, nn.ReLU)


def test_gnws_uses_ws_convs_in_backbone_and_fpn(tmp_path):
    backbone = build_backbone(detector_cfg(tmp_path, "mask_rcnn", "GNWS", 18))
    convs = [m for n, m in backbone.named_modules()
             if isinstance(m, nn.Conv2d) and getattr(m, "norm", None) is not None]
    assert convs and all(isinstance(c, L.WSConv2d) for c in convs)
    assert isinstance(backbone.fpn_lateral2, L.WSConv2d)
    assert isinstance(backbone.fpn_lateral2.norm, nn.GroupNorm)


def test_nf_fpn_norm_gives_scaled_ws_and_no_norm_layers(tmp_path):
    backbone = build_backbone(detector_cfg(tmp_path, "retinanet", "NF", 18, fpn_norm="NF"))
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, L.FilterResponseNorm2d,
             FrozenBatchNorm2d)
    assert not [n for n, m in backbone.named_modules() if isinstance(m, norms)]
    fpn_convs = [m for n, m in backbone.named_modules()
                 if n.startswith(("fpn_", "top_block.p")) and isinstance(m, nn.Conv2d)]
    assert len(fpn_convs) == 3 * 2 + 2
    assert all(isinstance(c, L.ScaledStdConv2d) and c.bias is not None for c in fpn_convs)
    # Linear FPN convs get gamma 1; P7 reads ReLU(P6) and gets ReLU's gain.
    assert backbone.fpn_lateral3.gamma == 1.0 and backbone.fpn_output5.gamma == 1.0
    assert backbone.top_block.p6.gamma == 1.0
    assert backbone.top_block.p7.gamma == pytest.approx(np.sqrt(2 / (1 - 1 / np.pi)))


# ---------------------------------------------------------------------------------------------
# initialisation for training from scratch (GN paper sec. 4.1)
# ---------------------------------------------------------------------------------------------
def _plain_cfg(norm, depth=50, **resnets):
    cfg = get_cfg()
    add_d2_norms_config(cfg)
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    for k, v in resnets.items():
        cfg.MODEL.RESNETS[k] = v
    return cfg


@pytest.mark.parametrize("norm", ["BN", "GN", "GNWS", "FRN"])
@pytest.mark.parametrize("zero_init", [False, True])
def test_from_scratch_init(norm, zero_init):
    torch.manual_seed(0)
    cfg = _plain_cfg(norm)
    cfg.MODEL.D2NORMS.ZERO_INIT_RESIDUAL = zero_init
    net = build_d2n_resnet_backbone(cfg, ShapeSpec(channels=3))
    blocks = [b for s in net.stages for b in s]
    last_norms = {id(b.conv3.norm) for b in blocks}
    n_checked = 0
    for m in net.modules():
        if m.__class__.__name__ in ("BatchNorm2d", "GroupNorm", "FilterResponseNorm2d"):
            gamma = 0.0 if (zero_init and id(m) in last_norms) else 1.0
            assert torch.all(m.weight == gamma) and torch.all(m.bias == 0)
            if getattr(m, "tau", None) is not None:
                assert torch.all(m.tau == 0)
            n_checked += 1
        if isinstance(m, L.TLU):
            assert torch.all(m.tau == 0)
    assert n_checked == 1 + sum(3 + (b.shortcut is not None) for b in blocks)
    # He (MSRA) init, fan_out mode as detectron2's c2_msra_fill: std = sqrt(2 / fan_out).
    w = net.res4[1].conv2.weight.detach()  # 256 x 256 x 3 x 3: 590k samples, std error ~0.1 %
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    assert float(w.std()) == pytest.approx(np.sqrt(2.0 / fan_out), rel=0.01)
    assert abs(float(w.mean())) < 0.01 * np.sqrt(2.0 / fan_out)


@pytest.mark.parametrize("norm", ["GN", "FRN", ""])
def test_zero_init_residual_makes_blocks_identity_then_activation(norm):
    torch.manual_seed(0)
    cfg = _plain_cfg(norm, depth=18)
    cfg.MODEL.D2NORMS.ZERO_INIT_RESIDUAL = True
    net = build_d2n_resnet_backbone(cfg, ShapeSpec(channels=3))
    x = torch.randn(2, 64, 16, 16)
    block = net.res2[1]  # same shape in and out: shortcut is the identity
    # With GN (gamma 0) / FRN (gamma 0) / "" (last conv 0) the branch adds nothing: the block is
    # the post-add activation (ReLU, or TLU with tau 0 = ReLU) of its input.
    torch.testing.assert_close(block(x), torch.relu(x))
    cfg.MODEL.D2NORMS.ZERO_INIT_RESIDUAL = False
    net = build_d2n_resnet_backbone(cfg, ShapeSpec(channels=3))
    assert not torch.allclose(net.res2[1](x), torch.relu(x))


# ---------------------------------------------------------------------------------------------
# detectron2 parity: with BN the norm-aware ResNet IS detectron2's ResNet (keys, freezing,
# outputs), for every cfg.MODEL.RESNETS option it reads
# ---------------------------------------------------------------------------------------------
PARITY_CASES = [
    dict(depth=50, FREEZE_AT=2),
    dict(depth=18, FREEZE_AT=1),
    dict(depth=50, FREEZE_AT=0, STRIDE_IN_1X1=False, NUM_GROUPS=32, WIDTH_PER_GROUP=4,
         RES5_DILATION=2),
    dict(depth=50, FREEZE_AT=5, RES2_OUT_CHANNELS=128, WIDTH_PER_GROUP=32, STEM_OUT_CHANNELS=32,
         OUT_FEATURES=["res3", "res4"]),
]


@pytest.mark.parametrize("case", PARITY_CASES,
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_bn_resnet_matches_detectron2(case):
    case = dict(case)
    cfg = _plain_cfg("BN", depth=case.pop("depth"))
    cfg.MODEL.BACKBONE.FREEZE_AT = case.pop("FREEZE_AT")
    for k, v in case.items():
        cfg.MODEL.RESNETS[k] = v
    ref = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    ours = build_d2n_resnet_backbone(cfg, ShapeSpec(channels=3))
    assert ours.output_shape() == ref.output_shape()
    sr, so = ref.state_dict(), ours.state_dict()
    assert list(sr) == list(so)
    assert all(sr[k].shape == so[k].shape for k in sr)
    assert [(n, p.requires_grad) for n, p in ref.named_parameters()] == \
        [(n, p.requires_grad) for n, p in ours.named_parameters()]
    assert [type(m).__name__ for m in ref.modules() if "BatchNorm" in type(m).__name__] == \
        [type(m).__name__ for m in ours.modules() if "BatchNorm" in type(m).__name__]
    # Same weights -> same function (eval mode, random BN statistics).
    g = torch.Generator().manual_seed(1)
    for k, v in sr.items():
        if v.dtype.is_floating_point:
            v.copy_(torch.rand(v.shape, generator=g) + 0.5 if k.endswith("running_var")
                    else 0.1 * torch.randn(v.shape, generator=g))
    ours.load_state_dict(sr)
    ref.eval()
    ours.eval()
    x = torch.randn(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        out_r, out_o = ref(x), ours(x)
    assert list(out_r) == list(out_o)
    for k in out_r:
        torch.testing.assert_close(out_o[k], out_r[k], rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["GN", "FRN", "NF"])
def test_freeze_at_and_out_features(norm):
    cfg = _plain_cfg(norm)
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3"]
    net = build_d2n_resnet_backbone(cfg, ShapeSpec(channels=3))
    assert not hasattr(net, "res4") and not hasattr(net, "res5")  # unused stages not built
    frozen = {n.split(".")[0] for n, p in net.named_parameters() if not p.requires_grad}
    trainable = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad}
    assert frozen == {"stem", "res2"} and trainable == {"res3"}
    assert set(net(torch.randn(1, 3, 64, 64))) == {"res2", "res3"}


# ---------------------------------------------------------------------------------------------
# bad configs fail with a message naming the key
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, match", [
    (dict(DEPTH=18, RES2_OUT_CHANNELS=256), "RES2_OUT_CHANNELS = 64"),
    (dict(DEPTH=34, RES2_OUT_CHANNELS=64, NUM_GROUPS=32), "NUM_GROUPS = 1"),
    (dict(DEPTH=26), "DEPTH=26 is not supported"),
    (dict(DEFORM_ON_PER_STAGE=[False, True, False, False]), "DEFORM_ON_PER_STAGE"),
    (dict(OUT_FEATURES=["res6"]), "OUT_FEATURES"),
    (dict(NORM="BatchNorm"), "Unknown norm 'BatchNorm'"),
])
def test_bad_config_errors(change, match):
    cfg = _plain_cfg("GN")
    for k, v in change.items():
        cfg.MODEL.RESNETS[k] = v
    with pytest.raises(ValueError, match=match):
        build_d2n_resnet_backbone(cfg, ShapeSpec(channels=3))


def test_missing_d2norms_keys_error():
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_d2n_resnet_backbone"
    with pytest.raises(KeyError, match="add_d2_norms_config"):
        build_backbone(cfg)


def test_add_d2_norms_config_keeps_merged_values():
    cfg = get_cfg()
    add_d2_norms_config(cfg)
    cfg.MODEL.D2NORMS.NF.ALPHA = 0.5
    cfg.MODEL.D2NORMS.ZERO_INIT_RESIDUAL = True
    add_d2_norms_config(cfg)
    assert cfg.MODEL.D2NORMS.NF.ALPHA == 0.5 and cfg.MODEL.D2NORMS.ZERO_INIT_RESIDUAL


# ---------------------------------------------------------------------------------------------
# checkpoints: DetectionCheckpointer save -> load into a differently initialised model
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["BN", "GN", "GNWS", "FRN", "NF"])
def test_checkpoint_round_trip(tmp_path, norm):
    detector = "mask_rcnn" if norm in ("GN", "NF") else "retinanet"
    cfg = detector_cfg(tmp_path, detector, norm, 18)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # move every parameter away from its init (skip gains, taus ...)
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_test")
    torch.manual_seed(1)
    other = build_model(cfg)
    DetectionCheckpointer(other).load(str(tmp_path / "model_test.pth"))
    sa, sb = model.state_dict(), other.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0, msg=k)
    model.eval()
    other.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fa, fb = model.backbone(x), other.backbone(x)
    for k in fa:
        torch.testing.assert_close(fb[k], fa[k], rtol=0, atol=0)


@pytest.mark.parametrize("detector", DETECTORS)
def test_norm_fpn_sets_every_attribute_of_detectron2_fpn(tmp_path, detector):
    """NormFPN builds its own convs instead of calling FPN.__init__, so it must set every plain
    attribute that this detectron2 version's FPN.__init__ sets (main's ``padding_constraints``
    reads ``_square_pad``, which v0.6 does not have) and answer FPN's public properties alike."""
    from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7

    cfg = detector_cfg(tmp_path, detector, "GN")
    ours = build_backbone(cfg)
    top_block = (LastLevelP6P7(ours.bottom_up.output_shape()["res5"].channels, FPN_CHANNELS)
                 if detector == "retinanet" else LastLevelMaxPool())
    stock = FPN(bottom_up=ours.bottom_up, in_features=list(cfg.MODEL.FPN.IN_FEATURES),
                out_channels=FPN_CHANNELS, norm="GN", top_block=top_block)
    missing = sorted(set(vars(stock)) - set(vars(ours)))
    assert not missing, f"NormFPN lacks attributes detectron2's FPN sets: {missing}"
    for name in ("size_divisibility", "padding_constraints"):
        if hasattr(type(stock), name):
            assert getattr(ours, name) == getattr(stock, name), name
    assert ours.output_shape() == stock.output_shape()
