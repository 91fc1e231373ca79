"""Signal Propagation Plots: the statistics (NF paper App. F), the NF paper's facts about
NF-ResNets at initialisation (sec. 4, 4.1, 4.2, Fig. 2), and tools/spp.py.

Networks are half-width ResNet-50s (res2 = 128 channels) fed 4 N(0,1) images of 256 px: the
statistics are averages over >= 128 channels and >= 256 positions, and res5 is 8x8.
"""
import csv
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import d2_norms  # noqa: F401
from d2_norms.config import add_d2_norms_config
from d2_norms.modeling.spp import (channel_stats, residual_blocks, signal_propagation,
                                   spp_from_config)
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.resnet import build_resnet_backbone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALPHA = 0.2
BATCH, SIZE = 4, 256


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def nf_cfg(**nf):
    cfg = get_cfg()
    add_d2_norms_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_d2n_resnet_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    r = cfg.MODEL.RESNETS
    r.DEPTH, r.NORM, r.OUT_FEATURES = 50, "NF", ["res5"]
    r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS, r.WIDTH_PER_GROUP = 32, 128, 32
    cfg.MODEL.D2NORMS.NF.ALPHA = ALPHA
    cfg.MODEL.D2NORMS.NF.SKIP_GAIN_INIT = 1.0  # the paper's SPPs: no SkipInit at init
    for k, v in nf.items():
        cfg.MODEL.D2NORMS.NF[k] = v
    return cfg


def test_channel_stats_match_appendix_f_numpy():
    y = torch.randn(3, 5, 4, 6, dtype=torch.float64) * 2 + torch.arange(5.0).view(1, 5, 1, 1)
    nhwc = y.permute(0, 2, 3, 1).numpy()
    sq_mean, var = channel_stats(y)
    assert sq_mean == pytest.approx(np.mean(np.mean(nhwc, axis=(0, 1, 2)) ** 2), rel=1e-12)
    assert var == pytest.approx(np.mean(np.var(nhwc, axis=(0, 1, 2))), rel=1e-12)
    with pytest.raises(ValueError, match="NCHW"):
        channel_stats(torch.zeros(3, 4))


