"""Normalizer-Free ResNets (Brock, De & Smith, ICLR 2021, sec. 4 and 4.5).

No activation normalization anywhere. Pre-activation residual blocks (App. E, Fig. 4)

    x_{l+1} = x_l + alpha * s_l * f_l(x_l / beta_l)

* ``beta_l = sqrt(Var(x_l))`` is the analytic expected std of the block input: Var starts at 1
  after the stem, grows by alpha^2 per block and is reset to 1 + alpha^2 after each transition
  block (sec. 4.5, items 1-2);
* transition blocks put their 1x1 shortcut conv on the down-scaled, pre-activated input
  ``g(x_l / beta_l)``, exactly like the pre-activation transition block (Fig. 4b) and the
  paper's reference code, so the skip path restarts at unit variance. The first block of every
  stage is a transition, also where it keeps the shape (res2 of R18/R34: 64 -> 64, stride 1):
  sec. 4.5 resets the expected variance at the start of each stage, and without the shortcut
  conv res2's skip path would carry the stem's max-pool output (channel mean ~ +1.5, variance
  ~ 0.4 at init: squared mean / variance ~ 5) through the whole stage. As in NF-ResNet-50 and
  timm's NF-ResNets, where each stage starts with a shortcut conv;
* every conv is a Scaled WS conv (eq. 3) whose gain is the activation's
  ``1 / sqrt(Var(g(x)))``, x ~ N(0,1) (sec. 4.3); the stem conv sees the (linear) image and
  gets gain 1. Convs keep the learnable affine gain and bias of App. B.1;
* ``s_l`` is SkipInit's learnable scalar (sec. 4.4), initialised to
  ``MODEL.D2NORMS.NF.SKIP_GAIN_INIT`` (0 by default); beta ignores it, as in the paper.

Stage outputs (res2..res5) are the un-normalised residual stream (mean ~0, variance
1 + k alpha^2); the FPN's linear lateral convs take them as they are.

With ``MODEL.D2NORMS.NF.SCALED_WS = False`` the convs are plain He-initialised convs: the
network of sec. 4.1 whose channel means drift with depth (kept for Signal Propagation Plots).

Two options exist so that timm's ``nf_resnet*`` weights compute the same function here
(``d2_norms.modeling.pretrained``, docs/pretrained.md); their defaults keep the network above:
``MODEL.D2NORMS.NF.WS_EPS`` (the Scaled-WS epsilon; timm's NF-ResNets use 1e-5) and
``MODEL.D2NORMS.NF.SHORTCUT_AVG_POOL`` (a striding transition's shortcut is a 2x2 average pool
followed by a stride-1 1x1 conv, timm's ``DownsampleAvg``, instead of a strided 1x1 conv).
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import CNNBlockBase, ShapeSpec
from detectron2.modeling.backbone.resnet import ResNet

from d2_norms.layers.weight_std import WS_EPS, ScaledStdConv2d, activation_gain
from .resnet import check_resnet_cfg, stage_specs

__all__ = [
    "NFBasicBlock",
    "NFBottleneckBlock",
    "NFStem",
    "nf_betas",
    "build_nf_resnet",
    "nf_activation",
]

_NF_ACTIVATIONS = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
}


def nf_activation(name: str) -> nn.Module:
    """The NF-ResNet nonlinearity ``name`` (its Scaled-WS gain comes from ``activation_gain``)."""
    key = str(name).lower()
    if key not in _NF_ACTIVATIONS:
        raise ValueError(
            f"MODEL.D2NORMS.NF.ACTIVATION={name!r} is not supported; use one of "
            f"{sorted(_NF_ACTIVATIONS)}."
        )
    return _NF_ACTIVATIONS[key]()


class _NFConvFactory:
    """Builds the NF-ResNet's convs: Scaled WS (default) or plain He-init (sec. 4.1 baseline)."""

    def __init__(self, scaled_ws: bool, activation: str, eps: float = WS_EPS):
        self.scaled_ws = scaled_ws
        self.activation = activation
        self.eps = float(eps)
        self.act_gain = float(activation_gain(activation)) if scaled_ws else None

    def __call__(self, in_ch, out_ch, kernel_size, *, stride=1, padding=0, dilation=1,
                 groups=1, after_activation=True):
        if self.scaled_ws:
            gain = self.act_gain if after_activation else 1.0
            conv = ScaledStdConv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding,
                                   dilation=dilation, groups=groups, bias=True, gamma=gain)
            conv.eps = self.eps
            # Gaussian underlying weights (sec. 4.2), variance 1/fan_in as the paper's code;
            # the standardization makes the scale irrelevant to the forward pass.
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="linear")
            nn.init.zeros_(conv.bias)
            return conv
        conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=True)
        # He et al. 2015 (fan_in keeps the forward variance, the quantity SPPs look at).
        nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        return conv


