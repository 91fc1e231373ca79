"""Adaptive Gradient Clipping (Brock et al. 2021 sec. 4.1): the unit-wise formula against a
direct per-row computation, the excluded prediction layers, the optimizer built from the config,
and clipping on the averaged gradient under DDP (gloo)."""
import os

import pytest
import torch
from torch import nn

import d2_norms  # noqa: F401
from d2_norms.engine.defaults import setup_cfg
from d2_norms.solver import (adaptive_clip_grad_, agc_excluded_parameter_names, build_optimizer,
                             with_adaptive_gradient_clipping)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_agc(w, g, lam, eps=1e-3, unit_dim=0):
    """The paper's rule written out row by row (unit i = index along unit_dim); a vector or
    scalar is one unit (the reference code's and timm's unitwise_norm)."""
    w, g = w.double(), g.double()
    if w.squeeze().dim() <= 1:  # the reference code's test
        bound = lam * max(float(w.pow(2).sum().sqrt()), eps)
        gn = float(g.pow(2).sum().sqrt())
        return g * (bound / gn) if gn > bound else g.clone()
    wt, gt = w.movedim(unit_dim, 0), g.movedim(unit_dim, 0).clone()
    for i in range(wt.shape[0]):
        bound = lam * max(float(wt[i].pow(2).sum().sqrt()), eps)
        gn = float(gt[i].pow(2).sum().sqrt())
        if gn > bound:
            gt[i] = gt[i] * (bound / gn)
    return gt.movedim(0, unit_dim)


@pytest.mark.parametrize("shape,unit_dim", [((16, 8, 3, 3), 0), ((10, 7), 0), ((12,), 0), ((), 0),
                                            ((8, 4, 2, 2), 1), ((12, 1, 1, 1), 0)])
def test_unitwise_clipping_matches_row_by_row_reference(shape, unit_dim):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen)
    if w.dim() >= 1:
        w.view(-1)[:3] = 0.0  # zero weights: the eps floor matters
        if w.dim() > 1:
            w.select(unit_dim, 0).zero_()  # a whole zero unit: bound = lambda * eps
    if w.dim() <= 1:
        g = torch.randn(shape, generator=gen)  # one unit: clipped as a whole
        if w.dim() == 1:
            small = w.clone()
            p = nn.Parameter(small)
            p.grad = small * 1e-3  # inside the bound: untouched
            adaptive_clip_grad_(p, 0.05)
            assert torch.equal(p.grad, small * 1e-3)
    else:
        # units alternate tiny (kept) and large (clipped) gradients
        n = w.shape[unit_dim] if w.dim() > 1 else w.numel()
        per_unit = torch.tensor([1e-4 if i % 2 else 10.0 for i in range(n)])
        view = [1] * w.dim()
        view[unit_dim if w.dim() > 1 else 0] = n
        g = torch.randn(shape, generator=gen) * per_unit.reshape(view)
    p = nn.Parameter(w.clone())
    p.grad = g.clone()
    adaptive_clip_grad_(p, 0.05, unit_dim=unit_dim)
    ref = reference_agc(w, g, 0.05, unit_dim=unit_dim)
    torch.testing.assert_close(p.grad.double(), ref, rtol=1e-5, atol=1e-12)
    # Some units were clipped and some were not (both branches exercised).
    if w.squeeze().dim() > 1:
        assert not torch.equal(p.grad, g) and torch.isclose(p.grad, g).any()
    elif w.dim() >= 1:  # a vector (or (C, 1, 1, 1) gain) scaled by one factor, to the bound
        scale = (p.grad / g).reshape(-1)
        torch.testing.assert_close(scale, scale[:1].expand_as(scale))
        torch.testing.assert_close(p.grad.norm(), 0.05 * w.norm())
    torch.testing.assert_close(p.detach(), w)  # the weight itself is untouched