def _padding_predicted_branch_variance(block, in_hw):
    """Var(f(x/beta)) expected from zero padding alone (NF sec. 4.2: 'decays slightly near the
    end of the network due to zero padding'). With iid unit-variance inputs, Scaled-WS convs
    preserve variance except that a tap falling on padding contributes 0: propagate the map of
    expected variances through the branch's convs with averaging kernels of the same geometry.
    """
    v = torch.ones(1, 1, *in_hw, dtype=torch.float64)
    for conv in (block.conv1, block.conv2, block.conv3):
        kh, kw = conv.kernel_size
        kernel = torch.full((1, 1, kh, kw), 1.0 / (kh * kw), dtype=torch.float64)
        v = F.conv2d(v, kernel, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    return float(v.mean())


@pytest.fixture(scope="module")
def nf_spp():
    torch.manual_seed(0)
    cfg = nf_cfg()
    from detectron2.modeling import build_backbone

    net = build_backbone(cfg, ShapeSpec(channels=3))
    in_hw = {}
    for k, (_, _, block) in enumerate(residual_blocks(net)):
        block.register_forward_pre_hook(lambda m, i, k=k: in_hw.__setitem__(k, i[0].shape[-2:]))
    records = signal_propagation(net, batch_size=BATCH, size=SIZE, seed=1)
    blocks = [b for _, _, b in residual_blocks(net)]
    predicted = [_padding_predicted_branch_variance(b, in_hw[k]) for k, b in enumerate(blocks)]
    return records, blocks, predicted


def test_scaled_ws_keeps_channel_means_near_zero(nf_spp):
    records, _, _ = nf_spp
    assert len(records) == 16
    # Sec. 4.2: with Scaled WS E(z_i) = 0, so what is left is the sampling noise of a mean over
    # N*H*W correlated values: Var/n_eff. At res5 (8x8, N=4) that is >= 1/256 ~ 0.004 of the
    # variance (seeds 0-4: at most 0.0105); 0.03 leaves room for spatial correlation. The
    # He-init network below has ratios > 1.
    ratios = [r.avg_channel_squared_mean / r.avg_channel_variance for r in records]
    assert max(ratios) < 0.03, ratios


def test_residual_branch_variance_is_one_up_to_zero_padding(nf_spp):
    records, _, predicted = nf_spp
    measured = [r.residual_avg_channel_variance for r in records]
    # Var(f(x/beta)) = 1 by the choice of gamma (sec. 4.3), times the fraction of conv taps that
    # do not fall on zero padding (1.0 in the middle of a map; 0.84 on res5's 8x8 map). Seeds
    # 0-4 give measured / predicted in [0.945, 1.097] (channel averages over 128-512 channels,
    # inputs x/beta whose variance is only about 1): +-15 %.
    rel = [m / p for m, p in zip(measured, predicted)]
    assert all(0.85 < x < 1.15 for x in rel), list(zip(measured, predicted))
    assert min(predicted) < 0.9  # the correction matters at res5 (so this tests something)


def test_variance_grows_alpha_squared_per_block_and_resets(nf_spp):
    records, blocks, _ = nf_spp
    var = [r.avg_channel_variance for r in records]
    res = [r.residual_avg_channel_variance for r in records]
    for k in range(1, len(records)):
        if blocks[k].is_transition:
            # Reset (sec. 4.5): the shortcut conv reads g(x_l / beta_l), so the skip path
            # restarts at Var(x_l) / beta_l^2 ~ 1 and Var(x_{l+1}) ~ 1 + alpha^2, well below the
            # previous block's 1 + k alpha^2. beta is analytic (it assumes Var(f) = 1) while zero
            # padding makes Var(f) < 1 late in the network, so the measured reset sits a little
            # under 1 + alpha^2 (seeds 0-4: -0.08 .. +0.03): +-0.12. The mechanism itself,
            # Var(x_l) / beta_l^2 + alpha^2 Var(f_l), holds to 3 % (seeds 0-4): +-8 %.
            assert abs(var[k] - (1 + ALPHA ** 2)) < 0.12, (k, var[k])
            assert var[k] < var[k - 1] - ALPHA ** 2, (k, var[k - 1], var[k])
            mechanism = var[k - 1] / blocks[k].beta ** 2 + ALPHA ** 2 * res[k]
            assert abs(var[k] / mechanism - 1) < 0.08, (k, var[k], mechanism)
        else:
            # Var(x_{l+1}) = Var(x_l) + alpha^2 Var(f_l) (independent branch and skip path):
            # growth alpha^2 times the measured branch variance; seeds 0-4 give ratios in
            # [0.90, 1.10] (a small branch/skip covariance): +-25 %.
            growth = (var[k] - var[k - 1]) / ALPHA ** 2
            assert 0.75 * res[k] < growth < 1.25 * res[k], (k, growth, res[k])
    # A stage of 6 blocks ends near 1 + 6 alpha^2 (here 1.24; without resets it would be 2.3+).
    assert max(var) < 1 + 7 * ALPHA ** 2
    assert var[12] > 1 + 4 * ALPHA ** 2


def test_he_init_without_ws_has_growing_mean_shift(nf_spp):
    # Sec. 4.1 / Fig. 2 (green): He-init NF-ResNet, alpha = 1, no Scaled WS. ReLU outputs have a
    # positive mean and a drawn weight row has a non-zero mean (eq. 1), so every residual branch
    # adds a per-channel mean: the squared channel mean grows block after block and exceeds the
    # variance.
    torch.manual_seed(0)
    he = spp_from_config(nf_cfg(SCALED_WS=False, ALPHA=1.0), batch_size=BATCH, size=SIZE)
    ws = nf_spp[0]
    stages = {}
    for r in he:
        stages.setdefault(r.stage, []).append(r.avg_channel_squared_mean)
    for name, values in stages.items():
        assert all(b > a for a, b in zip(values, values[1:])), (name, values)
    assert all(r.avg_channel_squared_mean > r.avg_channel_variance for r in he)
    assert min(r.avg_channel_squared_mean for r in he) > 100 * max(
        r.avg_channel_squared_mean for r in ws)


def test_spp_on_stock_detectron2_resnet_leaves_state_unchanged():
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.NORM = "BN"  # detectron2's default is FrozenBN
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    net = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    records = signal_propagation(net, batch_size=2, size=64)
    assert [(r.stage, r.block_in_stage) for r in records] == [
        (f"res{s}", i) for s in range(2, 6) for i in range(2)]
    assert [r.stage_end for r in records] == [False, True] * 4
    # Stock BasicBlock: the branch ends at conv2 (conv + BN); BN in batch mode gives var ~1.
    assert all(0.9 < r.residual_avg_channel_variance < 1.1 for r in records)
    assert not net.training and all(not m.training for m in net.modules())
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_spp_tool_writes_png_and_csv_for_several_configs(tmp_path, load_tool):
    tool = load_tool("spp")
    configs = [os.path.join(REPO, "configs", "spp", n) for n in ("nf_r50.yaml", "gn_r50.yaml")]
    out = tmp_path / "spp.png"
    small = ["MODEL.RESNETS.WIDTH_PER_GROUP", "32", "MODEL.RESNETS.RES2_OUT_CHANNELS", "128",
             "MODEL.RESNETS.STEM_OUT_CHANNELS", "32"]
    tool.main(["--config-file", *configs, "--labels", "NF", "GN", "--output", str(out),
               "--batch-size", "2", "--size", "64", *small])
    image = __import__("matplotlib.image", fromlist=["imread"]).imread(str(out))
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 200
    with open(tmp_path / "spp.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["NF"] * 16 + ["GN"] * 16
    # The CSV holds the numbers spp_from_config computes for the same config and seed.
    cfg = tool.load_cfg(configs[0], small)
    direct = spp_from_config(cfg, batch_size=2, size=64, seed=0)
    for row, rec in zip(rows[:16], direct):
        assert int(row["block"]) == rec.block and row["stage"] == rec.stage
        for key in ("avg_channel_squared_mean", "avg_channel_variance",
                    "residual_avg_channel_variance"):
            assert float(row[key]) == pytest.approx(getattr(rec, key), rel=1e-9)


def test_spp_tool_argument_errors(tmp_path, load_tool):
    tool = load_tool("spp")
    nf = os.path.join(REPO, "configs", "spp", "nf_r50.yaml")
    with pytest.raises(SystemExit):
        tool.main(["--config-file", nf, "--labels", "a", "b", "--output", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit):
        tool.main(["--config-file", nf, "--output", str(tmp_path / "x.pdf")])
    with pytest.raises(SystemExit):
        tool.main(["--config-file", nf, "MODEL.RESNETS.DEPTH"])