class _NFBlockBase(CNNBlockBase):
    # Not adaptively clipped (d2_norms.solver.agc): a scalar starting at 0 would be capped at
    # lr * lambda * 1e-3 per step.
    d2n_agc_exclude_params = ("skip_gain",)
    # SkipInit's scalar is a normalizer parameter (no weight decay; d2_norms.solver).
    d2n_norm_params = ("skip_gain",)

    def __init__(self, in_channels, out_channels, stride, *, alpha, beta, activation,
                 skip_gain_init, transition=None, shortcut_avg_pool=False):
        super().__init__(in_channels, out_channels, stride)
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.activation_name = activation
        reshapes = in_channels != out_channels or stride != 1
        if transition is None:
            transition = reshapes
        elif reshapes and not transition:
            raise ValueError(
                f"transition=False is impossible for a block changing the shape ({in_channels} "
                f"-> {out_channels} channels, stride {stride}): its skip path needs a shortcut "
                "conv; pass transition=True or None")
        # A transition block's skip path is a 1x1 conv on g(x / beta) (sec. 4.5).
        self.is_transition = bool(transition)
        # timm's DownsampleAvg: a striding shortcut averages 2x2 windows (all inputs seen), then
        # a stride-1 1x1 conv; the default strided 1x1 conv reads one pixel in four.
        self.shortcut_pool = None
        if self.is_transition and shortcut_avg_pool and stride > 1:
            self.shortcut_pool = nn.AvgPool2d(2, stride, ceil_mode=True,
                                              count_include_pad=False)
        # SkipInit (De & Smith 2020; NF paper sec. 4.4): learnable scalar, 0 at init by default.
        self.skip_gain = nn.Parameter(torch.tensor(float(skip_gain_init)))
        # Marks f_l(x_l / beta_l), before alpha and the skip gain, for Signal Propagation Plots.
        self.branch_out = nn.Identity()

    def extra_repr(self):
        return f"alpha={self.alpha}, beta={self.beta:.4f}, transition={self.is_transition}"

    def _shortcut_stride(self, stride):
        """Stride of the shortcut conv (1 when the average pool does the striding)."""
        return 1 if self.shortcut_pool is not None else stride

    def _merge(self, x, pre, branch):
        if self.shortcut is None:
            shortcut = x
        elif self.shortcut_pool is not None:
            shortcut = self.shortcut(self.shortcut_pool(pre))
        else:
            shortcut = self.shortcut(pre)
        return shortcut + self.branch_out(branch) * (self.alpha * self.skip_gain)


class NFBasicBlock(_NFBlockBase):
    """Pre-activation basic block: g -> 3x3 conv -> g -> 3x3 conv."""

    def __init__(self, in_channels, out_channels, *, stride=1, alpha=0.2, beta=1.0,
                 activation="relu", skip_gain_init=0.0, conv_factory=None, transition=None,
                 shortcut_avg_pool=False):
        super().__init__(in_channels, out_channels, stride, alpha=alpha, beta=beta,
                         activation=activation, skip_gain_init=skip_gain_init,
                         transition=transition, shortcut_avg_pool=shortcut_avg_pool)
        conv = conv_factory or _NFConvFactory(True, activation)
        self.act1 = nf_activation(activation)
        self.shortcut = (conv(in_channels, out_channels, 1, stride=self._shortcut_stride(stride))
                         if self.is_transition else None)
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1)
        self.act2 = nf_activation(activation)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1)

    def forward(self, x):
        pre = self.act1(x / self.beta)
        out = self.conv2(self.act2(self.conv1(pre)))
        return self._merge(x, pre, out)


class NFBottleneckBlock(_NFBlockBase):
    """Pre-activation bottleneck: g -> 1x1 -> g -> 3x3 (groups, dilation) -> g -> 1x1."""

    def __init__(self, in_channels, out_channels, *, bottleneck_channels, stride=1,
                 num_groups=1, stride_in_1x1=False, dilation=1, alpha=0.2, beta=1.0,
                 activation="relu", skip_gain_init=0.0, conv_factory=None, transition=None,
                 shortcut_avg_pool=False):
        super().__init__(in_channels, out_channels, stride, alpha=alpha, beta=beta,
                         activation=activation, skip_gain_init=skip_gain_init,
                         transition=transition, shortcut_avg_pool=shortcut_avg_pool)
        conv = conv_factory or _NFConvFactory(True, activation)
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.act1 = nf_activation(activation)
        self.shortcut = (conv(in_channels, out_channels, 1, stride=self._shortcut_stride(stride))
                         if self.is_transition else None)
        self.conv1 = conv(in_channels, bottleneck_channels, 1, stride=stride_1x1)
        self.act2 = nf_activation(activation)
        self.conv2 = conv(bottleneck_channels, bottleneck_channels, 3, stride=stride_3x3,
                          padding=dilation, dilation=dilation, groups=num_groups)
        self.act3 = nf_activation(activation)
        self.conv3 = conv(bottleneck_channels, out_channels, 1)

    def forward(self, x):
        pre = self.act1(x / self.beta)
        out = self.conv1(pre)
        out = self.conv2(self.act2(out))
        out = self.conv3(self.act3(out))
        return self._merge(x, pre, out)


