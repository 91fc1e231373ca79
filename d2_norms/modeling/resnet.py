"""Norm-aware ResNet-18/34/50/101/152 (post-activation, as detectron2's ResNet).

Detectron2's blocks hard-code ``F.relu_`` after every norm and after the residual add, so FRN's
TLU cannot replace ReLU there. Here every conv, norm and activation comes from the one composer
(``d2_norms.layers.conv_norm_act``), the norm name resolved once per backbone: the paired
activation (BN/GN/GNWS -> ReLU, FRN -> TLU, "" -> ReLU only) follows every norm and the residual
add, and the conv type follows the norm (GNWS -> WS conv). Under FRN the activation after the
add is TLU too, so an FRN ResNet runs no ReLU (timm's FRN ResNets keep ReLU there; see
docs/backbones.md).

Initialisation for training from scratch (GN paper sec. 4.1): He (MSRA) init for every conv,
norm gamma 1 / beta 0 (tau 0 for TLU) as the layers define them, and optionally gamma 0 in each
block's last norm (``MODEL.D2NORMS.ZERO_INIT_RESIDUAL``).

The stages are put together by detectron2's own ``ResNet`` class, so ``OUT_FEATURES``,
``FREEZE_AT`` (FrozenBN conversion, requires_grad off) and ``output_shape`` behave exactly as
in detectron2.
"""
from typing import List, Optional, Union

import fvcore.nn.weight_init as weight_init
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import CNNBlockBase, ShapeSpec
from detectron2.modeling.backbone.resnet import ResNet

from d2_norms.layers.conv_norm_act import ResolvedNorm, resolve_norm

NormArg = Union[str, ResolvedNorm]

__all__ = [
    "NormBasicBlock",
    "NormBottleneckBlock",
    "NormStem",
    "NUM_BLOCKS_PER_STAGE",
    "build_norm_resnet",
]

# detectron2's table, kept identical so that DEPTH means the same network.
NUM_BLOCKS_PER_STAGE = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
}


def _he_init(conv: nn.Module) -> None:
    # detectron2's c2_msra_fill: He et al. 2015 normal init (fan_out, ReLU gain), bias 0.
    weight_init.c2_msra_fill(conv)


def _norm_scale_parameter(conv: nn.Module) -> Optional[torch.Tensor]:
    """The affine scale (gamma) of the norm a conv carries as ``conv.norm``, None if none."""
    norm = getattr(conv, "norm", None)
    if norm is None:
        return None
    for m in norm.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() == 1:
            return w
    return None


def _zero_init_branch_end(conv: nn.Module) -> None:
    """Make the residual branch output 0 at init: gamma of its last norm, else the conv."""
    scale = _norm_scale_parameter(conv)
    if scale is not None:
        nn.init.zeros_(scale)
    else:  # norm "" has no gamma: zeroing the branch's last conv is the only way
        nn.init.zeros_(conv.weight)


def _conv(norm: ResolvedNorm, in_channels, out_channels, kernel_size, *, padding=0, **kwargs):
    """detectron2's ResNet layout: no conv bias (the norm shifts; none either without a norm),
    except Scaled WS convs, whose bias is the NF affine shift."""
    return norm.conv_norm_act(in_channels, out_channels, kernel_size, padding=padding,
                              bias=norm.conv_kind == "scaled_ws", **kwargs)


def _activation(norm: ResolvedNorm, channels: int) -> nn.Module:
    """The norm's paired activation on its own (after the residual add)."""
    act = norm.activation(channels)
    return nn.Identity() if act is None else act


def _shortcut(in_channels, out_channels, stride, norm: ResolvedNorm):
    """Projection shortcut (1x1 conv + norm, no activation) when the shape changes."""
    if in_channels == out_channels and stride == 1:
        return None
    conv = _conv(norm, in_channels, out_channels, 1, stride=stride, apply_act=False)
    _he_init(conv)
    return conv


