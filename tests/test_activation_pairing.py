"""Activation pairing, walked through the forward pass of whole detectors (issue 11, "Tests").

RetinaNet and Mask R-CNN (R18-FPN, FPN width 64, two 96 px images, CPU) with one norm in every
norm key (MODEL.RESNETS / FPN / RPN / RETINANET / ROI_BOX_HEAD / ROI_MASK_HEAD.NORM), for BN,
SyncBN, GN, GNWS, FRN, FRN_LEPS and NF. One training-mode forward (losses included) runs under
a ``TorchDispatchMode`` that sees every aten op; forward pre/post hooks on every module give the
module running each op (the innermost one), and every op output is recorded with that module
and op (views keep the producer of their base), so each op's inputs can be traced to the op
and module that produced them. Asserted:

* no ReLU-family op (relu, threshold, clamp_min, hardtanh) reads an FRN or TLU output anywhere
  in the model (nor runs inside FRN / TLU);
* FRN, FRN_LEPS: the backbone (bottom-up ResNet, FPN, P6/P7) runs no ReLU-family op at all;
  RetinaNet runs none anywhere; Mask R-CNN only in detectron2's box-head fc ReLU and mask-head
  deconv ReLU, which follow a Linear / ConvTranspose, not a norm;
* GNWS: every GroupNorm (backbone, FPN, heads) reads the output of a convolution run by a
  WSConv2d;
* NF: every convolution in the backbone, FPN and the heads' hidden layers is run by a
  ScaledStdConv2d, except the prediction layers (``NF_PLAIN_CONVS``); in the FPN and heads, a
  Scaled WS conv reading a ReLU output has ReLU's gain, any other input gamma 1;
* the walk saw what it checks (convolutions, norms, the expected ReLUs).

Module structure alone is tested in test_modeling_backbones.py / test_modeling_heads.py; this
file checks what actually runs.
"""
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import d2_norms  # noqa: F401  (shims)
import d2_norms.layers as L
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from test_modeling_backbones import batched_inputs, detector_cfg

NORMS = ["BN", "SyncBN", "GN", "GNWS", "FRN", "FRN_LEPS", "NF"]
DETECTORS = ["retinanet", "mask_rcnn"]
RELU_OPS = {"relu", "relu_", "threshold", "threshold_", "hardtanh", "hardtanh_", "clamp_min",
            "clamp_min_"}
RELU_GAIN = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))  # NF sec. 4.3, written out
# The layers that may stay plain convs under NF: the prediction layers, which NF-ResNets keep
# unstandardized too (NF sec. 4: Scaled WS for the hidden convs; a classifier/regressor output
# layer reads no normalized signal it must preserve). detectron2 initialises them for the
# detection losses: RetinaNet's cls_score with the prior bias, bbox_pred, RPN objectness and
# deltas with N(0, 0.01), the mask predictor with N(0, 0.001); standardizing them would undo
# that. The mask head's deconv is its upsampling output layer (ReLU, then the predictor; no norm
# in detectron2's head either). The box predictor (cls_score / bbox_pred) is Linear: it runs no
# convolution, listed for completeness.
NF_PLAIN_CONVS = {
    "retinanet": {"head.cls_score", "head.bbox_pred"},
    "mask_rcnn": {"proposal_generator.rpn_head.objectness_logits",
                  "proposal_generator.rpn_head.anchor_deltas",
                  "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred",
                  "roi_heads.mask_head.deconv", "roi_heads.mask_head.predictor"},
}
# Mask R-CNN's ReLUs after no norm (detectron2's layout): fc -> ReLU, deconv -> ReLU.
FC_DECONV_RELUS = {"roi_heads.box_head.fc_relu1", "roi_heads.mask_head.deconv_relu"}


pytestmark = pytest.mark.usefixtures("eager_frn_one_thread")


