"""d2_norms' registered heads (d2_norms/modeling/heads.py), tested directly.

* registration: the names in detectron2's registries, subclasses of detectron2's heads; the
  stock names still build detectron2's own heads;
* parameter names and shapes: detectron2's (``head.cls_subnet.0.weight``,
  ``roi_heads.box_head.conv1.norm.weight``, ``conv.weight`` in the RPN ...): the stock head's
  for the norms a stock head builds itself ("", BN, SyncBN, GN); for GNWS, FRN, FRN_LEPS and NF
  derived from the stock GN head by the layout rule written out in :func:`expected_shapes`;
* structure per norm (:func:`check_head_layers`): WSConv2d for GNWS, ScaledStdConv2d for NF
  (gamma 1 on FPN / ROI features, ReLU's gain after a ReLU), fused FRN + TLU and no ReLU after
  FRN, CycleBatchNormList for BN / SyncBN in RetinaNet (and the RPN);
* outputs: bitwise those of detectron2's stock heads loaded with the same weights for the norms
  they build, and for every norm those of a reference forward written out here
  (:func:`reference_forward`: the papers' formulas for GN, BN, FRN + TLU, WS and Scaled WS,
  reading the weights by detectron2's parameter names);
* whole R18 models: the stock-head model's losses, gradients and predictions for the norms it
  builds; a training step for every norm; a stock-head checkpoint loads;
* refusals when a head is built: :class:`HeadNormError` naming the head, the key and a fix.

The data flow of whole models (no ReLU after FRN / TLU, WS convs before every GN, Scaled WS
convs under NF) is walked in test_activation_pairing.py. Run on both detectron2 versions
(``.venv``: v0.6; ``.venv-d2main``: main). Small on purpose (2 shared CPU cores).
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import d2_norms  # noqa: F401  (shims)
import d2_norms.layers as L
from d2_norms.layers.conv_norm_act import resolve_norm
from d2_norms.modeling.heads import (D2NormsConvFCHead, D2NormsMaskHead, D2NormsRetinaNet,
                                     D2NormsRetinaNetHead, D2NormsRPNHead, HeadNormError)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import CycleBatchNormList, ShapeSpec
from detectron2.modeling import (META_ARCH_REGISTRY, ROI_BOX_HEAD_REGISTRY,
                                 ROI_MASK_HEAD_REGISTRY, RPN_HEAD_REGISTRY, build_model)
from detectron2.modeling.meta_arch.retinanet import RetinaNet, RetinaNetHead
from detectron2.modeling.proposal_generator.rpn import StandardRPNHead
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from test_modeling_backbones import batched_inputs, detector_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DETECTORS = ["retinanet", "mask_rcnn"]
ALL_NORMS = ["", "BN", "SyncBN", "GN", "GNWS", "FRN", "FRN_LEPS", "NF"]
STOCK_BUILDS = ["", "BN", "SyncBN", "GN"]  # norms detectron2's own heads build
MATRIX_NORMS = ["BN", "SyncBN", "GN", "GNWS", "FRN", "NF"]  # the COCO-scratch cells

# The reference's constants, written out (not read from d2_norms):
RELU_GAIN = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))  # NF sec. 4.3: 1 / std(relu(N(0, 1)))
WS_EPS = 1e-6  # added to the fan-in variance (WS, Scaled WS)
FRN_EPS = 1e-6  # FRN eq. 2; learned eps: FRN_EPS + |eps_l| (sec. 3.3)
GN_EPS = BN_EPS = 1e-5  # torch / detectron2 defaults
GN_GROUPS = 32  # GN paper default, detectron2's "GN"

# The d2_norms component and the detectron2 original it stands for.
STOCK_OF = {D2NormsRetinaNet: RetinaNet, D2NormsRetinaNetHead: RetinaNetHead,
            D2NormsRPNHead: StandardRPNHead, D2NormsConvFCHead: FastRCNNConvFCHead,
            D2NormsMaskHead: MaskRCNNConvUpsampleHead}
# Heads built by d2_norms take the registry's GN / SyncBN (subclasses with the same state and
# numerics); a stock head may get either from detectron2's get_norm.
REGISTRY_SUBCLASS = {nn.GroupNorm: L.GroupNorm, nn.SyncBatchNorm: L.SyncBatchNorm}


pytestmark = pytest.mark.usefixtures("eager_frn_one_thread")


# ---------------------------------------------------------------------------------------------
# configs and heads
# ---------------------------------------------------------------------------------------------
HEAD_NORM_KEY = {"retinanet": "RETINANET", "rpn": "RPN", "box": "ROI_BOX_HEAD",
                 "mask": "ROI_MASK_HEAD"}


def shipped_cfg(rel_path, norm=None, *, small_backbone=False):
    """A shipped config (``configs/<rel_path>``) made CPU-test sized; ``norm``: every norm key;
    ``small_backbone``: R18 with FPN width 64."""
    from d2_norms.engine.preflight import load_config

    cfg = load_config(os.path.join(REPO, "configs", rel_path), [])  # applies MODEL.D2NORMS.NORM
    if norm is not None:
        for node in ("RESNETS", "FPN", "RPN", "RETINANET", "ROI_BOX_HEAD", "ROI_MASK_HEAD"):
            getattr(cfg.MODEL, node).NORM = norm
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 16
    if small_backbone:
        cfg.MODEL.RESNETS.DEPTH = 18
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
        cfg.MODEL.FPN.OUT_CHANNELS = 64
    return cfg


def with_stock_heads(cfg, norm=None):
    """``cfg`` selecting detectron2's own heads (``norm``: for every head's norm key)."""
    cfg = cfg.clone()
    cfg.defrost()
    if cfg.MODEL.META_ARCHITECTURE == "D2NormsRetinaNet":
        cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.RPN.HEAD_NAME = "StandardRPNHead"
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    if norm is not None:
        for node in ("RETINANET", "ROI_BOX_HEAD", "ROI_MASK_HEAD"):
            getattr(cfg.MODEL, node).NORM = norm
    return cfg


def stock_gn(channels):
    """detectron2's "GN" (``nn.GroupNorm(32, channels)``); width 1 is v0.6's type probe."""
    return nn.GroupNorm(32 if channels % 32 == 0 else 1, channels)


def stock_retinanet_head(cfg, input_shapes):
    """detectron2's RetinaNetHead for ``cfg``. detectron2 v0.6's head builds get_norm(norm, 1)
    to read the norm's type, and GroupNorm(32, 1) fails (its own bug); its get_norm also takes
    a callable, so "GN" is given as one that builds detectron2's GN layer for every real
    width (yacs holds only strings, hence the explicit arguments)."""
    kwargs = RetinaNetHead.from_config(cfg, input_shapes)
    if kwargs["norm"] == "GN":
        kwargs["norm"] = stock_gn
    return RetinaNetHead(**kwargs)


def build_stock_model(cfg):
    """``build_model`` of a config with detectron2's heads (RetinaNet with "GN": the head from
    :func:`stock_retinanet_head`)."""
    if cfg.MODEL.META_ARCHITECTURE != "RetinaNet" or cfg.MODEL.RETINANET.NORM != "GN":
        return build_model(cfg)
    plain = cfg.clone()
    plain.defrost()
    plain.MODEL.RETINANET.NORM = ""
    kwargs = RetinaNet.from_config(plain)  # builds a head without norm first: replaced below
    shapes = kwargs["backbone"].output_shape()
    kwargs["head"] = stock_retinanet_head(cfg, [shapes[f] for f in cfg.MODEL.RETINANET.IN_FEATURES])
    return RetinaNet(**kwargs).to(torch.device(cfg.MODEL.DEVICE))


def head_kinds(cfg):
    if "RetinaNet" in cfg.MODEL.META_ARCHITECTURE:
        return ["retinanet"]
    return ["rpn", "box", "mask"]


def _feature_shapes(names, channels):
    return [ShapeSpec(channels=channels, stride=2 ** int(n[1:])) for n in names]


def build_head(cfg, kind, *, stock=False, seed=0):
    fpn = cfg.MODEL.FPN.OUT_CHANNELS
    torch.manual_seed(seed)
    if stock:
        cfg = with_stock_heads(cfg)
    if kind == "retinanet":
        shapes = _feature_shapes(cfg.MODEL.RETINANET.IN_FEATURES, fpn)
        return stock_retinanet_head(cfg, shapes) if stock else D2NormsRetinaNetHead(cfg, shapes)
    if kind == "rpn":
        cls = StandardRPNHead if stock else D2NormsRPNHead
        return cls(cfg, _feature_shapes(cfg.MODEL.RPN.IN_FEATURES, fpn))
    if kind == "box":
        cls = FastRCNNConvFCHead if stock else D2NormsConvFCHead
        return cls(cfg, ShapeSpec(channels=fpn, height=7, width=7))
    cls = MaskRCNNConvUpsampleHead if stock else D2NormsMaskHead
    return cls(cfg, ShapeSpec(channels=fpn, height=14, width=14))


def head_inputs(kind, channels, seed=1):
    """Five levels of features (RetinaNet P3-P7, RPN P2-P6) or pooled ROIs. No 1x1 levels:
    batch statistics of 2 values per channel are too ill-conditioned to compare float32 with
    the float64 reference (1x1 maps run in the whole-model tests)."""
    g = torch.Generator().manual_seed(seed)
    if kind in ("retinanet", "rpn"):
        sizes = (8, 6, 4, 3, 2) if kind == "retinanet" else (12, 8, 6, 4, 2)
        return [torch.randn(2, channels, s, s, generator=g) for s in sizes]
    n, s = (4, 7) if kind == "box" else (2, 14)
    return torch.randn(n, channels, s, s, generator=g)


def run_head(head, x):
    if isinstance(head, MaskRCNNConvUpsampleHead):
        return head.layers(x)  # the mask logits (forward also computes the loss)
    return head(x)


def heads_of(model):
    if isinstance(model, RetinaNet):
        return {"retinanet": model.head}
    return {"rpn": model.proposal_generator.rpn_head, "box": model.roi_heads.box_head,
            "mask": model.roi_heads.mask_head}


@torch.no_grad()
def perturb_(module, seed=0):
    """Move every parameter off its constant init (gains 1, biases 0, tau 0) and the BN
    running statistics off (0, 1), so that a swapped or dropped tensor shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        # A random period-1021 pattern (prime: no alignment with channel strides) is enough
        # and far cheaper than a fresh draw for every element of a 12.8M-weight fc layer.
        base = torch.randn(2, min(p.numel(), 1021), generator=g)
        reps = -(-p.numel() // base.shape[1])
        scale, shift = base.repeat(1, reps)[:, :p.numel()].view(2, *p.shape)
        p.mul_(1 + 0.2 * scale).add_(0.02 * shift)
    for name, b in module.named_buffers():
        if name.endswith("running_mean"):
            b.add_(0.1 * torch.randn(b.shape, generator=g))
        elif name.endswith("running_var"):
            b.mul_(0.5 + torch.rand(b.shape, generator=g))
    return module


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


# ---------------------------------------------------------------------------------------------
# the independent references: parameter layout and forward, written out
# ---------------------------------------------------------------------------------------------
def _conv_of_norm(prefix):
    """The conv a norm belongs to, by detectron2's names: ``conv1.norm`` (Conv2d's norm) ->
    ``conv1``; ``cls_subnet.4`` (RetinaNet subnet slot) -> ``cls_subnet.3``."""
    if prefix.endswith(".norm"):
        return prefix[:-len(".norm")]
    head, index = prefix.rsplit(".", 1)
    return f"{head}.{int(index) - 1}"


def expected_shapes(stock_gn_head, norm):
    """{name: shape} of a d2_norms head for ``norm``, from detectron2's head built with GN:
    GN / GNWS: the same (WS changes no parameter); FRN: each norm's weight, bias and tau
    (+ eps_l, a scalar, for FRN_LEPS); NF: no norm, the conv gets bias and gain (C, 1, 1, 1)."""
    norm_prefixes = {n for n, m in stock_gn_head.named_modules() if isinstance(m, nn.GroupNorm)}
    assert norm_prefixes
    out = {}
    for key, value in stock_gn_head.state_dict().items():
        prefix, leaf = key.rsplit(".", 1)
        if prefix not in norm_prefixes or norm in ("GN", "GNWS"):
            out[key] = tuple(value.shape)
            continue
        channels = value.shape[0]
        if norm in ("FRN", "FRN_LEPS"):
            out[key] = (channels,)
            if leaf == "bias":
                out[f"{prefix}.tau"] = (channels,)
                if norm == "FRN_LEPS":
                    out[f"{prefix}.eps_l"] = ()
        elif norm == "NF":
            conv = _conv_of_norm(prefix)
            out[f"{conv}.bias"] = (channels,)
            out[f"{conv}.gain"] = (channels, 1, 1, 1)
        else:
            raise AssertionError(norm)
    return out


def expected_rpn_shapes(norm, channels, num_anchors, num_levels=5):
    """{name: shape} of the RPN head (one 3x3 conv) for ``MODEL.RPN.NORM``, detectron2's
    ``conv`` / ``objectness_logits`` / ``anchor_deltas`` with the norm in ``conv.norm`` as in
    detectron2's Conv2d (BN: per-level statistics, shared affine, as RetinaNet's head)."""
    c = channels
    out = {"conv.weight": (c, c, 3, 3)}
    if norm in ("", "NF"):
        out["conv.bias"] = (c,)
    if norm == "NF":
        out["conv.gain"] = (c, 1, 1, 1)
    if norm not in ("", "NF"):
        out["conv.norm.weight"] = out["conv.norm.bias"] = (c,)
    if norm in ("FRN", "FRN_LEPS"):
        out["conv.norm.tau"] = (c,)
    if norm == "FRN_LEPS":
        out["conv.norm.eps_l"] = ()
    if norm in ("BN", "SyncBN"):
        for level in range(num_levels):
            out[f"conv.norm.{level}.running_mean"] = out[f"conv.norm.{level}.running_var"] = (c,)
            out[f"conv.norm.{level}.num_batches_tracked"] = ()
    out.update({"objectness_logits.weight": (num_anchors, c, 1, 1),
                "objectness_logits.bias": (num_anchors,),
                "anchor_deltas.weight": (4 * num_anchors, c, 1, 1),
                "anchor_deltas.bias": (4 * num_anchors,)})
    return out


def _standardized(w):
    flat = w.flatten(1)
    mean = flat.mean(1, keepdim=True)
    var = flat.var(1, unbiased=False, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + WS_EPS)).view_as(w)


