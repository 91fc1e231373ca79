"""FPN on the d2_norms ResNets, with ``MODEL.FPN.NORM`` taken from the d2_norms registry.

``NormFPN`` keeps detectron2's FPN forward pass, feature names (p2..p7), strides, channels and
parameter names (``fpn_lateral{k}``, ``fpn_output{k}``, their ``.norm``, ``top_block.p6/p7``);
the convs are built for the norm by construction: GNWS -> WS conv, ``MODEL.FPN.NORM: "NF"`` ->
Scaled-WS convs (gain 1: the FPN is linear) with a bias and no activation normalization,
``""`` (detectron2's default, also the default for NF backbones) -> plain convs with a bias.

The RetinaNet P6/P7 block puts the activation paired with ``MODEL.FPN.NORM`` between P6 and P7
(TLU for FRN, ReLU otherwise), so an FRN model has no ReLU left in its backbone.
"""
import math

import fvcore.nn.weight_init as weight_init
from torch import nn

from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.fpn import (FPN, LastLevelMaxPool,
                                             _assert_strides_are_log2_contiguous)

from d2_norms.layers.conv_norm_act import resolve_norm

__all__ = ["NormFPN", "NormLastLevelP6P7", "fpn_conv"]


def fpn_conv(norm, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
             *, input_activation=None) -> nn.Module:
    """One FPN conv with ``norm`` (a name or a ResolvedNorm) attached and no activation (the
    FPN is linear, as in detectron2).

    The conv type follows the norm (the composer, ``d2_norms.layers.conv_norm_act``): plain
    conv (bias only without a norm), WS conv for GNWS, Scaled WS with its own gain and bias for
    "NF" (gamma 1 for a linear input; ``input_activation`` names the nonlinearity feeding the
    conv, if any). Weights start as detectron2's FPN (``c2_xavier_fill``).
    """
    conv = resolve_norm(norm).conv_norm_act(in_channels, out_channels, kernel_size,
                                            stride=stride, padding=kernel_size // 2,
                                            apply_act=False, input_activation=input_activation)
    weight_init.c2_xavier_fill(conv)
    return conv


class NormLastLevelP6P7(nn.Module):
    """RetinaNet's P6 = conv3x3/2(C5), P7 = conv3x3/2(act(P6)), act paired with FPN.NORM.

    No norm on P6/P7 (as detectron2 / the RetinaNet paper); with FPN.NORM "NF" the two convs
    are Scaled WS. The activation is the one paired with ``norm`` (TLU for FRN, else ReLU), so
    an FRN model has no ReLU in its backbone. Parameter names match detectron2's block.
    """

    def __init__(self, in_channels, out_channels, in_feature="res5", norm=""):
        super().__init__()
        self.num_levels = 2
        self.in_feature = in_feature
        resolved = resolve_norm(norm)
        # Only the conv kind carries over: a Scaled WS norm (NF) makes these convs Scaled WS.
        conv_norm = resolved if resolved.conv_kind == "scaled_ws" else ""
        self.p6 = fpn_conv(conv_norm, in_channels, out_channels, 3, stride=2)
        act = resolved.activation(out_channels)
        self.act = nn.Identity() if act is None else act
        self.p7 = fpn_conv(conv_norm, out_channels, out_channels, 3, stride=2,
                           input_activation="relu")

    def forward(self, x):
        p6 = self.p6(x)
        return [p6, self.p7(self.act(p6))]


class NormFPN(FPN):
    """detectron2's FPN with registry-aware convs (see module docstring)."""

    def __init__(self, bottom_up, in_features, out_channels, norm="", top_block=None,
                 fuse_type="sum", square_pad=0):
        # detectron2's FPN.__init__ would build stock convs; NormFPN builds its own and sets
        # every attribute FPN's methods read, on v0.6 and on main (main's ``padding_constraints``
        # reads ``_square_pad``). tests/test_modeling_backbones.py compares the attribute sets.
        Backbone.__init__(self)
        if not isinstance(bottom_up, Backbone):
            raise TypeError(f"bottom_up must be a detectron2 Backbone, got {type(bottom_up)}")
        if not in_features:
            raise ValueError("MODEL.FPN.IN_FEATURES is empty; "
                             "e.g. ['res2', 'res3', 'res4', 'res5'].")
        if fuse_type not in ("sum", "avg"):
            raise ValueError(f"MODEL.FPN.FUSE_TYPE must be 'sum' or 'avg', got {fuse_type!r}.")
        input_shapes = bottom_up.output_shape()
        missing = [f for f in in_features if f not in input_shapes]
        if missing:
            raise ValueError(
                f"MODEL.FPN.IN_FEATURES {list(in_features)} asks for {missing}, which the "
                f"bottom-up network does not output (its outputs: {sorted(input_shapes)}); add them to "
                "MODEL.RESNETS.OUT_FEATURES."
            )
        strides = [input_shapes[f].stride for f in in_features]
        in_channels_per_feature = [input_shapes[f].channels for f in in_features]
        _assert_strides_are_log2_contiguous(strides)

        resolved = resolve_norm(norm)  # once for every conv of the FPN
        lateral_convs, output_convs = [], []
        for idx, in_channels in enumerate(in_channels_per_feature):
            lateral_conv = fpn_conv(resolved, in_channels, out_channels, 1)
            output_conv = fpn_conv(resolved, out_channels, out_channels, 3)
            stage = int(math.log2(strides[idx]))
            self.add_module(f"fpn_lateral{stage}", lateral_conv)
            self.add_module(f"fpn_output{stage}", output_conv)
            lateral_convs.append(lateral_conv)
            output_convs.append(output_conv)
        # Top-down order (low to high resolution), as detectron2's forward expects.
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]
        self.top_block = top_block
        self.in_features = tuple(in_features)
        self.bottom_up = bottom_up
        self._out_feature_strides = {f"p{int(math.log2(s))}": s for s in strides}
        if self.top_block is not None:
            for s in range(stage, stage + self.top_block.num_levels):
                self._out_feature_strides[f"p{s + 1}"] = 2 ** (s + 1)
        self._out_features = list(self._out_feature_strides.keys())
        self._out_feature_channels = {k: out_channels for k in self._out_features}
        self._size_divisibility = strides[-1]
        self._fuse_type = fuse_type
        self._square_pad = square_pad
        self.norm = norm


def build_fpn(cfg, bottom_up, *, retinanet: bool) -> NormFPN:
    """P2-P6 (Mask R-CNN, max-pool P6) or P3-P7 (RetinaNet, P6/P7 convs on C5)."""
    norm = cfg.MODEL.FPN.NORM
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    if retinanet:
        shapes = bottom_up.output_shape()
        if "res5" not in shapes:
            raise ValueError("RetinaNet's P6/P7 are computed from res5: add 'res5' to "
                             "MODEL.RESNETS.OUT_FEATURES.")
        top_block = NormLastLevelP6P7(shapes["res5"].channels, out_channels, "res5", norm=norm)
    else:
        top_block = LastLevelMaxPool()
    return NormFPN(
        bottom_up=bottom_up,
        in_features=list(cfg.MODEL.FPN.IN_FEATURES),
        out_channels=out_channels,
        norm=norm,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