class ForwardWalk(TorchDispatchMode):
    """Every aten op of a forward, with the module running it and its inputs' producers.

    ``events``: one dict per op: ``op`` (name), ``module`` (innermost module's name, "" for the
    model itself), ``mod`` (the module), ``stack`` (names of the modules it runs inside),
    ``inputs`` (for each tensor argument, the producer event or None: a tensor made outside the
    walk, e.g. the images or a parameter).
    """

    def __init__(self, model):
        super().__init__()
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack = []  # [(name, module)]
        self.producer = {}  # storage data_ptr -> event
        self.keep = []  # every output stays alive: no storage address is reused in the walk
        self.events = []
        self.handles = []
        for m in model.modules():
            self.handles.append(m.register_forward_pre_hook(self._push))
            self.handles.append(m.register_forward_hook(self._pop, always_call=True))

    def _push(self, mod, args):
        self.stack.append((self.names[id(mod)], mod))

    def _pop(self, mod, args, out):
        assert self.stack and self.stack[-1][1] is mod
        self.stack.pop()

    def remove(self):
        for h in self.handles:
            h.remove()

    @staticmethod
    def _tensors(x):
        if torch.is_tensor(x):
            return [x]
        if isinstance(x, (list, tuple)):
            return [t for v in x for t in ForwardWalk._tensors(v)]
        if isinstance(x, dict):
            return [t for v in x.values() for t in ForwardWalk._tensors(v)]
        return []

    @staticmethod
    def _key(t):
        if t.numel() == 0 or t.device.type == "meta":
            return None
        return t.untyped_storage().data_ptr()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = self._tensors(args) + self._tensors(kwargs)
        in_keys = {self._key(t) for t in inputs}
        name, mod = self.stack[-1] if self.stack else ("", None)
        event = {"op": func.overloadpacket.__name__, "module": name, "mod": mod,
                 "stack": [n for n, _ in self.stack],
                 "inputs": [self.producer.get(self._key(t)) for t in inputs]}
        self.events.append(event)
        out = func(*args, **kwargs)
        is_inplace = event["op"].endswith("_") or "out" in kwargs
        for t in self._tensors(out):
            key = self._key(t)
            if key is None:
                continue
            if key in in_keys and not is_inplace:
                continue  # a view / alias of an input: the base's producer stays
            self.producer[key] = event
            self.keep.append(t)
        return out


def walk_training_forward(model):
    model.train()
    walk = ForwardWalk(model)
    try:
        with EventStorage(0), walk:
            losses = model(batched_inputs())
    finally:
        walk.remove()
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    return walk.events


def all_norm_cfg(tmp_path, detector, norm):
    # test_modeling_backbones' cfg gives NF models unnormalized FPN and heads and leaves the
    # RPN's norm at "": here every norm key names the norm.
    cfg = detector_cfg(tmp_path, detector, norm, 18, fpn_norm=norm, head_norm=norm)
    cfg.MODEL.RPN.NORM = norm
    return cfg


_EVENTS = {}


def events_of(tmp_path, detector, norm):
    """(model, the events of one training forward), built once per (detector, norm)."""
    key = (detector, norm)
    if key not in _EVENTS:
        torch.manual_seed(0)
        model = build_model(all_norm_cfg(tmp_path, detector, norm))
        _EVENTS[key] = (model, walk_training_forward(model))
    return _EVENTS[key]


def _in_backbone(event):
    return "backbone" in event["stack"]


def _is_frn_or_tlu(mod):
    return isinstance(mod, (L.FilterResponseNorm2d, L.TLU))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("detector", DETECTORS)