def _ref_conv(x, sd, name, norm, gamma):
    """3x3 conv ``name``: plain; WS for GNWS; Scaled WS for NF (NF eq. 3 with gain g)."""
    w = sd[f"{name}.weight"]
    if norm == "GNWS":
        w = _standardized(w)
    elif norm == "NF":
        w = sd[f"{name}.gain"] * gamma * _standardized(w) / math.sqrt(w[0].numel())
    return F.conv2d(x, w, sd.get(f"{name}.bias"), padding=1)


def _ref_norm_act(x, sd, name, norm, training, level):
    """Norm ``name`` (state-dict prefix) and its activation: ReLU, or TLU for FRN."""
    shape = (1, -1, 1, 1)

    def affine(y):
        return y * sd[f"{name}.weight"].view(shape) + sd[f"{name}.bias"].view(shape)

    if norm in ("", "NF"):
        return torch.relu(x)
    if norm in ("GN", "GNWS"):
        g = x.reshape(x.shape[0], GN_GROUPS, -1)
        g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(
            g.var(-1, unbiased=False, keepdim=True) + GN_EPS)
        return torch.relu(affine(g.view_as(x)))
    if norm in ("BN", "SyncBN"):
        if training:
            mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        else:  # per-level statistics (CycleBatchNormList) when the state has them
            stats = f"{name}.{level}" if f"{name}.{level}.running_mean" in sd else name
            mean, var = sd[f"{stats}.running_mean"], sd[f"{stats}.running_var"]
        return torch.relu(affine((x - mean.view(shape)) / torch.sqrt(var.view(shape) + BN_EPS)))
    if norm in ("FRN", "FRN_LEPS"):
        eps = FRN_EPS + (sd[f"{name}.eps_l"].abs() if norm == "FRN_LEPS" else 0.0)
        nu2 = x.square().mean((2, 3), keepdim=True)
        y = affine(x * torch.rsqrt(nu2 + eps))
        return torch.maximum(y, sd[f"{name}.tau"].view(shape))  # TLU; no ReLU
    raise AssertionError(norm)


