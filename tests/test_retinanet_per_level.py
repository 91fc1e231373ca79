"""RetinaNet head norms per pyramid level (issue 13 item 7, ``MODEL.RETINANET.NORM_PER_LEVEL``).

With the key, every subnet layer's norm is one whole module per level (statistics and affine;
convs shared), as Google's TPU RetinaNet (``class-{i}-bn-{level}``); without it the layout and
parameter names are detectron2's. Checked for BN, GN, GNWS, FRN (fused FRN + TLU) and FRN_LEPS:
the modules and their independence, each level's output against a written-out reference (a
default head holding the same convs and level l's norm), checkpoint names, gradients, a training
step of a small RetinaNet, tracing and scripting.
"""
import io
import os
import re

import pytest
import torch
from torch import nn

import d2_norms  # noqa: F401  (registers the components)
from d2_norms import export as X
from d2_norms.config import add_d2_norms_config
from d2_norms.modeling.heads import D2NormsRetinaNetHead, PerLevelNorm, PerLevelSubnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORMS = ("BN", "GN", "GNWS", "FRN", "FRN_LEPS")
CHANNELS = 64
NUM_CONVS = 2
SIZES = (16, 8, 4, 2, 1)  # P3-P7 of a 128 px image
LEVELS = len(SIZES)
NORM_SLOTS = [3 * i + 1 for i in range(NUM_CONVS)]
# The state-dict entries of one norm, as detectron2 / d2_norms name them.
LEAVES = {
    "BN": ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"],
    "GN": ["weight", "bias"],
    "GNWS": ["weight", "bias"],
    "FRN": ["weight", "bias", "tau"],
    "FRN_LEPS": ["weight", "bias", "tau", "eps_l"],
}


pytestmark = pytest.mark.usefixtures("eager_frn_one_thread")  # conftest


def make_head(norm, per_level, seed=0):
    from detectron2.layers import ShapeSpec

    torch.manual_seed(seed)
    shapes = [ShapeSpec(channels=CHANNELS, stride=2 ** (3 + i)) for i in range(LEVELS)]
    return D2NormsRetinaNetHead(input_shape=shapes, num_classes=3, num_anchors=2,
                                conv_dims=[CHANNELS] * NUM_CONVS, norm=norm,
                                norm_per_level=per_level)


def randomize(head, seed=1):
    """Every parameter and BN statistic moved off its initial value, differently per module."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(head.named_parameters()) + list(head.named_buffers()):
            if not torch.is_floating_point(t):
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif t.dim() > 1:
                t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
            else:
                t.add_(0.3 * torch.randn(t.shape, generator=g))
    return head


def features(seed=2, batch=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, CHANNELS, s, s, generator=g) for s in SIZES]


def subnets(head):
    return {"cls_subnet": head.cls_subnet, "bbox_subnet": head.bbox_subnet}


def default_names(norm):
    names = []
    for subnet in ("cls_subnet", "bbox_subnet"):
        for i in range(NUM_CONVS):
            names += [f"{subnet}.{3 * i}.weight", f"{subnet}.{3 * i}.bias"]
            slot = f"{subnet}.{3 * i + 1}"
            if norm == "BN":  # CycleBatchNormList: shared affine, per-level statistics
                names += [f"{slot}.weight", f"{slot}.bias"]
                names += [f"{slot}.{l}.{leaf}" for l in range(LEVELS) for leaf in LEAVES[norm][2:]]
            else:
                names += [f"{slot}.{leaf}" for leaf in LEAVES[norm]]
    return names + ["cls_score.weight", "cls_score.bias", "bbox_pred.weight", "bbox_pred.bias"]


def per_level_names(norm):
    names = []
    for subnet in ("cls_subnet", "bbox_subnet"):
        for i in range(NUM_CONVS):
            names += [f"{subnet}.{3 * i}.weight", f"{subnet}.{3 * i}.bias"]
            names += [f"{subnet}.{3 * i + 1}.{l}.{leaf}"
                      for l in range(LEVELS) for leaf in LEAVES[norm]]
    return names + ["cls_score.weight", "cls_score.bias", "bbox_pred.weight", "bbox_pred.bias"]


def default_head_with_level_norms(per, norm, level):
    """A default (shared-norm) head holding ``per``'s convs / predictors and, in every norm
    slot, ``per``'s norm of ``level``: what level ``level`` of ``per`` must compute."""
    ref = make_head(norm, per_level=False, seed=5)
    per_state = per.state_dict()
    state = {}
    for name in ref.state_dict():
        m = re.match(r"^((?:cls|bbox)_subnet\.(\d+))\.(.+)$", name)
        if m and int(m.group(2)) in NORM_SLOTS:
            # CycleBatchNormList keeps statistic j under "{slot}.{j}.": all get level's.
            leaf = re.sub(r"^\d+\.", "", m.group(3))
            state[name] = per_state[f"{m.group(1)}.{level}.{leaf}"]
        else:
            state[name] = per_state[name]
    ref.load_state_dict(state)
    return ref


