"""d2_norms' detection heads, registered in detectron2's registries, built right for their norm.

==========================  ============================  ===================================
detectron2 registry          key -> name                   detectron2 original
==========================  ============================  ===================================
``RPN_HEAD_REGISTRY``        ``MODEL.RPN.HEAD_NAME``       ``StandardRPNHead``
                             -> ``D2NormsRPNHead``
``ROI_BOX_HEAD_REGISTRY``    ``MODEL.ROI_BOX_HEAD.NAME``   ``FastRCNNConvFCHead``
                             -> ``D2NormsConvFCHead``
``ROI_MASK_HEAD_REGISTRY``   ``MODEL.ROI_MASK_HEAD.NAME``  ``MaskRCNNConvUpsampleHead``
                             -> ``D2NormsMaskHead``
``META_ARCH_REGISTRY``       ``MODEL.META_ARCHITECTURE``   ``RetinaNet`` (its ``RetinaNetHead``:
                             -> ``D2NormsRetinaNet``       ``D2NormsRetinaNetHead``)
==========================  ============================  ===================================

Each head resolves its norm name once (:func:`d2_norms.layers.conv_norm_act.resolve_norm`) and
builds, from the start, the conv the norm needs (WS for GNWS, Scaled WS for NF, with gamma = the
gain of the nonlinearity feeding it: 1 for FPN / ROI features, ReLU's after a ReLU) and the
norm's paired activation (fused FRN + TLU for FRN, ReLU otherwise). Forward passes, config keys
and parameter names are detectron2's, so checkpoints of detectron2's stock heads with the same
norm (and of d2_norms models from before these heads existed) load unchanged. Each is a
subclass of its detectron2 original that does not run the original's constructor.

A norm a head cannot build is refused when the head is built (:class:`HeadNormError`, naming
the head, the config key and what to use instead).

The RPN head takes a norm from ``MODEL.RPN.NORM`` (added by ``d2_norms.add_d2_norms_config``; default ``""``,
detectron2's plain conv + ReLU). RetinaNet's head shares its norm across pyramid levels, except
BN / SyncBN (and BN_IMG<k>), which keep detectron2's per-level statistics with a shared affine
(``CycleBatchNormList``, as detectron2's ``RetinaNetHead``); the RPN head follows the same rule.
The RoI box / mask heads refuse BN_IMG<k>: their batch holds RoIs, not images.
``MODEL.RETINANET.NORM_PER_LEVEL: True`` gives every RetinaNet subnet layer one whole norm per
pyramid level instead (own statistics and affine; convs shared), as Google's TPU RetinaNet, the
FRN paper's setting: :class:`PerLevelNorm`.
"""
import math
from contextlib import contextmanager
from typing import List, Optional, Tuple

import fvcore.nn.weight_init as weight_init
import numpy as np
import torch
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.layers import ConvTranspose2d, Conv2d, CycleBatchNormList, ShapeSpec
from detectron2.modeling import (META_ARCH_REGISTRY, ROI_BOX_HEAD_REGISTRY, ROI_MASK_HEAD_REGISTRY,
                                 RPN_HEAD_REGISTRY)
from detectron2.modeling.meta_arch.retinanet import RetinaNet, RetinaNetHead
from detectron2.modeling.proposal_generator.rpn import StandardRPNHead
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import BaseMaskRCNNHead, MaskRCNNConvUpsampleHead

from d2_norms.layers import GroupNormDivisibilityError, UnknownNormError, images_per_group_of
from d2_norms.layers.conv_norm_act import ResolvedNorm, resolve_norm
from d2_norms.layers.weight_std import ScaledStdConv2d, WSConv2d, share_standardized_weights

__all__ = [
    "HeadNormError",
    "D2NormsRPNHead",
    "D2NormsConvFCHead",
    "D2NormsMaskHead",
    "D2NormsRetinaNetHead",
    "D2NormsRetinaNet",
    "PerLevelNorm",
    "PerLevelSubnet",
]