def _ref_conv_layers(x, sd, names, norm, training, level=0):
    """detectron2 Conv2d layout: conv ``name``, norm ``name.norm``, activation. Scaled WS
    gamma: 1 for the first conv (FPN / ROI features), ReLU's gain after a ReLU."""
    for i, name in enumerate(names):
        x = _ref_conv(x, sd, name, norm, 1.0 if i == 0 else RELU_GAIN)
        x = _ref_norm_act(x, sd, f"{name}.norm", norm, training, level)
    return x


def _count(sd, pattern, start=1, step=1):
    n = 0
    while pattern.format(start + n * step) in sd:
        n += 1
    return n


def reference_forward(kind, state, x, norm, training):
    """The head's output computed from its state dict (float64) by the formulas above."""
    sd = {k: v.double() for k, v in state.items()}
    x = [t.double() for t in x] if isinstance(x, list) else x.double()
    if kind == "box":
        convs = [f"conv{k + 1}" for k in range(_count(sd, "conv{}.weight"))]
        y = _ref_conv_layers(x, sd, convs, norm, training).flatten(1)
        for k in range(_count(sd, "fc{}.weight")):
            y = torch.relu(F.linear(y, sd[f"fc{k + 1}.weight"], sd[f"fc{k + 1}.bias"]))
        return y
    if kind == "mask":
        convs = [f"mask_fcn{k + 1}" for k in range(_count(sd, "mask_fcn{}.weight"))]
        y = _ref_conv_layers(x, sd, convs, norm, training)
        y = torch.relu(F.conv_transpose2d(y, sd["deconv.weight"], sd["deconv.bias"], stride=2))
        return F.conv2d(y, sd["predictor.weight"], sd["predictor.bias"])
    if kind == "rpn":
        logits, deltas = [], []
        for level, f in enumerate(x):
            t = _ref_conv_layers(f, sd, ["conv"], norm, training, level)
            logits.append(F.conv2d(t, sd["objectness_logits.weight"], sd["objectness_logits.bias"]))
            deltas.append(F.conv2d(t, sd["anchor_deltas.weight"], sd["anchor_deltas.bias"]))
        return logits, deltas
    # RetinaNet: detectron2's subnets, (conv, norm, ReLU) per layer, (conv, ReLU) without norm
    step = 2 if norm == "" else 3
    layers = _count(sd, "cls_subnet.{}.weight", start=0, step=step)
    logits, deltas = [], []
    for level, f in enumerate(x):
        outs = []
        for subnet in ("cls_subnet", "bbox_subnet"):
            t = f
            for i in range(layers):
                t = _ref_conv(t, sd, f"{subnet}.{step * i}", norm, 1.0 if i == 0 else RELU_GAIN)
                t = _ref_norm_act(t, sd, f"{subnet}.{step * i + 1}", norm, training, level)
            outs.append(t)
        logits.append(F.conv2d(outs[0], sd["cls_score.weight"], sd["cls_score.bias"], padding=1))
        deltas.append(F.conv2d(outs[1], sd["bbox_pred.weight"], sd["bbox_pred.bias"], padding=1))
    return logits, deltas


