"""d2_norms' registered heads (d2_norms/modeling/heads.py) and the conv+norm+activation composer
(d2_norms/layers/conv_norm_act.py) against what d2_norms builds today.

Today's models: the shipped configs with detectron2's stock heads, repaired after construction
by ``d2_norms.layers.adapt_norms``; the composer against the three builders it replaces
(``modeling/_layers.conv_norm_act``, ``layers.make_conv``, ``adapt_norms``). New models: the
same configs with META_ARCHITECTURE / *_HEAD.NAME selecting d2_norms' components. Compared:
parameter and buffer names and shapes, module types per name, outputs (training losses with
fixed seeds, predictions in eval mode) after loading today's (perturbed) weights. Then a walk of
the new heads for every norm: no ReLU after FRN/TLU, WS convs for GNWS, Scaled WS for NF.

Small on purpose (2 shared CPU cores): 64 px images, few ROIs; the R50 COCO-scratch cells are
compared head by head here and as whole models in the slow tests.
"""
import math
import os
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import d2_norms  # noqa: F401  (shims)
import d2_norms.layers as L
from d2_norms.config import add_d2_norms_config
from d2_norms.layers.conv_norm_act import conv_norm_act, resolve_norm
from d2_norms.modeling import _layers
from d2_norms.modeling.heads import (D2NormsConvFCHead, D2NormsMaskHead, D2NormsRetinaNet,
                                     D2NormsRetinaNetHead, D2NormsRPNHead, HeadNormError,
                                     add_heads_config)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import Conv2d, CycleBatchNormList, ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.retinanet import RetinaNet, RetinaNetHead
from detectron2.modeling.proposal_generator.rpn import StandardRPNHead
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORMS = ["BN", "GN", "GNWS", "FRN", "NF", ""]
MATRIX_NORMS = ["BN", "SyncBN", "GN", "GNWS", "FRN", "NF"]  # the COCO-scratch cells
RELU_GAIN = L.activation_gain("relu")

# The new component replacing each stock one (root types differ by design: subclasses).
NEW_FOR_STOCK = {RetinaNet: D2NormsRetinaNet, RetinaNetHead: D2NormsRetinaNetHead,
                 StandardRPNHead: D2NormsRPNHead, FastRCNNConvFCHead: D2NormsConvFCHead,
                 MaskRCNNConvUpsampleHead: D2NormsMaskHead}
# Stock heads get GN / SyncBN from detectron2's own get_norm; d2_norms' components take the
# registry's classes (subclasses with the same state and numerics: float32 GN statistics, a
# SyncBN that also synchronises CPU/gloo processes), as d2_norms' backbones already do.
REGISTRY_SUBCLASS = {nn.GroupNorm: L.GroupNorm, nn.SyncBatchNorm: L.SyncBatchNorm}


@pytest.fixture(autouse=True, scope="module")
def _eager_frn_one_thread():
    old_impl, old_threads = L.get_frn_impl(), torch.get_num_threads()
    L.set_frn_impl("eager")
    torch.set_num_threads(1)
    yield
    L.set_frn_impl(old_impl)
    torch.set_num_threads(old_threads)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _set_norm(cfg, norm):
    """All normalizer keys of a shipped config to ``norm`` (as recipes.py writes the cells)."""
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.FPN.NORM = norm
    cfg.MODEL.RETINANET.NORM = norm
    cfg.MODEL.ROI_BOX_HEAD.NORM = norm
    cfg.MODEL.ROI_MASK_HEAD.NORM = norm


def shipped_cfg(rel_path, norm=None, *, small_backbone=False):
    """A shipped config (``configs/<rel_path>``) made CPU-test sized: few ROIs / candidates,
    score threshold 0 (so eval predictions are not empty); optionally R18 with FPN width 64."""
    cfg = get_cfg()
    add_d2_norms_config(cfg)
    add_heads_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", rel_path))
    if norm is not None:
        _set_norm(cfg, norm)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 16
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 32
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 16
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.RETINANET.TOPK_CANDIDATES_TEST = 50
    cfg.TEST.DETECTIONS_PER_IMAGE = 4
    if small_backbone:
        cfg.MODEL.RESNETS.DEPTH = 18
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
        cfg.MODEL.FPN.OUT_CHANNELS = 64
    return cfg