# Norms with batch statistics that detectron2's RetinaNetHead keeps per pyramid level (and
# BN_IMG<k>, BatchNorm over groups of k images: see _per_level_statistics).
PER_LEVEL_STATISTICS = ("BN", "SyncBN")


def _per_level_statistics(resolved: ResolvedNorm) -> bool:
    return resolved.name in PER_LEVEL_STATISTICS or images_per_group_of(resolved.name) is not None


def _refuse_image_groups(component: str, key: str, norm) -> None:
    """The RoI heads' batch is RoIs, not images: BN_IMG<k> (groups of k images) cannot apply."""
    k = images_per_group_of(norm)
    if k is not None:
        raise HeadNormError(
            f"{component}: {key}={norm!r} normalizes over groups of {k} images, but this head's "
            "batch holds RoIs (a varying number per image), not images. Use BN (statistics over "
            f"all RoIs of the per-device batch), GN or another norm for {key}; BN_IMG<k> "
            "applies to the backbone, FPN, RPN and RetinaNet heads.")


class HeadNormError(ValueError):
    """A head was asked for a norm it cannot build."""


def _resolve(component: str, key: str, norm) -> ResolvedNorm:
    try:
        return resolve_norm(norm)
    except (UnknownNormError, TypeError) as e:
        raise HeadNormError(
            f"{component}: {key}={norm!r} is not a norm it can build. {e} See "
            "d2_norms.layers.describe_norms() for the names, or register a normalizer with "
            "d2_norms.layers.register_norm.") from e


@contextmanager
def _building(component: str, key: str, norm, width_key: str):
    try:
        yield
    except GroupNormDivisibilityError as e:
        raise HeadNormError(
            f"{component}: {key}={norm!r} cannot normalize this head: {e} Either change "
            f"{width_key}, or set {key} to a GN variant that fits (GN_G<groups>, "
            "GN_C<channels per group>, or add _FALLBACK).") from e


def _hidden_conv(resolved: ResolvedNorm, in_channels: int, out_channels: int, *,
                 num_levels: int, input_activation):
    """A 3x3 conv + norm + activation of a head (detectron2 ``Conv2d`` layout)."""
    if _per_level_statistics(resolved) and num_levels > 1:
        norm = CycleBatchNormList(length=num_levels, bn_class=resolved.spec.factory,
                                  num_features=out_channels)
        return resolved.conv(in_channels, out_channels, 3, padding=1, norm=norm,
                             activation=resolved.activation(out_channels),
                             input_activation=input_activation)
    return resolved.conv_norm_act(in_channels, out_channels, 3, padding=1,
                                  input_activation=input_activation)


def _next_input_activation(resolved: ResolvedNorm):
    # Only a Scaled WS conv reads it (its gamma); other norms may pair with custom activations.
    return resolved.activation_name if resolved.conv_kind == "scaled_ws" else "relu"


def _share_ws_if_any(head: nn.Module) -> None:
    # Heads running the same convs on every level: standardize each weight once per forward.
    if any(isinstance(m, (WSConv2d, ScaledStdConv2d)) for m in head.modules()):
        share_standardized_weights(head)