def assert_matches_reference(out, ref):
    fo, fr = _flat(out), _flat(ref)
    assert len(fo) == len(fr) and fo
    for o, r in zip(fo, fr):
        assert o.shape == r.shape
        scale = float(r.abs().max()) + 1e-12
        torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=1e-5 * scale)


def check_against_reference(head, kind, norm, x):
    """Eval, then training mode (batch statistics), against :func:`reference_forward`."""
    for training in (False, True):
        state = {k: v.clone() for k, v in head.state_dict().items()}
        head.train(training)
        with torch.no_grad():
            out = run_head(head, x)
        assert_matches_reference(out, reference_forward(kind, state, x, norm, training))


# ---------------------------------------------------------------------------------------------
# the structure each norm needs
# ---------------------------------------------------------------------------------------------
def hidden_layers(head, norm):
    """[(conv, [modules after it]), ...] of each hidden layer, in forward order per subnet, and
    whether each is the first of its subnet (reads FPN / ROI features)."""
    if isinstance(head, RetinaNetHead):
        step = 2 if norm == "" else 3  # detectron2: conv, [norm,] ReLU
        out = []
        for subnet in (head.cls_subnet, head.bbox_subnet):
            mods = list(subnet)
            assert len(mods) % step == 0, (norm, mods)
            out += [(mods[i], mods[i + 1:i + step], i == 0) for i in range(0, len(mods), step)]
        return out
    if isinstance(head, StandardRPNHead):
        convs = list(head.conv) if isinstance(head.conv, nn.Sequential) else [head.conv]
    else:
        convs = head.conv_norm_relus
    return [(c, [m for m in (c.norm, c.activation) if m is not None], i == 0)
            for i, c in enumerate(convs)]