class NormBasicBlock(CNNBlockBase):
    """Two 3x3 convs (ResNet-18/34) with registry norms and their paired activation.

    Same structure and parameter names as detectron2's ``BasicBlock``; the activations are the
    norm's (``conv1.activation`` or the fused ``conv1.norm``, and ``act`` after the add).
    """

    def __init__(self, in_channels, out_channels, *, stride=1, norm: NormArg = "BN",
                 zero_init_residual=False):
        super().__init__(in_channels, out_channels, stride)
        norm = resolve_norm(norm)
        self.shortcut = _shortcut(in_channels, out_channels, stride, norm)
        self.conv1 = _conv(norm, in_channels, out_channels, 3, stride=stride, padding=1)
        self.conv2 = _conv(norm, out_channels, out_channels, 3, padding=1, apply_act=False)
        # Marks the end of the residual branch (before the add) for Signal Propagation Plots.
        self.branch_out = nn.Identity()
        self.act = _activation(norm, out_channels)
        for c in (self.conv1, self.conv2):
            _he_init(c)
        if zero_init_residual:
            _zero_init_branch_end(self.conv2)

    def forward(self, x):
        out = self.branch_out(self.conv2(self.conv1(x)))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.act(out + shortcut)


class NormBottleneckBlock(CNNBlockBase):
    """1x1 -> 3x3 -> 1x1 bottleneck (ResNet-50/101/152, ResNeXt) with registry norms.

    Same structure and parameter names as detectron2's ``BottleneckBlock``.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        *,
        bottleneck_channels,
        stride=1,
        num_groups=1,
        norm: NormArg = "BN",
        stride_in_1x1=False,
        dilation=1,
        zero_init_residual=False,
    ):
        super().__init__(in_channels, out_channels, stride)
        norm = resolve_norm(norm)
        self.shortcut = _shortcut(in_channels, out_channels, stride, norm)
        # MSRA's original models stride in the 1x1, fb.torch / Caffe2 ResNeXt in the 3x3.
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = _conv(norm, in_channels, bottleneck_channels, 1, stride=stride_1x1)
        self.conv2 = _conv(norm, bottleneck_channels, bottleneck_channels, 3, stride=stride_3x3,
                           padding=dilation, dilation=dilation, groups=num_groups)
        self.conv3 = _conv(norm, bottleneck_channels, out_channels, 1, apply_act=False)
        self.branch_out = nn.Identity()
        self.act = _activation(norm, out_channels)
        for c in (self.conv1, self.conv2, self.conv3):
            _he_init(c)
        if zero_init_residual:
            _zero_init_branch_end(self.conv3)

    def forward(self, x):
        out = self.branch_out(self.conv3(self.conv2(self.conv1(x))))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.act(out + shortcut)


class NormStem(CNNBlockBase):
    """7x7/2 conv with norm + paired activation, 3x3/2 max pool (detectron2's BasicStem)."""

    def __init__(self, in_channels=3, out_channels=64, norm: NormArg = "BN"):
        super().__init__(in_channels, out_channels, 4)
        self.in_channels = in_channels
        self.conv1 = _conv(resolve_norm(norm), in_channels, out_channels, 7, stride=2, padding=3,
                           input_activation=None)
        _he_init(self.conv1)

    def forward(self, x):
        return F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)


