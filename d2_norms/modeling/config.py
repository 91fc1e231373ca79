"""Config keys of d2_norms' backbones (added by ``add_backbone_config``).

Existing detectron2 keys keep their meaning: ``MODEL.RESNETS.{DEPTH, NORM, STEM_OUT_CHANNELS,
RES2_OUT_CHANNELS, NUM_GROUPS, WIDTH_PER_GROUP, STRIDE_IN_1X1, RES5_DILATION, OUT_FEATURES}``,
``MODEL.BACKBONE.FREEZE_AT`` and ``MODEL.FPN.{IN_FEATURES, OUT_CHANNELS, NORM, FUSE_TYPE}``.
``MODEL.RESNETS.NORM: "NF"`` selects the Normalizer-Free ResNet (see docs/backbones.md).
"""
from detectron2.config import CfgNode as CN

# The norm name that selects the NF-ResNet in MODEL.RESNETS.NORM (and Scaled-WS convs without
# activation normalization in MODEL.FPN.NORM).
NF_NORM = "NF"


def _setdefault(node: CN, key: str, value) -> None:
    # Only add missing keys: calling add_backbone_config again (e.g. after a YAML was merged)
    # must not reset values the user already set.
    if key not in node:
        setattr(node, key, value)


def add_backbone_config(cfg: CN) -> CN:
    """Add the ``MODEL.D2NORMS`` backbone keys to ``cfg`` in place; idempotent."""
    _setdefault(cfg.MODEL, "D2NORMS", CN())
    d2n = cfg.MODEL.D2NORMS
    # GN paper sec. 4.1 / Goyal et al. 2017: gamma of each residual block's last norm starts at
    # 0, so every block is the identity at initialisation. Off by default, as in detectron2 (its
    # note: it hurt GN models trained from scratch). With MODEL.RESNETS.NORM "" (no norm, no
    # gamma) it zero-initialises the branch's last conv instead.
    _setdefault(d2n, "ZERO_INIT_RESIDUAL", False)

    _setdefault(d2n, "NF", CN())
    nf = d2n.NF
    # NF paper sec. 4: x_{l+1} = x_l + alpha * f_l(x_l / beta_l); alpha = 0.2 (sec. 5.1).
    _setdefault(nf, "ALPHA", 0.2)
    # Initial value of the learnable scalar at the end of each residual branch (SkipInit, sec.
    # 4.4). 0.0 = SkipInit as trained in the paper; 1.0 = the plain NF-ResNet of the SPPs (Fig. 2).
    _setdefault(nf, "SKIP_GAIN_INIT", 0.0)
    # Nonlinearity of the NF-ResNet; its Scaled-WS gain is 1/sqrt(Var(g(x))), x ~ N(0,1) (4.3).
    _setdefault(nf, "ACTIVATION", "relu")
    # True: Scaled WS in every conv (eq. 3). False: plain He-initialised convs, the mean-shift
    # baseline of sec. 4.1 (for Signal Propagation Plots / ablations, not for training).
    _setdefault(nf, "SCALED_WS", True)
    # Epsilon added to each Scaled-WS conv's fan-in variance. 1e-6 as timm's ScaledStdConv2d
    # default; timm's NF-ResNets (NfCfg.std_conv_eps) use 1e-5, which converted weights need.
    _setdefault(nf, "WS_EPS", 1e-6)
    # False: a striding transition block's shortcut is a strided 1x1 conv (the paper's
    # pre-activation transition). True: 2x2 average pool, then a stride-1 1x1 conv (timm's
    # NF-ResNets, DownsampleAvg), needed by weights converted from timm.
    _setdefault(nf, "SHORTCUT_AVG_POOL", False)
    return cfg