def check_head_layers(head, norm):
    """The conv each norm needs, its paired activation, Scaled WS gains by position."""
    layers = hidden_layers(head, norm)
    assert layers
    retina = isinstance(head, RetinaNetHead)
    for conv, after, first in layers:
        kinds = [type(m) for m in after if not isinstance(m, nn.Identity)]
        if norm == "NF":
            assert type(conv) is L.ScaledStdConv2d and conv.bias is not None
            assert conv.gamma == pytest.approx(1.0 if first else RELU_GAIN)
            assert kinds == [nn.ReLU]
        elif norm == "GNWS":
            assert type(conv) is L.WSConv2d
        else:  # plain: torch's Conv2d in RetinaNet's subnets, detectron2's Conv2d elsewhere
            assert not isinstance(conv, (L.WSConv2d, L.ScaledStdConv2d))
            assert type(conv).__module__.startswith(("torch.", "detectron2."))
        # detectron2: RetinaNet convs always have a bias; elsewhere only without a norm.
        if norm != "NF":
            assert (conv.bias is not None) == (retina or norm == "")
        if norm in ("FRN", "FRN_LEPS"):
            assert kinds == [L.FilterResponseNorm2d]  # fused FRN + TLU, no ReLU after it
            assert after[0].has_tlu and after[0].learned_eps == (norm == "FRN_LEPS")
        if norm in ("GN", "GNWS"):
            assert kinds == [L.GroupNorm, nn.ReLU] and after[0].num_groups == GN_GROUPS
        if norm == "":
            assert kinds == [nn.ReLU]
        if norm in ("BN", "SyncBN"):
            bn = nn.BatchNorm2d if norm == "BN" else nn.SyncBatchNorm
            if retina or isinstance(head, StandardRPNHead):  # per-level statistics
                assert kinds == [CycleBatchNormList, nn.ReLU] and len(after[0]) == 5
                assert all(isinstance(m, bn) and not m.affine for m in after[0])
            else:
                assert len(kinds) == 2 and issubclass(kinds[0], bn) and kinds[1] is nn.ReLU
    if norm in ("GNWS", "NF") and (retina or isinstance(head, StandardRPNHead)):
        assert getattr(head, "_d2n_shares_ws", False)  # standardized once per forward


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("registry,name,cls", [
    (META_ARCH_REGISTRY, "D2NormsRetinaNet", D2NormsRetinaNet),
    (RPN_HEAD_REGISTRY, "D2NormsRPNHead", D2NormsRPNHead),
    (ROI_BOX_HEAD_REGISTRY, "D2NormsConvFCHead", D2NormsConvFCHead),
    (ROI_MASK_HEAD_REGISTRY, "D2NormsMaskHead", D2NormsMaskHead),
], ids=lambda v: v if isinstance(v, str) else "")
def test_registered_in_detectron2(registry, name, cls):
    assert registry.get(name) is cls
    stock = STOCK_OF[cls]
    assert issubclass(cls, stock)
    assert registry.get(stock.__name__) is stock  # the stock entry stays detectron2's
    assert issubclass(D2NormsRetinaNetHead, RetinaNetHead)