# ------------------------------------------------------------------------------ structure
@pytest.mark.parametrize("norm", NORMS)
def test_per_level_head_has_one_independent_norm_per_level_and_layer(norm):
    default, per = make_head(norm, False), make_head(norm, True)
    assert type(default.cls_subnet) is nn.Sequential
    assert isinstance(per.cls_subnet, PerLevelSubnet)
    assert list(per.state_dict()) == per_level_names(norm)
    for name, subnet in subnets(per).items():
        for k, layer in enumerate(subnet):
            if k not in NORM_SLOTS:
                assert not isinstance(layer, PerLevelNorm), (name, k)
                continue
            assert isinstance(layer, PerLevelNorm) and len(layer) == LEVELS, (name, k)
            shared = default.cls_subnet[k]
            want = nn.BatchNorm2d if norm == "BN" else type(shared)
            assert all(type(m) is want for m in layer), (name, k, [type(m) for m in layer])
            if norm == "BN":
                assert all(m.affine and m.track_running_stats for m in layer)
            # distinct modules, distinct tensors: nothing shared between levels
            assert len({id(m) for m in layer}) == LEVELS
            ptrs = [t.data_ptr() for m in layer for t in list(m.parameters()) + list(m.buffers())]
            per_norm = len(list(layer[0].parameters()) + list(layer[0].buffers()))
            assert len(ptrs) == len(set(ptrs)) == LEVELS * per_norm
    # conv weights are not per level
    assert per.cls_subnet[0].weight.shape == default.cls_subnet[0].weight.shape
    # changing level 0's norm leaves level 1's alone
    with torch.no_grad():
        per.cls_subnet[1][0].weight.add_(1.0)
    assert not torch.equal(per.cls_subnet[1][0].weight, per.cls_subnet[1][1].weight)


@pytest.mark.parametrize("norm", ["NF", ""])
def test_no_norm_module_no_effect(norm):
    default, per = make_head(norm, False), make_head(norm, True)
    assert type(per.cls_subnet) is nn.Sequential
    assert not any(isinstance(m, PerLevelNorm) for m in per.modules())
    assert [(n, t.shape) for n, t in per.state_dict().items()] == \
        [(n, t.shape) for n, t in default.state_dict().items()]
    feats = features()
    for a, b in zip(*(h.eval()(feats) for h in (default, per))):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_syncbn_per_level_is_one_syncbn_per_level():
    from d2_norms.layers.conv_norm_act import resolve_norm

    per = make_head("SyncBN", True)
    cls = type(resolve_norm("SyncBN").norm(CHANNELS))
    for k in NORM_SLOTS:
        assert [type(m) for m in per.bbox_subnet[k]] == [cls] * LEVELS
    assert list(per.state_dict()) == [n for n in per_level_names("BN")]


def test_config_key_reaches_the_head_through_the_meta_architecture():
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    add_d2_norms_config(cfg)
    assert cfg.MODEL.RETINANET.NORM_PER_LEVEL is False
    cfg = retinanet_cfg("GN", per_level=True)
    model = build_model(cfg)
    assert isinstance(model.head.bbox_subnet[1], PerLevelNorm)
    assert len(model.head.bbox_subnet[1]) == len(cfg.MODEL.RETINANET.IN_FEATURES)
    cfg.defrost()
    cfg.MODEL.RETINANET.NORM_PER_LEVEL = False
    assert not any(isinstance(m, PerLevelNorm) for m in build_model(cfg).modules())