def with_new_components(cfg):
    cfg = cfg.clone()
    cfg.defrost()
    if cfg.MODEL.META_ARCHITECTURE == "RetinaNet":
        cfg.MODEL.META_ARCHITECTURE = "D2NormsRetinaNet"
    else:
        cfg.MODEL.RPN.HEAD_NAME = "D2NormsRPNHead"
        cfg.MODEL.ROI_BOX_HEAD.NAME = "D2NormsConvFCHead"
        cfg.MODEL.ROI_MASK_HEAD.NAME = "D2NormsMaskHead"
    return cfg


def batched_inputs(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        image = torch.randint(0, 256, (3, size, size), generator=g).float()
        inst = Instances((size, size))
        boxes = torch.tensor([[4.0, 6.0, 34.0, 40.0], [26.0, 20.0, 60.0, 54.0]])
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.tensor([0, 2])
        inst.gt_masks = PolygonMasks(
            [[torch.tensor([b[0], b[1], b[2], b[1], b[2], b[3], b[0], b[3]]).double().numpy()]
             for b in boxes.tolist()])
        out.append({"image": image, "instances": inst, "height": size, "width": size})
    return out


@torch.no_grad()
def perturb_(module, seed=0):
    """Move every parameter off its constant init (gains 1, biases 0, tau 0) so that a swapped
    or dropped parameter shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        # A random period-1021 pattern (prime: no alignment with channel strides) is enough
        # and far cheaper than a fresh draw for every element of a 12.8M-weight fc layer.
        base = torch.randn(2, min(p.numel(), 1021), generator=g)
        reps = -(-p.numel() // base.shape[1])
        scale, shift = (base.repeat(1, reps)[:, :p.numel()].view(2, *p.shape))
        p.mul_(1 + 0.2 * scale).add_(0.02 * shift)
    return module


def assert_same_structure(today, new):
    """Same state names/shapes; same module type per name (the replaced roots: the new
    subclass; registry GN/SyncBN: the registry subclass)."""
    s_today, s_new = today.state_dict(), new.state_dict()
    assert list(s_today) == list(s_new)
    assert {k: v.shape for k, v in s_today.items()} == {k: v.shape for k, v in s_new.items()}
    t_today = {n: type(m) for n, m in today.named_modules()}
    t_new = {n: type(m) for n, m in new.named_modules()}
    assert list(t_today) == list(t_new)
    for name, cls in t_today.items():
        expected = NEW_FOR_STOCK.get(cls, REGISTRY_SUBCLASS.get(cls, cls))
        assert t_new[name] in (cls, expected), (name, cls, t_new[name])
    new_modules = dict(new.named_modules())
    for name, mod in today.named_modules():  # the settings that are not in the state dict
        other = new_modules[name]
        for attr in ("stride", "padding", "dilation", "groups", "gamma", "eps", "num_groups",
                     "has_tlu", "learned_eps", "momentum", "_num_features"):
            if hasattr(mod, attr):
                assert getattr(mod, attr) == getattr(other, attr), (name, attr)
        if hasattr(mod, "activation") or hasattr(other, "activation"):
            assert type(getattr(mod, "activation", None)) is type(
                getattr(other, "activation", None)), name


def _flat(x):
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in _flat(x[k])]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flat(v)]
    if isinstance(x, Instances):
        return [t for k in sorted(x.get_fields()) for t in _flat(x.get(k))]
    if isinstance(x, Boxes):
        return [x.tensor]
    raise TypeError(type(x))


def assert_identical(a, b):
    fa, fb = _flat(a), _flat(b)
    assert len(fa) == len(fb) and fa
    for x, y in zip(fa, fb):
        assert x.shape == y.shape and torch.equal(x, y), (x.flatten()[:4], y.flatten()[:4])


def _train_out(model, inputs, seed=3):
    model.train()
    torch.manual_seed(seed)  # ROI sampling
    with EventStorage(0):
        return model(inputs)


def _eval_out(model, inputs):
    """Eval-mode predictions and the heads' raw outputs behind them (predictions of a model
    with fresh BN running statistics may all be filtered out; the raw outputs never are)."""
    model.eval()
    with torch.no_grad():
        preds = model(inputs)
        images = model.preprocess_image(inputs)
        feats = model.backbone(images.tensor)
        if isinstance(model, RetinaNet):
            return preds, model.head([feats[f] for f in model.head_in_features])
        proposals = model.proposal_generator(images, feats, None)[0]
        rh = model.roi_heads
        boxes = [p.proposal_boxes for p in proposals]
        box_features = rh.box_head(rh.box_pooler([feats[f] for f in rh.box_in_features], boxes))
        masks = rh.mask_head.layers(
            rh.mask_pooler([feats[f] for f in rh.mask_in_features], boxes))
        return preds, (proposals, box_features, masks)


_MODELS = {}


def today_and_new(rel_path, norm, small_backbone=False):
    """(today's model, the new-component model with today's perturbed weights), cached."""
    key = (rel_path, norm, small_backbone)
    if key not in _MODELS:
        cfg = shipped_cfg(rel_path, norm, small_backbone=small_backbone)
        torch.manual_seed(0)
        today = perturb_(build_model(cfg))
        torch.manual_seed(0)
        new = build_model(with_new_components(cfg))
        new.load_state_dict(today.state_dict(), strict=True)
        _MODELS[key] = (today, new)
    return _MODELS[key]


_FLOWS = {}  # data-flow walks recorded during the equivalence tests' training steps


def flow_of(rel_path, norm, small_backbone=False):
    key = (rel_path, norm, small_backbone)
    if key not in _FLOWS:
        _, new = today_and_new(rel_path, norm, small_backbone)
        _FLOWS[key] = relu_inputs(new, lambda: _train_out(new, batched_inputs(2)))
    return _FLOWS[key]


def _check_models_equivalent(today, new, *, images=2, gradients=False):
    """Same structure; identical losses (training mode, same seed) and predictions (eval);
    with ``gradients``, the same gradients up to float summation order (CPU conv backward
    is not bitwise reproducible here: two builds of today's model differ as much)."""
    assert_same_structure(today, new)
    inputs = batched_inputs(images)
    losses_today = _train_out(today, inputs)
    flow = relu_inputs(new, lambda: _train_out(new, inputs))  # data-flow walk, same step
    losses_new = flow.pop("result")
    assert sorted(losses_today) == sorted(losses_new)
    assert all(torch.isfinite(v) for v in losses_new.values())
    assert_identical(losses_today, losses_new)
    if gradients:
        sum(losses_today.values()).backward()
        sum(losses_new.values()).backward()
        pairs = list(zip(today.named_parameters(), new.named_parameters()))
        assert [(n, p.grad is None) for (n, p), _ in pairs] == \
            [(n, q.grad is None) for _, (n, q) in pairs]
        g_today = torch.cat([p.grad.flatten() for (_, p), _ in pairs if p.grad is not None])
        g_new = torch.cat([q.grad.flatten() for _, (_, q) in pairs if q.grad is not None])
        # Relative to the whole gradient: a bias before BN has a gradient of pure float noise.
        assert float((g_new - g_today).norm()) <= 1e-5 * float(g_today.norm())
    (preds_today, raw_today), (preds_new, raw_new) = _eval_out(today, inputs), _eval_out(
        new, inputs)
    assert all(t.numel() for t in _flat(raw_new))
    assert_identical(raw_today, raw_new)
    assert [len(p["instances"]) for p in preds_today] == [len(p["instances"]) for p in preds_new]
    if any(len(p["instances"]) for p in preds_new):
        assert_identical(preds_today, preds_new)
    assert_same_structure(today, new)  # buffers (BN running stats) updated alike
    for (n, b), (_, c) in zip(today.named_buffers(), new.named_buffers()):
        assert torch.equal(b, c), n
    return flow


# ---------------------------------------------------------------------------------------------
# the composer reproduces today's three builders
# ---------------------------------------------------------------------------------------------
COMPOSER_NORMS = ["", "BN", "SyncBN", "FrozenBN", "GN", "GN_G8", "GNWS", "FRN", "FRN_LEPS", "NF"]


def _assert_same_conv(a, b, seed=0):
    assert_same_structure(a, b)
    b.load_state_dict(perturb_(a, seed).state_dict())
    x = torch.randn(2, a.in_channels, 9, 9, generator=torch.Generator().manual_seed(seed))
    a.train(), b.train()
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("norm", COMPOSER_NORMS)
@pytest.mark.parametrize("apply_act", [True, False])
def test_composer_reproduces_resnet_layout(norm, apply_act):
    # modeling/_layers.conv_norm_act: padding 0 by default, no bias but Scaled WS's.
    for k, stride, input_activation in ((1, 1, "relu"), (3, 2, None)):
        torch.manual_seed(0)
        today = _layers.conv_norm_act(8, 32, k, norm=norm, stride=stride, padding=k // 2,
                                      apply_act=apply_act, input_activation=input_activation)
        torch.manual_seed(0)
        bias = None if resolve_norm(norm).conv_kind == "scaled_ws" else False
        new = conv_norm_act(8, 32, k, norm=norm, stride=stride, padding=k // 2, bias=bias,
                            apply_act=apply_act, input_activation=input_activation)
        _assert_same_conv(today, new)


@pytest.mark.parametrize("norm", COMPOSER_NORMS)
@pytest.mark.parametrize("activation", [True, False])
def test_composer_reproduces_make_conv(norm, activation):
    for input_activation in ("relu", None):
        today = L.make_conv(8, 32, 3, norm=norm, stride=2, activation=activation,
                            input_activation=input_activation)
        new = conv_norm_act(8, 32, 3, norm=norm, stride=2, apply_act=activation,
                            activation_in_norm=True, input_activation=input_activation)
        _assert_same_conv(today, new)


@pytest.mark.parametrize("norm", COMPOSER_NORMS)
def test_composer_reproduces_adapted_stock_conv(norm):
    # A stock detectron2 head conv (bias only without a norm, ReLU) after a ReLU, then
    # adapt_norms: FRN -> FRN+TLU and no ReLU, GNWS -> WS conv, NF -> Scaled WS (ReLU gain).
    today = nn.Sequential(OrderedDict(
        pre=nn.ReLU(), conv=Conv2d(8, 32, 3, padding=1, bias=not norm,
                                   norm=L.get_norm(norm, 32), activation=nn.ReLU())))
    L.adapt_norms(today)
    new = nn.Sequential(OrderedDict(pre=nn.ReLU(), conv=conv_norm_act(8, 32, 3, norm=norm)))
    _assert_same_conv(today.conv, new.conv)
    if norm == "NF":
        assert new.conv.gamma == pytest.approx(RELU_GAIN)


def test_composer_resolves_once_and_refuses_unknown_names():
    r = resolve_norm("FRN")
    assert r.fuses_activation and r.conv_kind == "plain" and not r.pairs_with_relu
    assert isinstance(r.activation(4), L.TLU)
    assert resolve_norm("GNWS").conv_kind == "ws" and resolve_norm("NF").norm(8) is None
    assert isinstance(resolve_norm(lambda c: nn.BatchNorm2d(c)).norm(8), nn.BatchNorm2d)
    with pytest.raises(L.UnknownNormError, match="Did you mean 'FRN'"):
        resolve_norm("frn")
    with pytest.raises(TypeError, match="norm must be"):
        resolve_norm(3)
    with pytest.raises(ValueError, match="positive int width"):
        resolve_norm("GN").norm(0)


# ---------------------------------------------------------------------------------------------
# heads of every COCO-scratch R50 cell (real widths), head by head
# ---------------------------------------------------------------------------------------------
def _feature_shapes(cfg, names, channels):
    return [ShapeSpec(channels=channels, stride=2 ** int(n[1:])) for n in names]


def _head_pairs(cfg):
    """(stock head, new head, example input) for each head the cfg's detector has."""
    fpn = cfg.MODEL.FPN.OUT_CHANNELS
    g = torch.Generator().manual_seed(1)
    if cfg.MODEL.META_ARCHITECTURE == "RetinaNet":
        shapes = _feature_shapes(cfg, cfg.MODEL.RETINANET.IN_FEATURES, fpn)
        feats = [torch.randn(2, fpn, s, s, generator=g) for s in (8, 4, 2, 1, 1)]
        torch.manual_seed(0)
        return [(RetinaNetHead(cfg, shapes), D2NormsRetinaNetHead(cfg, shapes), feats)]
    shapes = _feature_shapes(cfg, cfg.MODEL.RPN.IN_FEATURES, fpn)
    feats = [torch.randn(2, fpn, s, s, generator=g) for s in (16, 8, 4, 2, 1)]
    box = ShapeSpec(channels=fpn, height=7, width=7)
    mask = ShapeSpec(channels=fpn, height=14, width=14)
    torch.manual_seed(0)
    return [
        (StandardRPNHead(cfg, shapes), D2NormsRPNHead(cfg, shapes), feats),
        (FastRCNNConvFCHead(cfg, box), D2NormsConvFCHead(cfg, box),
         torch.randn(4, fpn, 7, 7, generator=g)),
        (MaskRCNNConvUpsampleHead(cfg, mask), D2NormsMaskHead(cfg, mask),
         torch.randn(1, fpn, 14, 14, generator=g)),
    ]


def _run_head(head, x):
    if isinstance(head, MaskRCNNConvUpsampleHead):
        return head.layers(x)
    return head(x)


@pytest.mark.parametrize("norm", MATRIX_NORMS)
@pytest.mark.parametrize("detector", ["retinanet", "mask_rcnn"])
def test_heads_of_every_r50_cell_match_today(detector, norm):
    cfg = shipped_cfg(f"COCO-scratch/{detector}_R_50_FPN_{norm}_2img.yaml")
    assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.RESNETS.NORM == norm
    for today, new, x in _head_pairs(cfg):
        assert_same_structure(today, new)
        new.load_state_dict(perturb_(today).state_dict(), strict=True)
        for train in (True, False):
            today.train(train), new.train(train)
            with torch.set_grad_enabled(train):
                assert_identical(_run_head(today, x), _run_head(new, x))
        assert_identical(list(today.state_dict().values()), list(new.state_dict().values()))


# ---------------------------------------------------------------------------------------------
# whole models: losses, gradients and predictions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", NORMS)
def test_synthetic_mask_rcnn_matches_today(norm):
    # configs/synthetic (R18-FPN, 4conv1fc box head, mask head), each norm in every field.
    today, new = today_and_new("synthetic/mask_rcnn_R18_FPN_GN.yaml", norm)
    _FLOWS["synthetic/mask_rcnn_R18_FPN_GN.yaml", norm, False] = _check_models_equivalent(
        today, new)


@pytest.mark.parametrize("norm", NORMS)
def test_retinanet_matches_today(norm):
    # The COCO-scratch RetinaNet cell with R18 and FPN width 64 (R50 widths: slow test).
    today, new = today_and_new("COCO-scratch/retinanet_R_50_FPN_GN_2img.yaml", norm,
                               small_backbone=True)
    assert isinstance(new, D2NormsRetinaNet) and isinstance(new.head, D2NormsRetinaNetHead)
    _FLOWS["COCO-scratch/retinanet_R_50_FPN_GN_2img.yaml", norm, True] = \
        _check_models_equivalent(today, new)


@pytest.mark.slow
@pytest.mark.parametrize("norm", MATRIX_NORMS)
@pytest.mark.parametrize("detector", ["retinanet", "mask_rcnn"])
def test_r50_cell_models_match_today(detector, norm):
    cfg = shipped_cfg(f"COCO-scratch/{detector}_R_50_FPN_{norm}_2img.yaml")
    torch.manual_seed(0)
    today = perturb_(build_model(cfg))
    torch.manual_seed(0)
    new = build_model(with_new_components(cfg))
    new.load_state_dict(today.state_dict(), strict=True)
    _check_models_equivalent(today, new, images=2, gradients=True)


def test_todays_checkpoint_loads_into_the_new_model(tmp_path):
    today, _ = today_and_new("synthetic/mask_rcnn_R18_FPN_GN.yaml", "FRN")
    DetectionCheckpointer(today, save_dir=str(tmp_path)).save("today")
    cfg = with_new_components(shipped_cfg("synthetic/mask_rcnn_R18_FPN_GN.yaml", "FRN"))
    new = build_model(cfg)
    DetectionCheckpointer(new).load(str(tmp_path / "today.pth"))
    for (n, a), (m, b) in zip(today.state_dict().items(), new.state_dict().items()):
        assert n == m and torch.equal(a, b), n


# ---------------------------------------------------------------------------------------------
# walk of the new heads for every norm
# ---------------------------------------------------------------------------------------------
class _ReluCounter(TorchDispatchMode):
    RELU_OPS = {"relu", "relu_", "threshold", "threshold_", "clamp_min", "clamp_min_"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in self.RELU_OPS
        return func(*args, **(kwargs or {}))


def relu_inputs(model, run):
    """Run ``run()``; for every ReLU module call, the module that produced its input (data
    flow through module boundaries: every leaf module's output is recorded; Identity passes
    its input on), and the number of aten ReLU ops (none may run outside ReLU modules).
    Returns {"producers": [...], "relu_ops": n, "result": run()'s result}."""
    producers, kept, found, handles = {}, [], [], []

    def hook(mod, inputs, output):
        if isinstance(mod, nn.ReLU):
            found.append(producers.get(id(inputs[0])))
        if torch.is_tensor(output) and not isinstance(mod, nn.Identity):
            producers[id(output)] = mod
            kept.append(output)  # keeps ids unique

    for m in model.modules():
        if not list(m.children()):
            handles.append(m.register_forward_hook(hook))
    counter = _ReluCounter()
    try:
        with counter:
            result = run()
    finally:
        for h in handles:
            h.remove()
    return {"producers": found, "relu_ops": counter.count, "result": result}


def hidden_convs(head):
    """(conv, the modules after it) of each normalized layer of a head, in order."""
    if isinstance(head, RetinaNetHead):
        out = []
        for subnet in (head.cls_subnet, head.bbox_subnet):
            mods = list(subnet)
            step = 3 if len(mods) % 3 == 0 and not isinstance(mods[1], nn.ReLU) else 2
            out += [(mods[i], mods[i + 1:i + step]) for i in range(0, len(mods), step)]
        return out
    if isinstance(head, StandardRPNHead):
        convs = list(head.conv) if isinstance(head.conv, nn.Sequential) else [head.conv]
    else:
        convs = head.conv_norm_relus
    return [(c, [m for m in (c.norm, c.activation) if m is not None]) for c in convs]


def _heads_of(model):
    if isinstance(model, RetinaNet):
        return [model.head]
    return [model.proposal_generator.rpn_head, model.roi_heads.box_head,
            model.roi_heads.mask_head]


def check_head_layers(head, norm):
    """The conv each norm needs, its paired activation, Scaled WS gains by position."""
    layers = hidden_convs(head)
    assert layers
    # The RPN has no norm unless MODEL.RPN.NORM asks; its conv reads FPN outputs.
    head_norm = getattr(head, "_test_norm", norm)
    for i, (conv, after) in enumerate(layers):
        first = i == 0 or (isinstance(head, RetinaNetHead) and i == len(layers) // 2)
        kinds = [type(m) for m in after]
        if head_norm == "NF":
            assert isinstance(conv, L.ScaledStdConv2d) and conv.bias is not None
            assert conv.gamma == pytest.approx(1.0 if first else RELU_GAIN)
            assert [k for k in kinds if k is not nn.Identity] == [nn.ReLU]
        else:
            assert not isinstance(conv, L.ScaledStdConv2d)
            assert isinstance(conv, L.WSConv2d) == (head_norm == "GNWS"), (head, i)
        if head_norm == "FRN":
            frn = [m for m in after if isinstance(m, L.FilterResponseNorm2d)]
            assert len(frn) == 1 and frn[0].has_tlu
            assert not any(isinstance(m, nn.ReLU) for m in after)
        if head_norm in ("GN", "GNWS"):
            assert [k for k in kinds if k is not nn.Identity] == [L.GroupNorm, nn.ReLU]
        if head_norm == "":
            assert [k for k in kinds if k is not nn.Identity] == [nn.ReLU]
        if head_norm == "BN":
            assert {k for k in kinds} - {nn.Identity} in ({nn.BatchNorm2d, nn.ReLU},
                                                          {CycleBatchNormList, nn.ReLU})


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("source", ["synthetic/mask_rcnn_R18_FPN_GN.yaml",
                                    "COCO-scratch/retinanet_R_50_FPN_GN_2img.yaml"])
def test_walk_new_heads(source, norm):
    _, model = today_and_new(source, norm, small_backbone="retinanet" in source)
    for head in _heads_of(model):
        if isinstance(head, StandardRPNHead):
            head._test_norm = ""  # MODEL.RPN.NORM default
        check_head_layers(head, norm)
    # Data flow of a training step: no ReLU reads an FRN or TLU output, anywhere in the model,
    # and every aten ReLU runs inside a ReLU module.
    flow = flow_of(source, norm, small_backbone="retinanet" in source)
    found, relu_ops = flow["producers"], flow["relu_ops"]
    if norm == "FRN" and isinstance(model, RetinaNet):
        assert found == [] and relu_ops == 0  # TLU everywhere: no ReLU in the whole model
    else:
        assert found, "the walk saw no ReLU module"
    assert not [p for p in found if isinstance(p, (L.FilterResponseNorm2d, L.TLU))]
    assert relu_ops == len(found)
    if norm == "FRN":
        assert isinstance(model.backbone.bottom_up.stem.conv1.norm, L.FilterResponseNorm2d)
    if norm in ("GNWS", "NF") and isinstance(model, RetinaNet):
        assert getattr(model.head, "_d2n_shares_ws", False)  # standardized once per forward
    _MODELS.pop((source, norm, "retinanet" in source), None)  # last use: free the memory


@pytest.mark.parametrize("rpn_norm", ["NF", "FRN", "GNWS", "BN"])
def test_rpn_norm_option(rpn_norm):
    # Default "" is detectron2's head (tested above); MODEL.RPN.NORM gives the conv its norm,
    # e.g. Scaled WS for NF everywhere (gamma 1: FPN outputs come from no nonlinearity).
    cfg = shipped_cfg("synthetic/mask_rcnn_R18_FPN_GN.yaml", "NF")
    cfg.MODEL.RPN.NORM = rpn_norm
    shapes = _feature_shapes(cfg, cfg.MODEL.RPN.IN_FEATURES, cfg.MODEL.FPN.OUT_CHANNELS)
    head = D2NormsRPNHead(cfg, shapes)
    head._test_norm = rpn_norm
    check_head_layers(head, rpn_norm)
    names = set(head.state_dict())
    assert {"conv.weight", "objectness_logits.weight", "anchor_deltas.weight"} <= names
    if rpn_norm == "BN":  # per-level statistics, shared affine, as RetinaNet's head
        assert isinstance(head.conv.norm, CycleBatchNormList) and len(head.conv.norm) == 5
    if rpn_norm in ("NF", "GNWS"):
        assert getattr(head, "_d2n_shares_ws", False)
    feats = [torch.randn(2, cfg.MODEL.FPN.OUT_CHANNELS, s, s) for s in (16, 8, 4, 2, 1)]
    logits, deltas = head(feats)
    assert [t.shape[-1] for t in logits] == [16, 8, 4, 2, 1]
    assert all(torch.isfinite(t).all() for t in logits + deltas)


def test_stock_heads_unchanged_by_the_new_registrations():
    # The registrations add names; detectron2's own heads stay what detectron2 builds.
    cfg = shipped_cfg("synthetic/mask_rcnn_R18_FPN_GN.yaml", "")
    model = build_model(cfg)
    assert type(model.proposal_generator.rpn_head) is StandardRPNHead
    assert type(model.roi_heads.box_head) is FastRCNNConvFCHead


# ---------------------------------------------------------------------------------------------
# refusals at build time: the head, the key, what to use instead
# ---------------------------------------------------------------------------------------------
def _build_heads(cfg):
    fpn = cfg.MODEL.FPN.OUT_CHANNELS
    box = ShapeSpec(channels=fpn, height=7, width=7)
    D2NormsConvFCHead(cfg, box)
    D2NormsMaskHead(cfg, ShapeSpec(channels=fpn, height=14, width=14))
    D2NormsRPNHead(cfg, _feature_shapes(cfg, cfg.MODEL.RPN.IN_FEATURES, fpn))


@pytest.mark.parametrize("component,key", [
    ("D2NormsConvFCHead", "ROI_BOX_HEAD.NORM"),
    ("D2NormsMaskHead", "ROI_MASK_HEAD.NORM"),
    ("D2NormsRPNHead", "RPN.NORM"),
    ("D2NormsRetinaNetHead", "RETINANET.NORM"),
])
def test_heads_refuse_unknown_norms(component, key):
    if component == "D2NormsRetinaNetHead":
        cfg = shipped_cfg("COCO-scratch/retinanet_R_50_FPN_GN_2img.yaml", "", small_backbone=True)
    else:
        cfg = shipped_cfg("synthetic/mask_rcnn_R18_FPN_GN.yaml", "")
    node, leaf = key.split(".")
    setattr(getattr(cfg.MODEL, node), leaf, "frn")
    with pytest.raises(HeadNormError) as e:
        if component == "D2NormsRetinaNetHead":
            build_model(with_new_components(cfg))
        else:
            _build_heads(cfg)
    msg = str(e.value)
    assert component in msg and f"MODEL.{key}='frn'" in msg
    assert "Did you mean 'FRN'" in msg and "register_norm" in msg


def test_heads_refuse_widths_the_norm_cannot_split():
    cfg = shipped_cfg("synthetic/mask_rcnn_R18_FPN_GN.yaml", "GN")
    cfg.MODEL.ROI_BOX_HEAD.CONV_DIM = 48  # 48 channels into G=32 groups
    with pytest.raises(HeadNormError, match=r"D2NormsConvFCHead: MODEL.ROI_BOX_HEAD.NORM='GN'"
                       r"[\s\S]*MODEL.ROI_BOX_HEAD.CONV_DIM[\s\S]*GN_G<groups>"):
        _build_heads(cfg)
    cfg.MODEL.ROI_BOX_HEAD.NORM = "GN_C16"  # what the message proposes works
    _build_heads(cfg)


def test_heads_refuse_a_norm_with_nothing_to_normalize():
    cfg = shipped_cfg("synthetic/mask_rcnn_R18_FPN_GN.yaml", "GN")
    cfg.MODEL.ROI_BOX_HEAD.NUM_CONV = 0
    with pytest.raises(HeadNormError, match="NUM_CONV is 0.*4conv1fc"):
        _build_heads(cfg)
    cfg.MODEL.ROI_BOX_HEAD.NORM = ""  # detectron2's 2fc head without norm is fine
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    _build_heads(cfg)
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 0
    with pytest.raises(HeadNormError, match="D2NormsMaskHead.*NUM_CONV is 0"):
        _build_heads(cfg)


def test_retinanet_head_needs_a_conv():
    cfg = shipped_cfg("COCO-scratch/retinanet_R_50_FPN_GN_2img.yaml", "GN", small_backbone=True)
    cfg.MODEL.RETINANET.NUM_CONVS = 0
    with pytest.raises(ValueError, match="NUM_CONVS must be at least 1"):
        build_model(with_new_components(cfg))


def test_retinanet_prior_and_init():
    cfg = shipped_cfg("COCO-scratch/retinanet_R_50_FPN_NF_2img.yaml", small_backbone=True)
    shapes = _feature_shapes(cfg, cfg.MODEL.RETINANET.IN_FEATURES, 64)
    head = D2NormsRetinaNetHead(cfg, shapes)
    prior = cfg.MODEL.RETINANET.PRIOR_PROB
    assert torch.allclose(head.cls_score.bias, torch.full_like(head.cls_score.bias,
                                                               -math.log((1 - prior) / prior)))
    w = head.cls_subnet[0].weight
    assert abs(float(w.detach().std()) - 0.01) < 0.002  # detectron2's N(0, 0.01) init


def test_third_party_norm_reaches_every_head():
    # register_norm once; every d2_norms head builds its conv kind and paired activation.
    name = "TestHeadsSiLUGNWS"

    @L.register_norm(name, conv="ws", activation=lambda c: nn.SiLU())
    def _factory(channels):
        return nn.GroupNorm(8, channels)

    try:
        cfg = shipped_cfg("synthetic/mask_rcnn_R18_FPN_GN.yaml", "")
        cfg.MODEL.RPN.NORM = cfg.MODEL.ROI_BOX_HEAD.NORM = cfg.MODEL.ROI_MASK_HEAD.NORM = name
        cfg.MODEL.RETINANET.NORM = name
        fpn = cfg.MODEL.FPN.OUT_CHANNELS
        heads = [
            D2NormsRPNHead(cfg, _feature_shapes(cfg, cfg.MODEL.RPN.IN_FEATURES, fpn)),
            D2NormsConvFCHead(cfg, ShapeSpec(channels=fpn, height=7, width=7)),
            D2NormsMaskHead(cfg, ShapeSpec(channels=fpn, height=14, width=14)),
            D2NormsRetinaNetHead(cfg, _feature_shapes(cfg, cfg.MODEL.RPN.IN_FEATURES, fpn)),
        ]
        for head in heads:
            for conv, after in hidden_convs(head):
                assert isinstance(conv, L.WSConv2d)
                assert [type(m) for m in after] == [nn.GroupNorm, nn.SiLU]
            assert not any(isinstance(m, nn.ReLU) for n, m in head.named_modules()
                           if "relu" not in n)  # only detectron2's fc/deconv ReLUs remain
    finally:
        L.unregister_norm(name)