@pytest.mark.parametrize("detector", DETECTORS)
def test_configs_select_registered_heads_and_stock_names_stay_stock(tmp_path, detector):
    cfg = detector_cfg(tmp_path, detector, "GN", 18)
    ours, stock = build_model(cfg), build_stock_model(with_stock_heads(cfg))
    for kind, head in heads_of(ours).items():
        assert type(head) in STOCK_OF and isinstance(head, STOCK_OF[type(head)]), kind
        assert type(heads_of(stock)[kind]) is STOCK_OF[type(head)], kind
    if detector == "retinanet":
        assert type(ours) is D2NormsRetinaNet and type(stock) is RetinaNet


# ---------------------------------------------------------------------------------------------
# heads of every COCO-scratch R50 cell (real widths): names, structure, outputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", MATRIX_NORMS)
@pytest.mark.parametrize("detector", DETECTORS)
def test_heads_of_every_r50_cell(detector, norm):
    cfg = shipped_cfg(f"COCO-scratch/{detector}_R_50_FPN_{norm}_2img.yaml")
    assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.RESNETS.NORM == norm
    # Issue 13 item 7: RetinaNet cells with a norm module build one norm per pyramid level
    # (tests/test_retinanet_per_level.py, test_model_signatures.py); here the shared layout is
    # compared with detectron2's stock head, everything else as the cell sets it.
    assert cfg.MODEL.RETINANET.NORM_PER_LEVEL == (detector == "retinanet" and norm != "NF")
    cfg.MODEL.RETINANET.NORM_PER_LEVEL = False
    fpn = cfg.MODEL.FPN.OUT_CHANNELS
    for kind in head_kinds(cfg):
        head_norm = getattr(cfg.MODEL, HEAD_NORM_KEY[kind]).NORM
        if kind != "rpn":
            assert head_norm == norm  # the cell's heads carry its norm
        head = perturb_(build_head(cfg, kind))
        check_head_layers(head, head_norm)
        shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        x = head_inputs(kind, fpn)
        if kind == "rpn" and head_norm != "":
            anchors = head.objectness_logits.out_channels
            assert shapes == expected_rpn_shapes(head_norm, fpn, anchors)
        elif head_norm in STOCK_BUILDS:
            stock = build_head(cfg, kind, stock=True)
            assert list(stock.state_dict()) == list(shapes)
            assert {k: tuple(v.shape) for k, v in stock.state_dict().items()} == shapes
            stock.load_state_dict(head.state_dict(), strict=True)
            for training in (True, False):  # training first: BN statistics update alike
                stock.train(training), head.train(training)
                with torch.set_grad_enabled(training):
                    assert_identical(run_head(stock, x), run_head(head, x))
            assert_identical(list(stock.state_dict().values()), list(head.state_dict().values()))
        else:
            gn_stock = build_head(with_stock_heads(cfg, "GN"), kind, stock=True)
            assert shapes == expected_shapes(gn_stock, head_norm)
        check_against_reference(head, kind, head_norm, x)


# ---------------------------------------------------------------------------------------------
# R18 models: every norm in every head
# ---------------------------------------------------------------------------------------------
def all_norm_cfg(tmp_path, detector, norm):
    """R18-FPN (test_modeling_backbones' cfg) with ``norm`` in every norm key, RPN included."""
    cfg = detector_cfg(tmp_path, detector, norm, 18, fpn_norm=norm, head_norm=norm)
    cfg.MODEL.RPN.NORM = norm
    return cfg


@pytest.mark.parametrize("norm", ALL_NORMS)
@pytest.mark.parametrize("detector", DETECTORS)
def test_every_norm_builds_right_and_trains(tmp_path, detector, norm):
    cfg = all_norm_cfg(tmp_path, detector, norm)
    torch.manual_seed(0)
    model = build_model(cfg)
    heads = heads_of(model)
    for kind, head in heads.items():
        check_head_layers(head, norm)
        shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        if kind == "rpn":
            assert shapes == expected_rpn_shapes(norm, 64, head.objectness_logits.out_channels)
        elif norm in STOCK_BUILDS:
            stock = build_head(with_stock_heads(cfg), kind, stock=True)
            assert {k: tuple(v.shape) for k, v in stock.state_dict().items()} == shapes
        else:
            stock = build_head(with_stock_heads(cfg, "GN"), kind, stock=True)
            assert shapes == expected_shapes(stock, norm)
    # One SGD step: finite losses, a finite gradient for every head parameter, finite again.
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with EventStorage(0):
        losses = model(batched_inputs())
        assert losses and all(torch.isfinite(v) for v in losses.values()), losses
        sum(losses.values()).backward()
        for kind, head in heads.items():
            for name, p in head.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), (kind, name)
        opt.step()
        losses = model(batched_inputs(seed=1))
    assert all(torch.isfinite(v) for v in losses.values()), losses