# ------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("norm", NORMS)
def test_level_output_equals_shared_conv_with_that_levels_norm(norm, train):
    per = randomize(make_head(norm, True))
    feats = features()
    got = per.train(train)(feats)
    for level in range(LEVELS):
        ref = default_head_with_level_norms(per, norm, level).train(train)
        want = ref(feats)
        for out in (0, 1):  # logits, box deltas
            # (BN's affine inside vs after the normalization: float32 rounding apart)
            torch.testing.assert_close(got[out][level], want[out][level], rtol=1e-4,
                                       atol=1e-5, msg=lambda m: f"{norm} level {level}: {m}")
    # and the levels' norms do differ: level 0's norms on level 1 give another output
    other = default_head_with_level_norms(per, norm, 0).train(train)(feats)
    assert not torch.allclose(other[0][1], got[0][1], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("norm", NORMS)
def test_default_head_checkpoint_names_are_stable(norm):
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

    a = randomize(make_head(norm, False))
    assert list(a.state_dict()) == default_names(norm)
    if norm == "BN":  # detectron2's own head: same names and shapes (v0.6 cannot build GN:
        # it probes get_norm(norm, 1), which GroupNorm(32, 1) refuses)
        from detectron2.layers import ShapeSpec

        shapes = [ShapeSpec(channels=CHANNELS)] * LEVELS
        stock = RetinaNetHead(input_shape=shapes, num_classes=3, num_anchors=2,
                              conv_dims=[CHANNELS] * NUM_CONVS, norm=norm)
        assert [(n, t.shape) for n, t in stock.state_dict().items()] == \
            [(n, t.shape) for n, t in a.state_dict().items()]
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = make_head(norm, False, seed=9)
    b.load_state_dict(torch.load(buffer), strict=True)
    feats = features()
    for x, y in zip(*(h.eval()(feats) for h in (a, b))):
        for u, v in zip(x, y):
            torch.testing.assert_close(u, v, rtol=0, atol=0)
    # the layouts never mix silently
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key"):
        make_head(norm, True).load_state_dict(a.state_dict())


@pytest.mark.parametrize("norm", NORMS)
def test_gradients_reach_every_levels_norm(norm):
    per = randomize(make_head(norm, True)).train()
    logits, deltas = per(features())
    sum(o.pow(2).mean() for o in logits + deltas).backward()
    for name, subnet in subnets(per).items():
        for k in NORM_SLOTS:
            for level, m in enumerate(subnet[k]):
                for pname, p in m.named_parameters():
                    assert p.grad is not None and p.grad.abs().sum() > 0, \
                        (norm, name, k, level, pname)


def test_level_is_explicit_no_state_across_calls():
    per = randomize(make_head("FRN", True)).eval()
    feats = features()
    before = per(feats)
    with pytest.raises(AssertionError):
        per(feats[:3])  # a forward failing midway (wrong number of levels) ...
    with pytest.raises(RuntimeError, match="level"):
        per.cls_subnet(feats[0])  # ... or a subnet called without its level ...
    per.bbox_subnet(feats[1], 1)  # ... or once more outside the head
    after = per(feats)  # ... leaves nothing behind
    for x, y in zip(before[0] + before[1], after[0] + after[1]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    with pytest.raises(IndexError, match="level 5 out of range for 5 levels"):
        per.cls_subnet[1](feats[0], 5)


# ------------------------------------------------------------------------ export / script
@pytest.mark.parametrize("norm", NORMS)
def test_per_level_head_traces_and_scripts(norm):
    per = randomize(make_head(norm, True)).eval()
    per = X.prepare_for_export(per)  # GNWS: standardization folded into plain convs
    feats, other = features(), features(seed=7, batch=1)
    traced = torch.jit.trace(per, (feats,))
    scripted = torch.jit.script(per)
    for inputs in (feats, other):
        want = per(inputs)
        for exported in (traced, scripted):
            got = exported(inputs)
            for x, y in zip(want[0] + want[1], got[0] + got[1]):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------- small RetinaNet
def retinanet_cfg(norm, per_level):
    """RetinaNet R18-FPN (64 px inputs, FPN width 64) with ``norm`` everywhere."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_d2_norms_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "Base-RetinaNet.yaml"))
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "D2NormsRetinaNet",
        "MODEL.BACKBONE.NAME", "build_d2n_retinanet_resnet_fpn_backbone",
        "MODEL.BACKBONE.FREEZE_AT", 0,
        "MODEL.DEVICE", "cpu",
        "MODEL.WEIGHTS", "",
        "MODEL.RESNETS.DEPTH", 18,
        "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "MODEL.RESNETS.NORM", norm,
        "MODEL.FPN.NORM", norm,
        "MODEL.FPN.OUT_CHANNELS", 64,
        "MODEL.ANCHOR_GENERATOR.SIZES",
        [[s, s * 2 ** (1 / 3), s * 2 ** (2 / 3)] for s in (8, 16, 32, 64, 128)],
        "MODEL.RETINANET.NUM_CLASSES", 3,
        "MODEL.RETINANET.NUM_CONVS", 2,
        "MODEL.RETINANET.NORM", norm,
        "MODEL.RETINANET.NORM_PER_LEVEL", per_level,
        "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0,
        "MODEL.RETINANET.TOPK_CANDIDATES_TEST", 50,
        "TEST.DETECTIONS_PER_IMAGE", 20,
    ])
    return cfg


def _batch(seed=0, size=64):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(2):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 40.0, 30.0], [20.0, 24.0, 60.0, 62.0]]))
        inst.gt_classes = torch.tensor([i % 3, (i + 1) % 3])
        out.append({"image": torch.randint(0, 256, (3, size, size), generator=g).float(),
                    "height": size, "width": size, "instances": inst})
    return out


def test_training_step_with_per_level_frn_is_finite():
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from d2_norms.solver import normalizer_parameter_names

    torch.manual_seed(0)
    model = build_model(retinanet_cfg("FRN", True)).train()
    norm_slots = [n for n, _ in model.named_parameters()
                  if re.match(r"head\.(cls|bbox)_subnet\.\d+\.\d+\.", n)]
    assert len(norm_slots) == 2 * NUM_CONVS * LEVELS * len(LEAVES["FRN"])
    # the optimizer treats them as normalizer parameters (0 weight decay), like the shared ones
    assert set(norm_slots) <= set(normalizer_parameter_names(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with EventStorage(0):  # detectron2's losses log into it
        losses = model(_batch())
        total = sum(losses.values())
        assert torch.isfinite(total), losses
        opt.zero_grad()
        total.backward()
        for name in norm_slots:
            p = model.get_parameter(name)
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            if ".cls_subnet." in name:  # focal loss reaches every anchor of every level (box
                assert p.grad.abs().sum() > 0, name  # loss: levels with positives only)
        opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())
        losses = model(_batch(seed=1))
    assert all(torch.isfinite(v) for v in losses.values()), losses


@pytest.mark.parametrize("method", ["trace", "script"])
def test_per_level_retinanet_exports(method):
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(retinanet_cfg("FRN", True))
    for m in model.head.modules():  # each level's norm its own values; convs as initialised
        if isinstance(m, PerLevelNorm):
            randomize(m, seed=len(list(m.parameters())))
    model.eval()
    inputs = [{"image": b["image"]} for b in _batch()[:1]]
    eager = X.run_eager(model, inputs)
    assert eager[0]["scores"].numel() > 0
    exported = X.export_torchscript(X.prepare_for_export(model), inputs, method)
    for check in (inputs, [{"image": b["image"]} for b in _batch(seed=3)[:1]]):
        diffs = X.compare_outputs(X.run_eager(model, check), exported(check))
        assert max(diffs.values()) <= 1e-4, diffs