@pytest.mark.parametrize("kind", ["conv", "linear", "bias", "gain", "scalar"])
@pytest.mark.parametrize("scale", [1e3, 1e-7])
def test_matches_timm_adaptive_clip_grad(kind, scale):
    """timm's ``adaptive_clip_grad`` (an independent implementation of the NFNet reference
    code's unitwise norm: output rows of conv / linear weights, the whole tensor for vectors and
    scalars) clips every kind of parameter as d2_norms does."""
    timm_agc = pytest.importorskip("timm.utils.agc")
    from d2_norms.solver.agc import unitwise_norm

    gen = torch.Generator().manual_seed({"conv": 0, "linear": 1, "bias": 2, "gain": 3,
                                         "scalar": 4}[kind])
    shape = {"conv": (16, 8, 3, 3), "linear": (10, 7), "bias": (16,), "gain": (16,),
             "scalar": ()}[kind]
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "gain":
        w = 1 + 0.1 * w  # near 1, as Scaled WS gains
    if kind == "bias":
        w = w * 1e-4  # near 0: the eps floor
    g = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if w.dim() > 1:
        g[::2] *= 1e-6  # alternate rows within their bound
    ours, theirs = nn.Parameter(w.clone()), nn.Parameter(w.clone())
    ours.grad, theirs.grad = g.clone(), g.clone()
    adaptive_clip_grad_(ours, 0.02)
    timm_agc.adaptive_clip_grad([theirs], clip_factor=0.02, eps=1e-3)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(unitwise_norm(w).squeeze(), timm_agc.unitwise_norm(w).squeeze())
    if kind == "gain":
        # the Scaled WS gain as d2_norms (and timm's ScaledStdConv2d) store it, (C, 1, 1, 1): one
        # unit as in the NFNet reference code (a (C,) vector there), so = timm on the vector
        # (timm's adaptive_clip_grad would clip a 4-D gain per channel)
        gain = nn.Parameter(w.clone().reshape(-1, 1, 1, 1))
        gain.grad = g.clone().reshape(-1, 1, 1, 1)
        adaptive_clip_grad_(gain, 0.02)
        torch.testing.assert_close(gain.grad.reshape(-1), theirs.grad, rtol=1e-12, atol=0)
    assert (not torch.equal(ours.grad, g)) == (scale > 1)  # the large gradients were clipped


def _cfg(*opts, config="mask_rcnn_R18_FPN_GN.yaml"):
    class Args:
        config_file = os.path.join(REPO, "configs", "synthetic", config)
    Args.opts = ["MODEL.DEVICE", "cpu", *opts]
    return setup_cfg(Args, log=False)


AGC_OPTS = ["SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "agc",
            "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.01"]