@pytest.mark.parametrize("norm", ALL_NORMS)
@pytest.mark.parametrize("kind", ["retinanet", "box", "mask"])
def test_head_outputs_match_reference(tmp_path, kind, norm):
    # Every norm, R18 widths (FPN 64, head convs 32): the written-out reference forward.
    cfg = all_norm_cfg(tmp_path, "retinanet" if kind == "retinanet" else "mask_rcnn", norm)
    head = perturb_(build_head(cfg, kind))
    check_against_reference(head, kind, norm, head_inputs(kind, cfg.MODEL.FPN.OUT_CHANNELS))


def _train_out(model, inputs, seed=3):
    model.train()
    torch.manual_seed(seed)  # ROI sampling
    with EventStorage(0):
        return model(inputs)


def _eval_out(model, inputs):
    """Eval-mode predictions and the heads' raw outputs behind them (predictions of a model
    with random weights may all be filtered out; the raw outputs never are)."""
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


def assert_same_structure(stock, ours):
    """Same state names / shapes; the same module type per name, but the roots d2_norms
    replaces (its subclasses) and GN / SyncBN (the registry's subclasses)."""
    s_stock, s_ours = stock.state_dict(), ours.state_dict()
    assert list(s_stock) == list(s_ours)
    assert {k: v.shape for k, v in s_stock.items()} == {k: v.shape for k, v in s_ours.items()}
    t_stock = {n: type(m) for n, m in stock.named_modules()}
    t_ours = {n: type(m) for n, m in ours.named_modules()}
    assert list(t_stock) == list(t_ours)
    ours_for = {v: k for k, v in STOCK_OF.items()}
    for name, cls in t_stock.items():
        allowed = (cls, ours_for.get(cls), REGISTRY_SUBCLASS.get(cls))
        assert t_ours[name] in allowed, (name, cls, t_ours[name])


@pytest.mark.parametrize("norm", STOCK_BUILDS)
@pytest.mark.parametrize("detector", DETECTORS)
def test_model_matches_stock_heads(tmp_path, detector, norm):
    """For the norms detectron2's heads build: same structure, identical losses (training,
    same seed), the same gradients (up to float summation order: CPU conv backward is not
    bitwise reproducible), identical raw outputs and predictions (eval), the same buffers."""
    cfg = detector_cfg(tmp_path, detector, norm, 18, head_norm=norm)
    torch.manual_seed(0)
    stock = perturb_(build_stock_model(with_stock_heads(cfg)))
    torch.manual_seed(0)
    ours = build_model(cfg)
    ours.load_state_dict(stock.state_dict(), strict=True)
    assert_same_structure(stock, ours)
    inputs = batched_inputs()
    losses_stock, losses_ours = _train_out(stock, inputs), _train_out(ours, inputs)
    assert sorted(losses_stock) == sorted(losses_ours)
    assert all(torch.isfinite(v) for v in losses_ours.values())
    assert_identical(losses_stock, losses_ours)
    sum(losses_stock.values()).backward()
    sum(losses_ours.values()).backward()
    pairs = list(zip(stock.named_parameters(), ours.named_parameters()))
    assert [(n, p.grad is None) for (n, p), _ in pairs] == \
        [(n, q.grad is None) for _, (n, q) in pairs]
    g_stock = torch.cat([p.grad.flatten() for (_, p), _ in pairs if p.grad is not None])
    g_ours = torch.cat([q.grad.flatten() for _, (_, q) in pairs if q.grad is not None])
    # Relative to the whole gradient: a bias before BN has a gradient of pure float noise.
    assert float((g_ours - g_stock).norm()) <= 1e-5 * float(g_stock.norm())
    (preds_stock, raw_stock), (preds_ours, raw_ours) = _eval_out(stock, inputs), _eval_out(
        ours, inputs)
    assert all(t.numel() for t in _flat(raw_ours))
    assert_identical(raw_stock, raw_ours)
    assert [len(p["instances"]) for p in preds_stock] == [len(p["instances"]) for p in preds_ours]
    if any(len(p["instances"]) for p in preds_ours):
        assert_identical(preds_stock, preds_ours)
    for (n, b), (_, c) in zip(stock.named_buffers(), ours.named_buffers()):
        assert torch.equal(b, c), n


def test_stock_head_checkpoint_loads(tmp_path):
    # A checkpoint of detectron2's heads (GN) loads into d2_norms' heads unchanged.
    cfg = detector_cfg(tmp_path, "mask_rcnn", "GN", 18)
    stock = perturb_(build_stock_model(with_stock_heads(cfg)))
    DetectionCheckpointer(stock, save_dir=str(tmp_path)).save("stock")
    ours = build_model(cfg)
    DetectionCheckpointer(ours).load(str(tmp_path / "stock.pth"))
    for (n, a), (m, b) in zip(stock.state_dict().items(), ours.state_dict().items()):
        assert n == m and torch.equal(a, b), n