def test_activation_pairing_in_the_forward_pass(tmp_path, detector, norm):
    model, events = events_of(tmp_path, detector, norm)
    ops = {e["op"] for e in events}
    assert "convolution" in ops  # the walk sees the real ops
    relus = [e for e in events if e["op"] in RELU_OPS]

    # Nowhere does a ReLU read an FRN or TLU output, nor run inside FRN / TLU.
    bad = [(e["module"], e["op"], p["module"]) for e in relus for p in e["inputs"]
           if p is not None and _is_frn_or_tlu(p["mod"])]
    assert not bad, f"ReLU after FRN/TLU (module, op, producer): {bad}"
    assert not [e["module"] for e in relus if _is_frn_or_tlu(e["mod"])]

    frn_modules = [m for m in model.modules() if isinstance(m, L.FilterResponseNorm2d)]
    if norm in ("FRN", "FRN_LEPS"):
        assert frn_modules and all(m.learned_eps == (norm == "FRN_LEPS") for m in frn_modules)
        ran_in = {e["module"] for e in events if _is_frn_or_tlu(e["mod"])}
        assert any(n.startswith("backbone.bottom_up") for n in ran_in)
        assert any(n.startswith("backbone.fpn_") for n in ran_in)
        assert any(not n.startswith("backbone") for n in ran_in)  # the heads' FRN + TLU
        backbone_relus = [(e["module"], e["op"]) for e in relus if _in_backbone(e)]
        assert not backbone_relus, backbone_relus
        if detector == "retinanet":
            assert not relus, [(e["module"], e["op"]) for e in relus]
        else:
            assert {e["module"] for e in relus} == FC_DECONV_RELUS
    else:
        assert not frn_modules
        # Every other norm pairs with ReLU: the backbone and every head run some.
        assert any(_in_backbone(e) for e in relus)
        head_prefixes = (("head.",) if detector == "retinanet" else
                         ("proposal_generator.", "roi_heads.box_head.conv",
                          "roi_heads.mask_head.mask_fcn"))
        for prefix in head_prefixes:
            assert any(e["module"].startswith(prefix) for e in relus), prefix
    if norm not in ("GNWS", "NF"):  # walked again below
        _EVENTS.pop((detector, norm))


@pytest.mark.parametrize("detector", DETECTORS)
def test_gnws_every_group_norm_reads_a_ws_conv(tmp_path, detector):
    model, events = events_of(tmp_path, detector, "GNWS")
    # (a WS conv standardizes its weight with native_group_norm itself: not a GroupNorm layer)
    gns = [e for e in events if e["op"] in ("native_group_norm", "group_norm")
           and type(e["mod"]) is not L.WSConv2d]
    n_modules = sum(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert n_modules and len(gns) >= n_modules  # every GN ran (RetinaNet's: once per level)
    where = {e["module"].split(".")[0] for e in gns}
    assert {"backbone"} < where  # the backbone (bottom-up and FPN) and the heads
    assert any(e["module"].startswith("backbone.fpn_") for e in gns)
    for e in gns:
        producer = e["inputs"][0]
        assert producer is not None and producer["op"] == "convolution", e["module"]
        assert type(producer["mod"]) is L.WSConv2d, (e["module"], producer["module"])


@pytest.mark.parametrize("detector", DETECTORS)
def test_nf_scaled_ws_convs_everywhere_but_the_prediction_layers(tmp_path, detector):
    model, events = events_of(tmp_path, detector, "NF")
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, L.FilterResponseNorm2d)
    assert not [n for n, m in model.named_modules() if isinstance(m, norms)]
    convs = [e for e in events if e["op"] == "convolution"]
    plain = {e["module"] for e in convs if type(e["mod"]) is not L.ScaledStdConv2d}
    # What ran plain is exactly the prediction layers that run a convolution.
    expected = NF_PLAIN_CONVS[detector] - {"roi_heads.box_predictor.cls_score",
                                          "roi_heads.box_predictor.bbox_pred"}
    assert plain == expected, (f"plain convs beyond the prediction layers: {plain - expected}; "
                               f"prediction layers that did not run plain: {expected - plain}")
    scaled = [e for e in convs if type(e["mod"]) is L.ScaledStdConv2d]
    assert any(e["module"].startswith("backbone.bottom_up") for e in scaled)
    assert any(e["module"].startswith("backbone.fpn_") for e in scaled)
    assert any(not e["module"].startswith("backbone") for e in scaled)
    # FPN and heads: gamma is the gain of the nonlinearity that produced the conv's input
    # (the NF-ResNet's own placement of gains is tested in test_modeling_nf_resnet.py).
    checked = 0
    for e in scaled:
        if e["module"].startswith("backbone.bottom_up"):
            continue
        producer = e["inputs"][0]
        after_relu = producer is not None and producer["op"] in RELU_OPS
        assert e["mod"].gamma == pytest.approx(RELU_GAIN if after_relu else 1.0), e["module"]
        checked += after_relu
    assert checked  # hidden head convs after the first read ReLU outputs
