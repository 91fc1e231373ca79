"""Optimizer parameter groups: zero weight decay on every normalizer parameter of every
registered normalizer (GN paper sec. 4.2), ordinary decay on conv/linear weights."""
import pytest
import torch
from torch import nn

from d2_norms.engine.defaults import setup_cfg
from d2_norms.layers import ScaledStdConv2d, get_norm, registered_norms
from d2_norms.solver import build_optimizer, get_optimizer_param_groups

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(*opts):
    class Args:
        config_file = os.path.join(REPO, "configs", "synthetic", "mask_rcnn_R18_FPN_GN.yaml")
    Args.opts = ["SOLVER.WEIGHT_DECAY", "0.0004", "SOLVER.WEIGHT_DECAY_NORM", "0.0", *opts]
    return setup_cfg(Args, log=False)


def _decay_by_name(cfg, model):
    return {g["name"]: g["weight_decay"] for g in get_optimizer_param_groups(cfg, model)}


NAMES = sorted(n for n in registered_norms() if n not in ("", "SyncBN"))


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_normalizer_gets_zero_decay(name):
    cfg = _cfg()
    norm = get_norm(name, 64)
    if norm is None or not list(norm.parameters()):
        pytest.skip(f"{name!r} has no parameters")
    model = nn.Sequential(nn.Conv2d(3, 64, 3), norm)
    decay = _decay_by_name(cfg, model)
    assert decay["0.weight"] == pytest.approx(4e-4)
    for pname, _ in norm.named_parameters():
        assert decay[f"1.{pname}"] == 0.0, (name, pname)


def test_scaled_ws_gain_and_third_party_flags():
    cfg = _cfg()

    class MyNorm(nn.Module):
        d2n_is_normalizer = True

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(8))

    class Mixed(nn.Module):
        d2n_norm_params = ("alpha",)

        def __init__(self):
            super().__init__()
            self.alpha = nn.Parameter(torch.zeros(()))
            self.weight = nn.Parameter(torch.zeros(8, 8))

    model = nn.Sequential(ScaledStdConv2d(3, 8, 3), MyNorm(), Mixed())
    decay = _decay_by_name(cfg, model)
    assert decay["0.gain"] == 0.0 and decay["0.weight"] == pytest.approx(4e-4)
    assert decay["1.scale"] == 0.0
    assert decay["2.alpha"] == 0.0 and decay["2.weight"] == pytest.approx(4e-4)


@pytest.mark.parametrize("norm", ["GN", "FRN", "NF", "GNWS", "BN"])
def test_built_models_have_no_decay_on_any_norm_parameter(norm):
    from detectron2.modeling import build_model

    fields = ["MODEL.RESNETS.NORM", norm]
    rest = "" if norm == "NF" else norm
    fields += ["MODEL.FPN.NORM", rest, "MODEL.ROI_BOX_HEAD.NORM", rest,
               "MODEL.ROI_MASK_HEAD.NORM", rest, "MODEL.DEVICE", "cpu"]
    cfg = _cfg(*fields)
    model = build_model(cfg)
    decay = _decay_by_name(cfg, model)
    zero = {n for n, d in decay.items() if d == 0.0}
    # Independent check by parameter naming: every 1-D parameter of a norm/affine/TLU/gain is
    # a normalizer parameter; conv and fc weights are not.
    assert all(p.requires_grad for p in model.parameters())  # FREEZE_AT 0 from scratch
    norm_like = {n for n, p in model.named_parameters()
                 if any(k in n for k in (".norm.", "tau", "eps_l", ".gain", "skip_gain"))}
    assert norm_like and norm_like <= zero, sorted(norm_like - zero)[:5]
    weights = {n for n, p in model.named_parameters() if p.dim() == 4 and n.endswith("weight")}
    assert weights and not (weights & zero)
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == cfg.SOLVER.MOMENTUM


def _nf_model(detector="mask_rcnn"):
    from detectron2.modeling import build_model

    fields = ["MODEL.RESNETS.NORM", "NF", "MODEL.FPN.NORM", "NF", "MODEL.ROI_BOX_HEAD.NORM", "NF",
              "MODEL.ROI_MASK_HEAD.NORM", "NF", "MODEL.DEVICE", "cpu"]
    cfg = _cfg(*fields)
    return cfg, build_model(cfg)


def test_nf_scaled_ws_biases_and_gains_get_no_weight_decay():
    """NF paper App. B.1: Scaled WS affine gains and biases are not weight-decayed. Counted per
    group against an independent walk of the model: every Scaled WS conv contributes its gain
    and bias, every NF block its SkipInit scalar, and nothing else is exempt."""
    from d2_norms.modeling.nf_resnet import _NFBlockBase

    cfg, model = _nf_model()
    decay = _decay_by_name(cfg, model)
    expected_zero = set()
    for mname, module in model.named_modules():
        if isinstance(module, ScaledStdConv2d):
            expected_zero |= {f"{mname}.gain", f"{mname}.bias"}
            assert module.bias is not None
        if isinstance(module, _NFBlockBase):
            expected_zero.add(f"{mname}.skip_gain")
    zero = {n for n, d in decay.items() if d == 0.0}
    assert zero == expected_zero
    # 69 Scaled WS biases in NF-R18 + FPN + heads used to get decay (issue 13 item 1).
    n_ws_biases = sum(1 for n in zero if n.endswith(".bias"))
    assert n_ws_biases == sum(isinstance(m, ScaledStdConv2d) for m in model.modules()) > 20
    rest = set(decay) - zero
    assert rest and all(decay[n] == pytest.approx(4e-4) for n in rest)
    # The ordinary biases (plain convs / linears: the predictors) keep detectron2's rule.
    assert any(n.endswith(".bias") for n in rest)