def check_resnet_cfg(cfg) -> None:
    """Reject settings the d2_norms ResNets do not implement, saying which key to change."""
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in NUM_BLOCKS_PER_STAGE:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH={r.DEPTH} is not supported; use one of "
            f"{sorted(NUM_BLOCKS_PER_STAGE)}."
        )
    if r.RES5_DILATION not in (1, 2):
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1 or 2, got {r.RES5_DILATION}.")
    if any(r.DEFORM_ON_PER_STAGE):
        raise ValueError(
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE is not supported by d2_norms' backbones "
            "(deformable convs need detectron2's C++ extension); set it to [False] * 4."
        )
    if r.DEPTH in (18, 34):
        for key, value, need in (
            ("RES2_OUT_CHANNELS", r.RES2_OUT_CHANNELS, 64),
            ("RES5_DILATION", r.RES5_DILATION, 1),
            ("NUM_GROUPS", r.NUM_GROUPS, 1),
        ):
            if value != need:
                raise ValueError(
                    f"ResNet-{r.DEPTH} uses basic blocks: set MODEL.RESNETS.{key} = {need} "
                    f"(got {value})."
                )
    valid = {"stem", "res2", "res3", "res4", "res5"}
    bad = [f for f in r.OUT_FEATURES if f not in valid]
    if bad or not r.OUT_FEATURES:
        raise ValueError(
            f"MODEL.RESNETS.OUT_FEATURES={list(r.OUT_FEATURES)} must be a non-empty subset of "
            f"{sorted(valid)}."
        )


def stage_specs(cfg) -> List[dict]:
    """Per-stage block arguments shared by the norm-aware and the NF ResNet (detectron2 rules)."""
    r = cfg.MODEL.RESNETS
    depth = r.DEPTH
    in_channels = r.STEM_OUT_CHANNELS
    out_channels = r.RES2_OUT_CHANNELS
    bottleneck_channels = r.NUM_GROUPS * r.WIDTH_PER_GROUP
    specs = []
    for idx, stage_idx in enumerate(range(2, 6)):
        # RES5_DILATION as in R-FCN / deformable conv: dilate res5 instead of striding it.
        dilation = r.RES5_DILATION if stage_idx == 5 else 1
        first_stride = 1 if idx == 0 or (stage_idx == 5 and dilation == 2) else 2
        n = NUM_BLOCKS_PER_STAGE[depth][idx]
        spec = {
            "num_blocks": n,
            "strides": [first_stride] + [1] * (n - 1),
            "in_channels": in_channels,
            "out_channels": out_channels,
        }
        if depth >= 50:
            spec.update(
                bottleneck_channels=bottleneck_channels,
                num_groups=r.NUM_GROUPS,
                stride_in_1x1=r.STRIDE_IN_1X1,
                dilation=dilation,
            )
        specs.append(spec)
        in_channels = out_channels
        out_channels *= 2
        bottleneck_channels *= 2
    return specs


def build_norm_resnet(cfg, input_shape: ShapeSpec) -> ResNet:
    """Norm-aware ResNet from ``cfg.MODEL.RESNETS`` (any norm name of the d2_norms registry)."""
    check_resnet_cfg(cfg)
    norm = resolve_norm(cfg.MODEL.RESNETS.NORM)  # once for the whole backbone
    zero_init = cfg.MODEL.D2NORMS.ZERO_INIT_RESIDUAL
    stem = NormStem(input_shape.channels, cfg.MODEL.RESNETS.STEM_OUT_CHANNELS, norm=norm)
    stages = []
    for spec in stage_specs(cfg):
        blocks = []
        in_channels = spec["in_channels"]
        for stride in spec["strides"]:
            if "bottleneck_channels" in spec:
                block = NormBottleneckBlock(
                    in_channels,
                    spec["out_channels"],
                    bottleneck_channels=spec["bottleneck_channels"],
                    stride=stride,
                    num_groups=spec["num_groups"],
                    norm=norm,
                    stride_in_1x1=spec["stride_in_1x1"],
                    dilation=spec["dilation"],
                    zero_init_residual=zero_init,
                )
            else:
                block = NormBasicBlock(
                    in_channels,
                    spec["out_channels"],
                    stride=stride,
                    norm=norm,
                    zero_init_residual=zero_init,
                )
            blocks.append(block)
            in_channels = spec["out_channels"]
        stages.append(blocks)
    return ResNet(
        stem,
        stages,
        out_features=list(cfg.MODEL.RESNETS.OUT_FEATURES),
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
    )