# ---------------------------------------------------------------------------------------------
# RPN
# ---------------------------------------------------------------------------------------------
@RPN_HEAD_REGISTRY.register()
class D2NormsRPNHead(StandardRPNHead):
    """``StandardRPNHead`` with ``MODEL.RPN.NORM`` on its 3x3 conv(s) (default "": detectron2's).

    Parameter names as detectron2's (``conv.weight``, ``conv.bias``, ``objectness_logits``,
    ``anchor_deltas``; ``conv.conv{k}`` with several ``MODEL.RPN.CONV_DIMS``), plus
    ``conv.norm.*`` / ``conv.gain`` when a norm is set. With "NF" the conv is Scaled WS
    (gamma 1: FPN features come from no nonlinearity), as NF sec. 4 asks of every conv.
    """

    @configurable
    def __init__(self, *, in_channels: int, num_anchors: int, box_dim: int = 4,
                 conv_dims: List[int] = (-1,), norm="", num_levels: int = 1):
        nn.Module.__init__(self)
        component, key = type(self).__name__, "MODEL.RPN.NORM"
        resolved = _resolve(component, key, norm)
        input_activation = None  # FPN outputs
        cur_channels = in_channels
        convs = []
        with _building(component, key, norm, "MODEL.FPN.OUT_CHANNELS / MODEL.RPN.CONV_DIMS"):
            for conv_dim in conv_dims:
                out_channels = cur_channels if conv_dim == -1 else conv_dim
                if out_channels <= 0:
                    raise ValueError(f"{component}: MODEL.RPN.CONV_DIMS must be positive or -1, "
                                     f"got {list(conv_dims)}")
                convs.append(_hidden_conv(resolved, cur_channels, out_channels,
                                          num_levels=num_levels,
                                          input_activation=input_activation))
                input_activation = _next_input_activation(resolved)
                cur_channels = out_channels
        if len(convs) == 1:  # detectron2's names: "conv", or "conv.conv{k}"
            self.conv = convs[0]
        else:
            self.conv = nn.Sequential()
            for k, conv in enumerate(convs):
                self.conv.add_module(f"conv{k}", conv)
        self.objectness_logits = nn.Conv2d(cur_channels, num_anchors, kernel_size=1, stride=1)
        self.anchor_deltas = nn.Conv2d(cur_channels, num_anchors * box_dim, kernel_size=1,
                                       stride=1)
        for layer in self.modules():  # detectron2's init, in its order
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                if layer.bias is not None:
                    nn.init.constant_(layer.bias, 0)
        _share_ws_if_any(self)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["norm"] = cfg.MODEL.RPN.get("NORM", "")
        ret["num_levels"] = len(input_shape)
        return ret


# ---------------------------------------------------------------------------------------------
# ROI box head (4conv1fc)
# ---------------------------------------------------------------------------------------------
@ROI_BOX_HEAD_REGISTRY.register()
class D2NormsConvFCHead(FastRCNNConvFCHead):
    """``FastRCNNConvFCHead`` (e.g. 4conv1fc, GN paper sec. 6.1) with its convs built for
    ``MODEL.ROI_BOX_HEAD.NORM``: ``conv{k}`` (+ ``.norm``), ``flatten``, ``fc{k}``,
    ``fc_relu{k}`` as detectron2. The first conv reads ROI features (Scaled WS gamma 1)."""

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, conv_dims: List[int], fc_dims: List[int],
                 conv_norm=""):
        nn.Sequential.__init__(self)
        component, key = type(self).__name__, "MODEL.ROI_BOX_HEAD.NORM"
        if len(conv_dims) + len(fc_dims) == 0:
            raise ValueError(f"{component}: MODEL.ROI_BOX_HEAD.NUM_CONV and NUM_FC are both 0; "
                             "set at least one (4conv1fc: NUM_CONV 4, NUM_FC 1).")
        _refuse_image_groups(component, key, conv_norm)
        resolved = _resolve(component, key, conv_norm)
        if resolved.has_norm and not conv_dims:
            raise HeadNormError(
                f"{component}: {key}={conv_norm!r} but MODEL.ROI_BOX_HEAD.NUM_CONV is 0, so "
                "no layer would be normalized; use the 4conv1fc head (NUM_CONV: 4, NUM_FC: 1) "
                f"or set {key} to \"\".")
        self._output_size = (input_shape.channels, input_shape.height, input_shape.width)
        self.conv_norm_relus = []
        input_activation = None  # pooled FPN features
        with _building(component, key, conv_norm, "MODEL.ROI_BOX_HEAD.CONV_DIM"):
            for k, conv_dim in enumerate(conv_dims):
                conv = _hidden_conv(resolved, self._output_size[0], conv_dim, num_levels=1,
                                    input_activation=input_activation)
                input_activation = _next_input_activation(resolved)
                self.add_module(f"conv{k + 1}", conv)
                self.conv_norm_relus.append(conv)
                self._output_size = (conv_dim, self._output_size[1], self._output_size[2])
        self.fcs = []
        for k, fc_dim in enumerate(fc_dims):
            if k == 0:
                self.add_module("flatten", nn.Flatten())
            fc = nn.Linear(int(np.prod(self._output_size)), fc_dim)
            self.add_module(f"fc{k + 1}", fc)
            self.add_module(f"fc_relu{k + 1}", nn.ReLU())
            self.fcs.append(fc)
            self._output_size = fc_dim
        for layer in self.conv_norm_relus:
            weight_init.c2_msra_fill(layer)
        for layer in self.fcs:
            weight_init.c2_xavier_fill(layer)