# ---------------------------------------------------------------------------------------------
# the RPN's norm option
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rpn_norm", ["NF", "FRN", "FRN_LEPS", "GNWS", "GN", "BN"])
def test_rpn_norm_option(rpn_norm):
    # Default "" is detectron2's head (above); MODEL.RPN.NORM gives the conv its norm, e.g.
    # Scaled WS for NF everywhere (gamma 1: FPN outputs come from no nonlinearity).
    cfg = shipped_cfg("synthetic/mask_rcnn_R18_FPN_GN.yaml", "NF")
    cfg.MODEL.RPN.NORM = rpn_norm
    fpn = cfg.MODEL.FPN.OUT_CHANNELS
    head = perturb_(build_head(cfg, "rpn"))
    check_head_layers(head, rpn_norm)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == \
        expected_rpn_shapes(rpn_norm, fpn, head.objectness_logits.out_channels)
    check_against_reference(head, "rpn", rpn_norm, head_inputs("rpn", fpn))


# ---------------------------------------------------------------------------------------------
# refusals at build time: the head, the key, what to use instead
# ---------------------------------------------------------------------------------------------
def _build_rcnn_heads(cfg):
    for kind in ("box", "mask", "rpn"):
        build_head(cfg, kind)


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
            build_model(cfg)  # through D2NormsRetinaNet
        else:
            _build_rcnn_heads(cfg)
    msg = str(e.value)
    assert component in msg and f"MODEL.{key}='frn'" in msg
    assert "Did you mean 'FRN'" in msg and "register_norm" in msg


def test_heads_refuse_widths_the_norm_cannot_split():
    cfg = shipped_cfg("synthetic/mask_rcnn_R18_FPN_GN.yaml", "GN")
    cfg.MODEL.ROI_BOX_HEAD.CONV_DIM = 48  # 48 channels into G=32 groups
    with pytest.raises(HeadNormError, match=r"D2NormsConvFCHead: MODEL.ROI_BOX_HEAD.NORM='GN'"
                       r"[\s\S]*MODEL.ROI_BOX_HEAD.CONV_DIM[\s\S]*GN_G<groups>"):
        _build_rcnn_heads(cfg)
    cfg.MODEL.ROI_BOX_HEAD.NORM = "GN_C16"  # what the message proposes works
    _build_rcnn_heads(cfg)


def test_heads_refuse_a_norm_with_nothing_to_normalize():
    cfg = shipped_cfg("synthetic/mask_rcnn_R18_FPN_GN.yaml", "GN")
    cfg.MODEL.ROI_BOX_HEAD.NUM_CONV = 0
    with pytest.raises(HeadNormError, match="NUM_CONV is 0.*4conv1fc"):
        _build_rcnn_heads(cfg)
    cfg.MODEL.ROI_BOX_HEAD.NORM = ""  # detectron2's 2fc head without norm is fine
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    _build_rcnn_heads(cfg)
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 0
    with pytest.raises(HeadNormError, match="D2NormsMaskHead.*NUM_CONV is 0"):
        _build_rcnn_heads(cfg)


def test_retinanet_head_needs_a_conv():
    cfg = shipped_cfg("COCO-scratch/retinanet_R_50_FPN_GN_2img.yaml", "GN", small_backbone=True)
    cfg.MODEL.RETINANET.NUM_CONVS = 0
    with pytest.raises(ValueError, match="NUM_CONVS must be at least 1"):
        build_model(cfg)


# ---------------------------------------------------------------------------------------------
# initialisation, the composer, third-party norms
# ---------------------------------------------------------------------------------------------
def test_retinanet_prior_and_init():
    cfg = shipped_cfg("COCO-scratch/retinanet_R_50_FPN_NF_2img.yaml", small_backbone=True)
    head = build_head(cfg, "retinanet")
    prior = cfg.MODEL.RETINANET.PRIOR_PROB
    assert torch.allclose(head.cls_score.bias, torch.full_like(head.cls_score.bias,
                                                               -math.log((1 - prior) / prior)))
    w = head.cls_subnet[0].weight
    assert abs(float(w.detach().std()) - 0.01) < 0.002  # detectron2's N(0, 0.01) init


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
        heads = [build_head(cfg, kind) for kind in ("rpn", "box", "mask")]
        heads.append(D2NormsRetinaNetHead(cfg, _feature_shapes(cfg.MODEL.RPN.IN_FEATURES, fpn)))
        for head in heads:
            for conv, after, _ in hidden_layers(head, name):
                assert isinstance(conv, L.WSConv2d)
                assert [type(m) for m in after] == [nn.GroupNorm, nn.SiLU]
            assert not any(isinstance(m, nn.ReLU) for n, m in head.named_modules()
                           if "relu" not in n)  # only detectron2's fc/deconv ReLUs remain
    finally:
        L.unregister_norm(name)
