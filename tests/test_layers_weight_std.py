"""WS and Scaled WS convs against formulas and timm; gains (NF App. D); folding."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import d2_norms  # noqa: F401
from d2_norms.layers import (RELU_GAIN, ScaledStdConv2d, WSConv2d, activation_gain,
                             fold_weight_standardization, get_norm)
from d2_norms.profiling import SavedTensorMeter

torch.set_num_threads(1)


def ws_formula(w, eps):
    """(W - mean) / sqrt(var + eps) per output channel over the fan-in (biased variance)."""
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    var = ((flat - mean) ** 2).mean(dim=1, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + eps)).reshape(w.shape)


def test_ws_conv_matches_formula_and_timm():
    torch.manual_seed(0)
    conv = WSConv2d(8, 16, 3, stride=2, eps=1e-5)
    x = torch.randn(2, 8, 11, 9)
    expected = F.conv2d(x, ws_formula(conv.weight, 1e-5), None, stride=2, padding=1)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    timm_layers = pytest.importorskip("timm.layers")
    ref = timm_layers.StdConv2d(8, 16, 3, stride=2, eps=1e-5)
    ref.load_state_dict(conv.state_dict())
    torch.testing.assert_close(conv(x), ref(x), rtol=1e-5, atol=1e-5)


def test_standardized_weights_have_zero_mean_unit_variance():
    conv = WSConv2d(4, 6, 3, groups=2)
    w = conv.standardized_weight().reshape(6, -1)
    torch.testing.assert_close(w.mean(1), torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(w.var(1, correction=0), torch.ones(6), atol=1e-3, rtol=0)


@pytest.mark.parametrize("gamma", [1.0, "relu", "silu"])
def test_scaled_ws_matches_formula_and_timm(gamma):
    torch.manual_seed(1)
    conv = ScaledStdConv2d(6, 10, 3, gamma=gamma, eps=1e-6)
    with torch.no_grad():
        conv.gain.uniform_(0.5, 1.5)
        conv.bias.normal_()
    x = torch.randn(2, 6, 8, 8)
    g = activation_gain(gamma) if isinstance(gamma, str) else gamma
    fan_in = 6 * 9
    w_hat = conv.gain * g * ws_formula(conv.weight, 1e-6) / math.sqrt(fan_in)  # NF eq. 3
    expected = F.conv2d(x, w_hat, conv.bias, padding=1)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    timm_layers = pytest.importorskip("timm.layers")
    ref = timm_layers.ScaledStdConv2d(6, 10, 3, gamma=g, eps=1e-6)
    ref.load_state_dict(conv.state_dict())
    torch.testing.assert_close(conv(x), ref(x), rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    """Gradients w.r.t. input, weight (through the standardization), gain and bias."""
    from torch.func import functional_call

    ws = WSConv2d(3, 4, 3).double()
    sws = ScaledStdConv2d(3, 4, 3, gamma="relu").double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = ws.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda inp, wt: functional_call(ws, {"weight": wt}, (inp,)),
                                    (x, w))
    params = {k: v.detach().clone().requires_grad_() for k, v in sws.named_parameters()}
    names = list(params)
    assert torch.autograd.gradcheck(
        lambda inp, *ps: functional_call(sws, dict(zip(names, ps)), (inp,)),
        (x,) + tuple(params.values()))


def test_relu_gain_analytic_and_numeric():
    assert RELU_GAIN == pytest.approx(math.sqrt(2 / (1 - 1 / math.pi)))
    assert activation_gain("relu") == RELU_GAIN
    # App. D procedure on the ReLU callable agrees with the analytic value
    assert activation_gain(torch.relu) == pytest.approx(RELU_GAIN, rel=1e-2)
    assert activation_gain("identity") == 1.0


@pytest.mark.parametrize("name,fn", [("silu", F.silu), ("gelu", F.gelu), ("tanh", torch.tanh),
                                      ("sigmoid", torch.sigmoid)])
def test_numeric_gains_match_gaussian_integral(name, fn):
    """Independent reference: Var(g(x)), x ~ N(0,1), by quadrature on a fine grid (float64)."""
    x = torch.linspace(-12, 12, 400001, dtype=torch.float64)
    pdf = torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    y = fn(x)
    mean = torch.trapezoid(y * pdf, x)
    var = torch.trapezoid((y - mean) ** 2 * pdf, x)
    # App. D averages per-vector variances of 256-d samples: E[var_biased] = var * 255/256
    expected = float((var * 255 / 256).rsqrt())
    assert activation_gain(name) == pytest.approx(expected, rel=1e-2)


def test_unknown_gain_name():
    with pytest.raises(ValueError, match="unknown nonlinearity"):
        activation_gain("swishy")


@pytest.mark.parametrize("cls,kwargs", [(WSConv2d, {}), (ScaledStdConv2d, {"gamma": "relu"})])
def test_fold_gives_plain_conv_with_same_output(cls, kwargs):
    torch.manual_seed(2)
    conv = cls(4, 8, 3, norm=get_norm("GN_G4", 8), **kwargs)
    model = nn.Sequential(conv, nn.ReLU())
    x = torch.randn(2, 4, 9, 9)
    expected = model(x)
    folded = fold_weight_standardization(model)
    assert folded is model
    assert not isinstance(model[0], (WSConv2d, ScaledStdConv2d))
    assert isinstance(model[0], nn.Conv2d) and model[0].norm is conv.norm
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.fold()(x), conv(x), rtol=1e-5, atol=1e-5)


def test_half_weights_standardized_in_float32():
    conv = ScaledStdConv2d(4, 4, 3, gamma="relu").to(torch.bfloat16)
    with torch.no_grad():
        conv.weight.mul_(1e3)
    w = conv.standardized_weight()
    assert w.dtype == torch.bfloat16 and torch.isfinite(w).all()
    out = conv(torch.randn(1, 4, 6, 6, dtype=torch.bfloat16) * 1e3)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_batch_of_one_and_1x1_maps():
    conv = ScaledStdConv2d(4, 4, 1, gamma=1.0)
    x = torch.randn(1, 4, 1, 1, requires_grad=True)
    conv(x).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("cls", [WSConv2d, ScaledStdConv2d])
@pytest.mark.parametrize("stride,groups,bias", [(1, 1, True), (2, 2, False)])
def test_fused_conv_matches_standardize_then_conv(cls, stride, groups, bias):
    """The fused op (standardized weight recomputed in backward) gives the gradients of
    standardize-then-conv, for input, weight, gain and bias (gradcheck in float64)."""
    torch.manual_seed(0)
    conv = cls(4, 6, 3, stride=stride, groups=groups, bias=bias).double()
    if cls is ScaledStdConv2d:
        conv.gamma = 1.7
        with torch.no_grad():
            conv.gain.uniform_(0.5, 1.5)
    if bias:
        with torch.no_grad():
            conv.bias.uniform_(-1, 1)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(conv, (x,))
    out = conv(x)
    assert out.grad_fn is not None and "WSConvFunction" in type(out.grad_fn).__name__
    params = [p for p in conv.parameters()]
    g = torch.randn_like(out)
    fused = torch.autograd.grad(out, [x] + params, g)
    ref_out = F.conv2d(x, conv.standardized_weight(), conv.bias, conv.stride, conv.padding,
                       conv.dilation, conv.groups)
    ref = torch.autograd.grad(ref_out, [x] + params, g)
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b)


def test_fused_conv_keeps_what_a_plain_conv_keeps():
    """Saved for backward: the input and the weight parameter (plus per-channel stats), never
    a standardized copy of the weight - the same storages as a plain conv, plus O(out)."""
    x = torch.randn(1, 64, 16, 16, requires_grad=True)
    plain = torch.nn.Conv2d(64, 128, 3, padding=1)
    with SavedTensorMeter() as m_plain:
        plain(x)
    for cls in (WSConv2d, ScaledStdConv2d):
        conv = cls(64, 128, 3)
        with SavedTensorMeter() as m:
            conv(x)
        small = [n for n in m.storages.values() if n <= 4 * 128 * 2]
        assert m.total - sum(small) == m_plain.total, cls


def test_nf_retinanet_head_keeps_no_weight_copies_per_level():
    """RetinaNet's head runs the same Scaled WS convs on every pyramid level: memory must not
    grow with a standardized weight copy per level (the activations are the same as BN's)."""
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from d2_norms.modeling.heads import D2NormsRetinaNetHead

    def saved_bytes(norm):
        cfg = get_cfg()
        cfg.MODEL.RETINANET.NORM = norm
        cfg.MODEL.RETINANET.NUM_CLASSES = 3
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128]]
        torch.manual_seed(0)
        head = D2NormsRetinaNetHead(cfg, [ShapeSpec(channels=64, stride=s) for s in (8, 16, 32)])
        feats = [torch.randn(1, 64, s, s, requires_grad=True) for s in (8, 4, 2)]
        with SavedTensorMeter() as m:
            logits, deltas = head(feats)
        sum(t.sum() for t in logits + deltas).backward()
        return head, m.total

    nf_head, nf = saved_bytes("NF")
    assert sum(isinstance(m, ScaledStdConv2d) for m in nf_head.modules()) == 8
    _, plain = saved_bytes("")
    params = sum(p.numel() * 4 for p in nf_head.parameters())
    # The head's standardized weights are kept once (shared by the levels); a copy per level
    # would add 3 x the conv weights here.
    _, bn = saved_bytes("BN")
    assert nf <= bn + params * 1.05, (nf, bn, plain, params)