# ---------------------------------------------------------------------------------------------
# ROI mask head
# ---------------------------------------------------------------------------------------------
@ROI_MASK_HEAD_REGISTRY.register()
class D2NormsMaskHead(MaskRCNNConvUpsampleHead):
    """``MaskRCNNConvUpsampleHead`` with ``mask_fcn{k}`` built for ``MODEL.ROI_MASK_HEAD.NORM``;
    ``deconv`` (+ ``deconv_relu``) and ``predictor`` as detectron2 (no norm there)."""

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, num_classes, conv_dims, conv_norm="",
                 **kwargs):
        BaseMaskRCNNHead.__init__(self, **kwargs)  # loss weight, vis period; nn.Sequential
        component, key = type(self).__name__, "MODEL.ROI_MASK_HEAD.NORM"
        if len(conv_dims) < 1:
            raise ValueError(f"{component}: conv_dims must hold at least the deconv width")
        _refuse_image_groups(component, key, conv_norm)
        resolved = _resolve(component, key, conv_norm)
        if resolved.has_norm and len(conv_dims) == 1:
            raise HeadNormError(
                f"{component}: {key}={conv_norm!r} but MODEL.ROI_MASK_HEAD.NUM_CONV is 0, so "
                f"no layer would be normalized; set NUM_CONV (4 in Mask R-CNN) or {key} to \"\".")
        self.conv_norm_relus = []
        cur_channels = input_shape.channels
        input_activation = None  # pooled FPN features
        with _building(component, key, conv_norm, "MODEL.ROI_MASK_HEAD.CONV_DIM"):
            for k, conv_dim in enumerate(conv_dims[:-1]):
                conv = _hidden_conv(resolved, cur_channels, conv_dim, num_levels=1,
                                    input_activation=input_activation)
                input_activation = _next_input_activation(resolved)
                self.add_module(f"mask_fcn{k + 1}", conv)
                self.conv_norm_relus.append(conv)
                cur_channels = conv_dim
        self.deconv = ConvTranspose2d(cur_channels, conv_dims[-1], kernel_size=2, stride=2,
                                      padding=0)
        self.add_module("deconv_relu", nn.ReLU())
        self.predictor = Conv2d(conv_dims[-1], num_classes, kernel_size=1, stride=1, padding=0)
        for layer in self.conv_norm_relus + [self.deconv]:
            weight_init.c2_msra_fill(layer)
        nn.init.normal_(self.predictor.weight, std=0.001)
        if self.predictor.bias is not None:
            nn.init.constant_(self.predictor.bias, 0)