class NFStem(CNNBlockBase):
    """7x7/2 conv (gain 1: its input is the image, not an activation) + 3x3/2 max pool.

    No activation: in a pre-activation network the first block applies it.
    """

    def __init__(self, in_channels=3, out_channels=64, conv_factory=None):
        super().__init__(in_channels, out_channels, 4)
        self.in_channels = in_channels
        conv = conv_factory or _NFConvFactory(True, "relu")
        self.conv1 = conv(in_channels, out_channels, 7, stride=2, padding=3,
                          after_activation=False)

    def forward(self, x):
        return F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)


def nf_betas(blocks_per_stage, transitions, alpha):
    """Analytic beta_l = sqrt(Var(x_l)) for every block (NF paper sec. 4.5, items 1-2).

    Args:
        blocks_per_stage: number of blocks in each stage.
        transitions: per stage, per block, whether it is a transition block.
        alpha: the residual scale.
    Returns:
        list (per stage) of lists of beta values.
    """
    expected_var = 1.0  # Var(x_0) = 1: the stem output
    betas = []
    for n, stage_transitions in zip(blocks_per_stage, transitions):
        stage = []
        for i in range(n):
            stage.append(math.sqrt(expected_var))
            if stage_transitions[i]:
                expected_var = 1.0  # the shortcut conv sees a unit-variance input
            expected_var += alpha ** 2
        betas.append(stage)
    return betas


def build_nf_resnet(cfg, input_shape: ShapeSpec) -> ResNet:
    """NF-ResNet-18/34/50/101/152 from ``cfg.MODEL.RESNETS`` and ``cfg.MODEL.D2NORMS.NF``."""
    check_resnet_cfg(cfg)
    nf = cfg.MODEL.D2NORMS.NF
    alpha = float(nf.ALPHA)
    if not alpha > 0:
        raise ValueError(f"MODEL.D2NORMS.NF.ALPHA must be > 0 (paper: 0.2), got {nf.ALPHA}.")
    activation = str(nf.ACTIVATION).lower()
    nf_activation(activation)  # fail early, with the list of known names
    # .get: configs made before these keys existed mean the default network.
    conv = _NFConvFactory(bool(nf.SCALED_WS), activation, eps=float(nf.get("WS_EPS", WS_EPS)))
    stem = NFStem(input_shape.channels, cfg.MODEL.RESNETS.STEM_OUT_CHANNELS, conv_factory=conv)

    specs = stage_specs(cfg)
    transitions = []
    for spec in specs:
        # The first block of every stage is a transition (see the module docstring).
        in_ch, flags = spec["in_channels"], []
        for i, stride in enumerate(spec["strides"]):
            flags.append(i == 0 or in_ch != spec["out_channels"] or stride != 1)
            in_ch = spec["out_channels"]
        transitions.append(flags)
    betas = nf_betas([s["num_blocks"] for s in specs], transitions, alpha)

    common = dict(alpha=alpha, activation=activation, skip_gain_init=nf.SKIP_GAIN_INIT,
                  conv_factory=conv,
                  shortcut_avg_pool=bool(nf.get("SHORTCUT_AVG_POOL", False)))
    stages = []
    for spec, stage_betas, stage_transitions in zip(specs, betas, transitions):
        blocks = []
        in_channels = spec["in_channels"]
        for stride, beta, transition in zip(spec["strides"], stage_betas, stage_transitions):
            if "bottleneck_channels" in spec:
                block = NFBottleneckBlock(
                    in_channels, spec["out_channels"],
                    bottleneck_channels=spec["bottleneck_channels"], stride=stride,
                    num_groups=spec["num_groups"], stride_in_1x1=spec["stride_in_1x1"],
                    dilation=spec["dilation"], beta=beta, transition=transition, **common,
                )
            else:
                block = NFBasicBlock(in_channels, spec["out_channels"], stride=stride,
                                     beta=beta, transition=transition, **common)
            blocks.append(block)
            in_channels = spec["out_channels"]
        stages.append(blocks)
    return ResNet(
        stem,
        stages,
        out_features=list(cfg.MODEL.RESNETS.OUT_FEATURES),
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
    )