@pytest.mark.parametrize("meta", ["GeneralizedRCNN", "RetinaNet"])
def test_optimizer_clips_all_but_prediction_layers(meta):
    from detectron2.modeling import build_model

    opts = ["MODEL.RESNETS.NORM", "NF", "MODEL.FPN.NORM", "NF", *AGC_OPTS]
    if meta == "RetinaNet":
        opts += ["MODEL.META_ARCHITECTURE", "D2NormsRetinaNet", "MODEL.RETINANET.NORM", "NF",
                 "MODEL.RETINANET.NUM_CLASSES", "3", "MODEL.MASK_ON", "False",
                 "MODEL.BACKBONE.NAME", "build_d2n_retinanet_resnet_fpn_backbone",
                 "MODEL.ANCHOR_GENERATOR.SIZES", "[[8], [16], [32], [64], [128]]"]
    else:
        opts += ["MODEL.ROI_BOX_HEAD.NORM", "NF", "MODEL.ROI_MASK_HEAD.NORM", "NF"]
    cfg = _cfg(*opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    excluded = set(agc_excluded_parameter_names(model))
    # Independent list, by where detectron2 puts its prediction layers.
    if meta == "RetinaNet":
        want = {f"head.{m}.{p}" for m in ("cls_score", "bbox_pred") for p in ("weight", "bias")}
    else:
        want = {f"roi_heads.box_predictor.{m}.{p}" for m in ("cls_score", "bbox_pred")
                for p in ("weight", "bias")}
        want |= {f"proposal_generator.rpn_head.{m}.{p}"
                 for m in ("objectness_logits", "anchor_deltas") for p in ("weight", "bias")}
        want |= {f"roi_heads.mask_head.predictor.{p}" for p in ("weight", "bias")}
    # SkipInit scalars (0 at init; see d2_norms.solver.agc) are not clipped either.
    want |= {n for n, _ in model.named_parameters() if n.endswith("skip_gain")}
    assert excluded == want
    opt = build_optimizer(cfg, model)
    assert type(opt).__name__ == "SGDWithAGC" and isinstance(opt, torch.optim.SGD)
    params = dict(model.named_parameters())
    # Huge gradients everywhere: every clipped unit ends at lambda * max(||W_i||, eps); the
    # excluded layers keep theirs exactly.
    grads = {}
    for name, p in params.items():
        p.grad = torch.randn_like(p) * 1e3
        grads[name] = p.grad.clone()
    before = {n: p.detach().clone() for n, p in params.items()}
    for g in opt.param_groups:
        g["lr"], g["momentum"], g["weight_decay"] = 1.0, 0.0, 0.0
    opt.step()
    unit = {n: g.get("agc_unit_dim", 0) for g in opt.param_groups for n in [g["name"]]}
    for name, p in params.items():
        step = before[name] - p.detach()  # = the (clipped) gradient, lr 1
        if name in excluded:
            torch.testing.assert_close(step, grads[name], rtol=1e-5, atol=1e-3)
        else:
            ref = reference_agc(before[name], grads[name], 0.01, unit_dim=unit[name]).float()
            torch.testing.assert_close(step, ref, rtol=1e-4, atol=1e-7)
    if meta == "GeneralizedRCNN":
        # the mask head's deconv weight (in, out, k, k): units are output channels (dim 1)
        assert unit["roi_heads.mask_head.deconv.weight"] == 1


def test_bad_lambda_and_stock_clip_types_still_work():
    from detectron2.modeling import build_model

    cfg = _cfg(*AGC_OPTS[:-1], "0.0")
    model = build_model(cfg)
    with pytest.raises(ValueError, match="CLIP_VALUE must be > 0"):
        build_optimizer(cfg, model)
    cfg = _cfg("SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm")
    opt = build_optimizer(cfg, model)
    assert "WithGradientClip" in type(opt).__name__  # detectron2's own clipping
    assert not any("agc" in g for g in opt.param_groups)


def test_lazy_config_style_use():
    """Without yacs: wrap any optimizer class; groups from agc_param_groups mark exclusions."""
    from d2_norms.solver import agc_param_groups

    class Head(nn.Module):
        d2n_agc_exclude = True

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

    model = nn.Sequential(nn.Linear(3, 4), Head())
    groups = agc_param_groups(model)
    assert [g.get("agc", True) for g in groups] == [True, True, False, False]
    opt = with_adaptive_gradient_clipping(torch.optim.SGD, 0.01)(groups, lr=1.0)
    for p in model.parameters():
        p.grad = torch.full_like(p, 100.0)
    w0 = model[0].weight.detach().clone()
    h0 = model[1].fc.weight.detach().clone()
    opt.step()
    torch.testing.assert_close(h0 - model[1].fc.weight.detach(), torch.full_like(h0, 100.0))
    row_steps = (w0 - model[0].weight.detach()).norm(dim=1)
    torch.testing.assert_close(row_steps, 0.01 * w0.norm(dim=1).clamp(min=1e-3))


def _ddp_worker(rank, world, port, lam, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    model = nn.Linear(6, 5)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = with_adaptive_gradient_clipping(torch.optim.SGD, lam)(
        [{"params": list(model.parameters())}], lr=1.0)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(rank)) * (1 + 9 * rank)
    ddp(x).pow(2).sum().backward()
    opt.step()
    out[rank] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dist.destroy_process_group()


def test_ddp_clips_the_averaged_gradient():
    """Two gloo processes with different data: both end with identical weights, equal to a
    single-process step with AGC applied to the mean of the two gradients."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_ddp_worker, args=(2, port, 0.02, out), nprocs=2, join=True)
    torch.manual_seed(0)
    model = nn.Linear(6, 5)
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = []
    for rank in range(2):
        model.zero_grad()
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(rank)) * (1 + 9 * rank)
        model(x).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in ("weight", "bias"):
        mean = (grads[0][name] + grads[1][name]) / 2
        want = w0[name] - reference_agc(w0[name], mean, 0.02).float()
        torch.testing.assert_close(out[0][name], out[1][name], rtol=0, atol=0)
        torch.testing.assert_close(out[0][name], want, rtol=1e-5, atol=1e-6)


def test_lazyconfig_optimizer_node_carries_agc_like_the_yacs_recipe():
    """``L(SGDWithAGC)(params=L(d2_norms_optimizer_params)(..., agc=True), clipping=...)``: the
    optimizer node itself clips (any trainer that instantiates it, detectron2's included), with
    the same groups, exclusions and steps as the yacs recipe's optimizer."""
    from detectron2.config import LazyCall as L
    from detectron2.config import instantiate
    from detectron2.modeling import build_model

    from d2_norms.solver import SGDWithAGC, d2_norms_optimizer_params

    cfg = _cfg("MODEL.RESNETS.NORM", "NF", "MODEL.FPN.NORM", "NF", "MODEL.ROI_BOX_HEAD.NORM",
               "NF", "MODEL.ROI_MASK_HEAD.NORM", "NF", *AGC_OPTS)
    torch.manual_seed(0)
    model = build_model(cfg)
    twin = build_model(cfg)
    twin.load_state_dict(model.state_dict())
    node = L(SGDWithAGC)(
        params=L(d2_norms_optimizer_params)(weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
                                            base_lr=cfg.SOLVER.BASE_LR,
                                            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
                                            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
                                            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
                                            agc=True),
        lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV,
        clipping=cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE)
    node.params.model = model
    lazy_opt, yacs_opt = instantiate(node), build_optimizer(cfg, twin)
    strip = lambda groups: [{k: v for k, v in g.items() if k != "params"} for g in groups]  # noqa: E731
    assert strip(lazy_opt.param_groups) == strip(yacs_opt.param_groups)
    for (_, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        p.grad = torch.randn_like(p) * 1e3
        q.grad = p.grad.clone()
    lazy_opt.step()
    yacs_opt.step()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="must be > 0"):
        SGDWithAGC(model.parameters(), lr=0.1, clipping=0)