# ---------------------------------------------------------------------------------------------
# RetinaNet
# ---------------------------------------------------------------------------------------------
class PerLevelNorm(nn.ModuleList):
    """One norm module per pyramid level, in one subnet slot of :class:`D2NormsRetinaNetHead`.

    ``MODEL.RETINANET.NORM_PER_LEVEL: True``: the subnet's convs are shared by all levels (as in
    detectron2 and Google's TPU RetinaNet), its norm is not: level ``l`` (0 = the first entry of
    ``MODEL.RETINANET.IN_FEATURES``, P3) goes through ``self[l]``, a whole norm of its own
    (statistics *and* affine; for FRN the fused FRN + TLU with its own gamma, beta, tau and,
    for FRN_LEPS, its learned eps). The TPU RetinaNet names them ``class-{i}-bn-{level}``.

    Parameter names: the module sits where the shared norm sat, so its entries are
    ``head.cls_subnet.{k}.{l}.<name>`` / ``head.bbox_subnet.{k}.{l}.<name>`` with ``k`` the slot
    (``3i + 1`` for layer ``i``; ``3i + 2`` for an activation with parameters, see
    :meth:`D2NormsRetinaNetHead._layer`), ``l`` the level and ``<name>`` the norm's own names
    (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked`` for BN;
    ``weight``, ``bias`` for GN; ``weight``, ``bias``, ``tau`` (+ ``eps_l``, FRN_LEPS) for FRN).

    The level is an argument, not a counter (``CycleBatchNormList`` counts calls): the head's
    forward passes each level's index, so no state can drift (a forward raising midway leaves
    nothing behind, a subnet called once more cannot shift later levels), and the module scripts
    as well as traces. Called without a level it raises: run it through
    :class:`PerLevelSubnet` / the head's forward.
    """

    def __init__(self, modules):
        super().__init__(modules)
        self.num_levels = len(self)  # an attribute TorchScript can read (not len(ModuleList))
        self.d2n_per_level = True  # the marker the scripted head forward tests (hasattr)

    def forward(self, x: Tensor, level: Optional[int] = None) -> Tensor:
        if level is None:
            raise RuntimeError(
                "PerLevelNorm holds one norm per pyramid level and needs the level: call the "
                "subnet as subnet(x, level) (D2NormsRetinaNetHead.forward does), not subnet(x)")
        out = x
        found = False
        for i, norm in enumerate(self):  # an index loop TorchScript can compile
            if i == level:
                out = norm(x)
                found = True
        if not found:
            raise IndexError(
                f"PerLevelNorm: level {level} out of range for {self.num_levels} levels")
        return out

    def extra_repr(self) -> str:
        return f"levels={self.num_levels}"


class PerLevelSubnet(nn.Sequential):
    """A RetinaNet subnet (``nn.Sequential`` layout and names) holding :class:`PerLevelNorm`
    slots; ``forward(x, level)`` passes the level to them and ``x`` alone to every other layer."""

    def forward(self, x: Tensor, level: Optional[int] = None) -> Tensor:
        if level is None:
            raise RuntimeError(
                "this RetinaNet subnet has one norm per pyramid level "
                "(MODEL.RETINANET.NORM_PER_LEVEL): call it as subnet(x, level)")
        for layer in self:
            if hasattr(layer, "d2n_per_level"):  # a PerLevelNorm
                x = layer(x, level)
            else:
                x = layer(x)
        return x