def test_retinanet_head_standardizes_once_per_forward_with_same_results(monkeypatch):
    """The NF head's Scaled WS weights are standardized once per forward of the head (not once
    per pyramid level and again in backward), with the same outputs and gradients as per-level
    standardization, and the cache is gone after the forward."""
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from d2_norms.modeling.heads import D2NormsRetinaNetHead

    cfg = get_cfg()
    cfg.MODEL.RETINANET.NORM = "NF"
    cfg.MODEL.RETINANET.NUM_CLASSES = 3
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128]]
    torch.manual_seed(0)
    head = D2NormsRetinaNetHead(cfg, [ShapeSpec(channels=16, stride=s) for s in (8, 16, 32)]).double()
    assert getattr(head, "_d2n_shares_ws", False)
    convs = [m for m in head.modules() if isinstance(m, ScaledStdConv2d)]
    feats = [torch.randn(2, 16, s, s, dtype=torch.float64) for s in (8, 4, 2)]
    calls = []
    for c in convs:
        original = c.standardized_weight
        monkeypatch.setattr(c, "standardized_weight",
                            lambda original=original: calls.append(1) or original())

    def run():
        head.zero_grad()
        calls.clear()
        logits, deltas = head(feats)
        sum((t * t).sum() for t in logits + deltas).backward()
        return [t.detach() for t in logits + deltas], [p.grad.clone() for p in head.parameters()]

    shared_out, shared_grads = run()
    assert len(calls) == len(convs)  # once per conv, not once per conv and level
    assert all(c._ws_shared_weight is None and not c._ws_sharing for c in convs)
    with torch.no_grad():
        head(feats)
    assert all(c._ws_shared_weight is None for c in convs)

    head._forward_hooks.clear()  # per-call standardization (the fused op) for comparison
    head._forward_pre_hooks.clear()
    plain_out, plain_grads = run()
    assert len(calls) == 0  # the fused op standardizes inside, without this method
    for a, b in zip(shared_out + shared_grads, plain_out + plain_grads):
        torch.testing.assert_close(a, b)


def test_fused_conv_under_autocast_matches_unfused():
    """AMP (CPU autocast here, CUDA alike): the conv runs in the autocast dtype, gradients come
    back in the parameters' and input's dtypes, and agree with standardize-then-F.conv2d."""
    torch.manual_seed(0)
    conv = ScaledStdConv2d(8, 16, 3, gamma="relu")
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    results = []
    for fused in (True, False):
        conv.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                out = conv(x)
            else:
                out = F.conv2d(x, conv.standardized_weight(), conv.bias, 1, conv.padding)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        results.append([out.float(), x.grad.clone()] + [p.grad.clone() for p in conv.parameters()])
    assert x.grad.dtype == torch.float32 and conv.weight.grad.dtype == torch.float32
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