class D2NormsRetinaNetHead(RetinaNetHead):
    """``RetinaNetHead`` with subnets built for ``MODEL.RETINANET.NORM``.

    Each subnet is ``nn.Sequential`` of (conv, norm, activation) per layer, as detectron2's, so
    the names are ``cls_subnet.{3i}`` (conv), ``.{3i+1}`` (norm), ``.{3i+2}`` (activation);
    without a norm (conv, ReLU) pairs. A norm with a fused activation (FRN + TLU) sits in the
    norm slot and the activation slot is ``nn.Identity``; a Scaled WS norm (NF) leaves the norm
    slot ``nn.Identity`` (its conv carries gain and bias). Plain convs are ``torch.nn.Conv2d``
    as in detectron2.

    Norms across pyramid levels (``MODEL.RETINANET.NORM_PER_LEVEL``, ``norm_per_level``):

    * ``False`` (default, detectron2's layout, names unchanged): one norm module per layer shared
      by all levels, except BN / SyncBN: per-level statistics with one shared affine
      (``CycleBatchNormList``: ``cls_subnet.{k}.weight``, ``cls_subnet.{k}.{l}.running_mean``).
    * ``True``: the subnets are :class:`PerLevelSubnet` and each norm slot a
      :class:`PerLevelNorm`, one whole norm per level (``cls_subnet.{k}.{l}.weight`` ...; an
      activation with parameters of its own is made per level too). Every normalizer (BN,
      SyncBN, GN, GNWS, FRN, FRN_LEPS, registered ones); no effect with "NF" (no norm module:
      the Scaled WS conv carries gain and bias, shared like every conv) or "".
    """

    @configurable
    def __init__(self, *, input_shape: List[ShapeSpec], num_classes, num_anchors,
                 conv_dims: List[int], norm="", prior_prob=0.01, norm_per_level: bool = False):
        nn.Module.__init__(self)
        component, key = type(self).__name__, "MODEL.RETINANET.NORM"
        if not conv_dims:
            raise ValueError(f"{component}: MODEL.RETINANET.NUM_CONVS must be at least 1")
        self._num_features = len(input_shape)
        self._norm_per_level = bool(norm_per_level)
        resolved = _resolve(component, key, norm)
        with _building(component, key, norm, "MODEL.FPN.OUT_CHANNELS"):
            cls_subnet, bbox_subnet = [], []
            in_dims = [input_shape[0].channels] + list(conv_dims)
            input_activation = None  # FPN outputs
            for in_channels, out_channels in zip(in_dims, conv_dims):
                for subnet in (cls_subnet, bbox_subnet):
                    subnet.extend(self._layer(resolved, in_channels, out_channels,
                                              input_activation))
                input_activation = _next_input_activation(resolved)
        per_level = any(isinstance(m, PerLevelNorm) for m in cls_subnet)
        subnet_cls = PerLevelSubnet if per_level else nn.Sequential
        self.cls_subnet = subnet_cls(*cls_subnet)
        self.bbox_subnet = subnet_cls(*bbox_subnet)
        self.cls_score = nn.Conv2d(conv_dims[-1], num_anchors * num_classes, kernel_size=3,
                                   stride=1, padding=1)
        self.bbox_pred = nn.Conv2d(conv_dims[-1], num_anchors * 4, kernel_size=3, stride=1,
                                   padding=1)
        for modules in (self.cls_subnet, self.bbox_subnet, self.cls_score, self.bbox_pred):
            for layer in modules.modules():  # detectron2's init, in its order
                if isinstance(layer, nn.Conv2d):
                    torch.nn.init.normal_(layer.weight, mean=0, std=0.01)
                    if layer.bias is not None:
                        torch.nn.init.constant_(layer.bias, 0)
        torch.nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))
        _share_ws_if_any(self)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        ret["norm_per_level"] = bool(cfg.MODEL.RETINANET.get("NORM_PER_LEVEL", False))
        return ret

    def forward(self, features: List[Tensor]):
        """detectron2's ``RetinaNetHead.forward``; per-level subnets also get the level index.

        Eager and traced: each subnet is called as a module (``subnet(x)``, or
        ``subnet(x, level)`` for a :class:`PerLevelSubnet`), so its hooks run as in detectron2.
        Scripted: the same layers in the same order, written out per layer (TorchScript resolves
        the per-level slots statically).
        """
        assert len(features) == self._num_features
        if not torch.jit.is_scripting():
            return self._forward_eager(features)
        logits = []
        bbox_reg = []
        for level, feature in enumerate(features):
            x = feature
            for layer in self.cls_subnet:
                if hasattr(layer, "d2n_per_level"):  # PerLevelNorm (static in TorchScript)
                    x = layer(x, level)
                else:
                    x = layer(x)
            logits.append(self.cls_score(x))
            x = feature
            for layer in self.bbox_subnet:
                if hasattr(layer, "d2n_per_level"):  # PerLevelNorm (static in TorchScript)
                    x = layer(x, level)
                else:
                    x = layer(x)
            bbox_reg.append(self.bbox_pred(x))
        return logits, bbox_reg

    @torch.jit.unused
    def _forward_eager(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        per_level = isinstance(self.cls_subnet, PerLevelSubnet)
        logits = []
        bbox_reg = []
        for level, feature in enumerate(features):
            if per_level:
                logits.append(self.cls_score(self.cls_subnet(feature, level)))
                bbox_reg.append(self.bbox_pred(self.bbox_subnet(feature, level)))
            else:
                logits.append(self.cls_score(self.cls_subnet(feature)))
                bbox_reg.append(self.bbox_pred(self.bbox_subnet(feature)))
        return logits, bbox_reg

    def _per_level(self, build):
        """``PerLevelNorm`` of ``build()`` once per level (None when ``build()`` gives None)."""
        first = build()
        if first is None:
            return None
        return PerLevelNorm([first] + [build() for _ in range(self._num_features - 1)])

    def _layer(self, resolved: ResolvedNorm, in_channels, out_channels, input_activation):
        conv = resolved.conv(in_channels, out_channels, 3, stride=1, padding=1, bias=True,
                             input_activation=input_activation, plain_cls=nn.Conv2d)
        if not resolved.has_norm:
            return [conv, resolved.activation(out_channels) or nn.Identity()]
        if resolved.fuses_activation and resolved.conv_kind != "scaled_ws":
            if self._norm_per_level:
                norm = self._per_level(lambda: resolved.norm_with_activation(out_channels))
            else:
                norm = resolved.norm_with_activation(out_channels)
            return [conv, norm, nn.Identity()]
        norm = self._subnet_norm(resolved, out_channels)
        act = resolved.activation(out_channels)
        if (self._norm_per_level and act is not None
                and any(True for _ in act.parameters())):
            # e.g. a TLU registered apart from its norm: its tau belongs to the normalizer
            acts = [act] + [resolved.activation(out_channels)
                            for _ in range(self._num_features - 1)]
            act = PerLevelNorm(acts)
        return [conv, norm if norm is not None else nn.Identity(),
                act if act is not None else nn.Identity()]

    def _subnet_norm(self, resolved: ResolvedNorm, channels: int):
        """The norm of one subnet layer (None: no norm module, e.g. NF). ``norm_per_level``:
        one whole norm per level (:class:`PerLevelNorm`); otherwise one shared by all levels,
        with per-level BN / SyncBN statistics (``CycleBatchNormList``, detectron2's)."""
        if self._norm_per_level:
            return self._per_level(lambda: resolved.norm(channels))
        if _per_level_statistics(resolved):
            return CycleBatchNormList(length=self._num_features, bn_class=resolved.spec.factory,
                                      num_features=channels)
        return resolved.norm(channels)


@META_ARCH_REGISTRY.register()
class D2NormsRetinaNet(RetinaNet):
    """detectron2's ``RetinaNet`` whose head is :class:`D2NormsRetinaNetHead`.

    Everything else (backbone, anchors, matcher, losses, inference) comes from detectron2's
    ``RetinaNet.from_config`` (same on detectron2 v0.6 and main: the head is a constructor
    argument). That function also builds a stock head; it is given a minimal one (one conv per
    subnet, no norm: cheap, and valid for any norm name) and replaced here.
    """

    @classmethod
    def from_config(cls, cfg):
        from d2_norms.config_checks import check_norm_field_applied

        check_norm_field_applied(cfg)
        stock = cfg.clone()
        stock.defrost()
        stock.MODEL.RETINANET.NORM = ""
        stock.MODEL.RETINANET.NUM_CONVS = 1
        ret = super().from_config(stock)
        shapes = ret["backbone"].output_shape()
        ret["head"] = D2NormsRetinaNetHead(
            cfg, [shapes[f] for f in cfg.MODEL.RETINANET.IN_FEATURES])
        return ret
