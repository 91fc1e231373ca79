"""Normalizers by name, and how Detectron2 reaches them.

Registered names (``describe_norms()`` prints this table with descriptions):

================  =========================================  ===========  ======================
name              get_norm(name, C)                          activation   conv (make_conv)
================  =========================================  ===========  ======================
``""``            None                                       ReLU         plain
``BN``            BatchNorm2d                                ReLU         plain
``SyncBN``        SyncBatchNorm (gloo/CPU-capable)            ReLU         plain
``FrozenBN``      detectron2 FrozenBatchNorm2d                ReLU         plain
``GN``            GroupNorm, G=32                            ReLU         plain
``GNWS``          GroupNorm, G=32                            ReLU         WSConv2d
``FRN``           FRN without TLU                            TLU (fused)  plain
``FRN_LEPS``      FRN without TLU, learned eps (sec. 3.3)    TLU (fused)  plain
``NF``            ChannelAffine (gain+bias, no statistics)   ReLU         ScaledStdConv2d
================  =========================================  ===========  ======================

plus ``GN_G<G>`` / ``GN_C<k>`` / ``GNWS_G<G>`` / ``GNWS_C<k>`` (G groups or k channels per group,
GN Table 3), each with an optional ``_FALLBACK`` suffix (largest dividing G instead of an error),
and detectron2's debugging names ``nnSyncBN``, ``naiveSyncBN``, ``naiveSyncBN_N``.

API
---
``get_norm(name_or_callable, channels)``
    The norm module for a name (``None`` for ``""``/None); a callable is called with
    ``channels``. Unknown names raise :class:`UnknownNormError` listing the registered ones.
``get_norm_act(name, channels, apply_act=True)``
    The norm with its paired activation as one module: ReLU for BN-like/GN/GNWS/NF, TLU for FRN
    (FRN+TLU fused in one op), just ``nn.ReLU()`` for ``""``. ``apply_act=False`` gives the norm
    alone (``nn.Identity()`` for ``""``).
``register_norm(name, *, activation="relu", conv="plain", norm_act=None)``
    Decorator registering a factory ``channels -> nn.Module``. ``activation`` is ``"relu"``,
    ``None`` or a factory ``channels -> nn.Module`` (e.g. ``TLU``); ``norm_act`` optionally
    builds norm+activation as one module; ``conv`` is ``"plain"``, ``"ws"`` or ``"scaled_ws"``.
``norm_conv_kind(name)``, ``norm_uses_weight_standardization(name)``
    Which convolution the norm expects before it.
``make_conv(in_channels, out_channels, kernel_size, *, norm="", activation=False, ...)``
    The conv a backbone/head should build for a norm name: a detectron2 ``Conv2d`` (plain),
    :class:`WSConv2d` (``"ws"``) or :class:`ScaledStdConv2d` (``"scaled_ws"``), with the norm
    attached as ``conv.norm`` (norm+activation when ``activation=True``). Padding defaults to
    "same", bias defaults to "only when no norm shifts the output". Scaled WS convs carry their
    own gain and bias (NF sec. 4.4), so no norm module is attached to them; their gamma is
    ``activation_gain(input_activation)``, the gain of the nonlinearity that feeds the conv
    (``input_activation=None`` for inputs that do not come from one, e.g. the image).

Detectron2 integration (:func:`patch_detectron2`, run on ``import d2_norms.layers``)
-------------------------------------------------------------------------------------
* ``detectron2.layers.get_norm`` and every module-level binding of the original function in an
  imported module (detectron2's blocks, aspp, resnet, fpn, regnet, box/mask heads, RetinaNet,
  semantic seg; third-party projects imported earlier) are replaced by :func:`get_norm`, so stock components honour the names from
  YAML (``MODEL.RESNETS.NORM``, ``MODEL.FPN.NORM``, ``MODEL.RETINANET.NORM``,
  ``MODEL.ROI_BOX_HEAD.NORM``, ``MODEL.ROI_MASK_HEAD.NORM``) and LazyConfig ``norm=`` values.
  Modules imported later get it because they import it from ``detectron2.layers``. What is
  bound there is :func:`detectron2_get_norm`: names detectron2 itself knows (BN, SyncBN,
  FrozenBN, GN, LN, ... and callables) go to detectron2's own function, so importing d2_norms
  changes no stock model (same classes, nothing for :func:`adapt_norms` to do); only the other
  names (FRN, GNWS, NF, GN_G<G>, ...) come from this registry.
* RetinaNet v0.6 trap: ``RetinaNetHead.__init__`` calls ``get_norm(norm, 1)`` only to read the
  layer type (GroupNorm(32, 1) would fail). RetinaNet's binding recognises that probe (a call
  from ``RetinaNetHead.__init__`` before its subnets exist) and builds the norm at the width of
  the head's real layers instead, so every name works and a width that G does not divide still
  gets the clear error. On detectron2 versions without the trap it changes nothing.
* Activation pairing: after the stock components below are constructed, :func:`adapt_norms`
  rewrites them so that (1) a norm whose paired activation is not ReLU (FRN: TLU) replaces the
  ReLU that follows it - the norm becomes norm+TLU (one fused op) and the ReLU is removed, so
  no ReLU runs after TLU; (2) convs before a ``"ws"`` norm become :class:`WSConv2d`; (3) convs
  before ``"NF"`` become :class:`ScaledStdConv2d` (gamma from the preceding ReLU, else 1).
  Components: ``RetinaNetHead`` (subnets), ``FastRCNNConvFCHead`` and
  ``MaskRCNNConvUpsampleHead`` (convs), ``FPN``, ``SemSegFPNHead``, ResNet ``BasicStem``,
  ``BasicBlock``, ``BottleneckBlock`` (stock classes: their functional ReLU after conv1/conv2 is
  skipped where the norm carries TLU; the ReLU after the residual addition stays - no TLU
  precedes it). :func:`adapt_norms` is public for custom models.
"""
import inspect
import logging
import re
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .frn import TLU, FilterResponseNorm2d
from .group_norm import GroupNorm
from .weight_std import ScaledStdConv2d, WSConv2d, activation_gain, share_standardized_weights

__all__ = [
    "NormSpec",
    "UnknownNormError",
    "ChannelAffine",
    "SyncBatchNorm",
    "NormAct",
    "register_norm",
    "unregister_norm",
    "registered_norms",
    "describe_norms",
    "get_norm_spec",
    "get_norm",
    "get_norm_act",
    "norm_conv_kind",
    "norm_uses_weight_standardization",
    "make_conv",
    "adapt_norms",
    "patch_detectron2",
    "detectron2_get_norm",
    "norm_name_of",
]

logger = logging.getLogger(__name__)

CONV_KINDS = ("plain", "ws", "scaled_ws")
_NAME_ATTR = "_d2_norms_name"  # set on every module get_norm/get_norm_act builds
_CHANNELS_ATTR = "_d2_norms_channels"
_WITH_ACT_ATTR = "_d2_norms_with_act"  # the module applies the paired activation itself


class UnknownNormError(ValueError):
    """A norm name that is not registered."""


@dataclass(frozen=True)
class NormSpec:
    """What a registered name means.

    factory: ``channels -> nn.Module or None`` (the norm alone).
    activation: ``"relu"``, ``None`` (no activation) or ``channels -> nn.Module``.
    norm_act: optional ``channels -> nn.Module`` building norm + activation as one module.
    conv: ``"plain"``, ``"ws"`` or ``"scaled_ws"``.
    """

    name: str
    factory: Callable[[int], Optional[nn.Module]]
    activation: Union[str, None, Callable[[int], nn.Module]] = "relu"
    norm_act: Optional[Callable[[int], nn.Module]] = None
    conv: str = "plain"
    description: str = ""

    @property
    def pairs_with_relu(self) -> bool:
        return self.activation == "relu" and self.norm_act is None

    def build_activation(self, channels: int) -> Optional[nn.Module]:
        if self.activation is None:
            return None
        if self.activation == "relu":
            return nn.ReLU()
        if isinstance(self.activation, str):
            raise ValueError(f"norm {self.name!r}: unknown activation {self.activation!r}")
        return self.activation(channels)


_REGISTRY: "OrderedDict[str, NormSpec]" = OrderedDict()
_LOCK = threading.Lock()
_FAMILY = re.compile(r"^(GN|GNWS)(?:_G(\d+)|_C(\d+))?(_FALLBACK)?$")


class NormAct(nn.Sequential):
    """A norm followed by its activation (children ``norm`` and ``act``)."""

    def __init__(self, norm: Optional[nn.Module], act: Optional[nn.Module]):
        mods = OrderedDict()
        if norm is not None:
            mods["norm"] = norm
        if act is not None:
            mods["act"] = act
        super().__init__(mods)


class ChannelAffine(nn.Module):
    """Per-channel ``gain * x + bias`` without statistics: the "NF" entry for stock layers.

    Stock detectron2 layers drop the conv bias whenever a norm is named; with "NF" (no
    activation normalization, NF paper) this restores the shift and the affine gain of sec. 4.4.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.bias.view(shape).to(x.dtype), x,
                             self.weight.view(shape).to(x.dtype))

    def extra_repr(self):
        return str(self.num_features)


class SyncBatchNorm(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm``, plus synchronisation on devices it does not support (CPU/gloo).

    torch's SyncBatchNorm raises on CPU tensors when a process group of size > 1 exists; then
    the cross-process statistics of detectron2's NaiveSyncBatchNorm (weighted by batch size)
    are used, so multi-process CPU training works with the same name as GPU training.
    """

    _NATIVE_DEVICES = ("cuda", "hpu", "xpu")

    def forward(self, x):
        if self.training and x.device.type not in self._NATIVE_DEVICES:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                from detectron2.layers.batch_norm import NaiveSyncBatchNorm

                self._stats_mode = "N"
                return NaiveSyncBatchNorm.forward(self, x)
        return super().forward(x)


def _check_name(name):
    if not isinstance(name, str):
        raise TypeError(f"norm names are strings, got {type(name).__name__}")


def register_norm(name: str, *, activation: Union[str, None, Callable] = "relu",
                  conv: str = "plain", norm_act: Optional[Callable[[int], nn.Module]] = None,
                  description: str = "", overwrite: bool = False):
    """Decorator registering ``factory(channels) -> nn.Module`` under ``name``.

    Example::

        @register_norm("MyNorm", activation=lambda c: nn.SiLU())
        def my_norm(channels):
            return MyNorm(channels)

    After this, ``MODEL.*.NORM: "MyNorm"`` works in every stock detectron2 component, and
    ``get_norm_act("MyNorm", C)`` gives ``MyNorm`` + SiLU (replacing stock ReLUs after it).
    """
    _check_name(name)
    if name == "":
        raise ValueError("the empty norm name means 'no norm' and cannot be registered")
    if conv not in CONV_KINDS:
        raise ValueError(f"register_norm({name!r}): conv must be one of {CONV_KINDS}, got {conv!r}")
    if isinstance(activation, str) and activation != "relu":
        raise ValueError(f"register_norm({name!r}): activation must be 'relu', None or a "
                         f"factory channels -> nn.Module, got {activation!r}")

    def decorator(factory):
        if not callable(factory):
            raise TypeError(f"register_norm({name!r}) decorates a callable channels -> nn.Module")
        with _LOCK:
            if name in _REGISTRY and not overwrite:
                raise ValueError(f"norm {name!r} is already registered "
                                 f"({_REGISTRY[name].description or _REGISTRY[name].factory}); "
                                 "pass overwrite=True to replace it")
            doc = description or (factory.__doc__ or "").strip().split("\n")[0]
            _REGISTRY[name] = NormSpec(name, factory, activation, norm_act, conv, doc)
        return factory

    return decorator


def unregister_norm(name: str) -> None:
    """Remove a registered name (tests / plugins that re-register)."""
    with _LOCK:
        _REGISTRY.pop(name, None)


def registered_norms():
    """Registered names, in registration order ("" first)."""
    return list(_REGISTRY)


def describe_norms() -> str:
    lines = [f"{name:16s} act={_act_str(s):6s} conv={s.conv:9s} {s.description}"
             for name, s in _REGISTRY.items()]
    lines.append("GN_G<G>, GN_C<k>, GNWS_G<G>, GNWS_C<k> (+ _FALLBACK): parametric GroupNorm")
    return "\n".join(lines)


def _act_str(spec):
    if spec.norm_act is not None:
        return "fused"
    if spec.activation is None:
        return "none"
    return spec.activation if isinstance(spec.activation, str) else "custom"


def _family_spec(name: str) -> Optional[NormSpec]:
    m = _FAMILY.match(name)
    if m is None or (m.group(2) is None and m.group(3) is None and m.group(4) is None):
        return None
    base, groups, cpg, fb = m.groups()
    fallback = "largest_divisor" if fb else "error"
    if groups is not None:
        kwargs = {"num_groups": int(groups)}
    elif cpg is not None:
        kwargs = {"channels_per_group": int(cpg)}
    else:
        kwargs = {"num_groups": 32}

    def factory(channels):
        return GroupNorm(channels, fallback=fallback, **kwargs)

    what = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    return NormSpec(name, factory, "relu", None, "ws" if base == "GNWS" else "plain",
                    f"GroupNorm({what}, fallback={fallback})")


def get_norm_spec(name: str) -> NormSpec:
    """The :class:`NormSpec` of a registered (or parametric GN) name; raises UnknownNormError."""
    _check_name(name)
    spec = _REGISTRY.get(name)
    if spec is None:
        spec = _family_spec(name)
    if spec is None:
        raise UnknownNormError(_unknown_message(name))
    return spec


def _unknown_message(name):
    names = ", ".join(repr(n) for n in _REGISTRY)
    hint = ""
    lowered = {n.lower(): n for n in _REGISTRY}
    if name.lower() in lowered:
        hint = f" Did you mean {lowered[name.lower()]!r}? (names are case-sensitive)"
    return (f"Unknown norm {name!r}.{hint} Registered norms: {names}; parametric: GN_G<groups>, "
            "GN_C<channels per group>, GNWS_G<groups>, GNWS_C<channels per group> (optionally "
            "with a _FALLBACK suffix). Register your own with "
            "@d2_norms.layers.register_norm(name).")


def _mark(module, name, channels, with_act):
    if isinstance(module, nn.Module):
        object.__setattr__(module, _NAME_ATTR, name)
        object.__setattr__(module, _CHANNELS_ATTR, channels)
        object.__setattr__(module, _WITH_ACT_ATTR, with_act)
    return module


def norm_name_of(module) -> Optional[str]:
    """The registered name a module was built for by get_norm/get_norm_act (or None)."""
    return getattr(module, _NAME_ATTR, None)


def _original_get_norm():
    return _PATCH_STATE.get("original")


def _check_channels(channels):
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"get_norm: channels must be a positive int, got {channels!r}")


def get_norm(norm, out_channels):
    """The normalization layer for ``norm`` (a registered name or a callable), or None.

    Args:
        norm: ``""``/None (no norm), a registered name (see module docstring) or a callable
            ``channels -> nn.Module``.
        out_channels: the width of the layer to normalize.
    """
    if norm is None:
        return None
    if isinstance(norm, str):
        if len(norm) == 0:
            return None
        _check_channels(out_channels)
        try:
            spec = get_norm_spec(norm)
        except UnknownNormError:
            original = _original_get_norm()
            if original is not None:  # names only a newer detectron2 knows (e.g. "LN")
                try:
                    return original(norm, out_channels)
                except KeyError:
                    pass
            raise
        return _mark(spec.factory(out_channels), spec.name, out_channels, False)
    if callable(norm):
        return norm(out_channels)
    raise TypeError(f"norm must be a name (str), a callable or None, got {type(norm).__name__}")


def get_norm_act(norm, channels: int, apply_act: bool = True) -> nn.Module:
    """The norm with its paired activation as one module (see module docstring).

    ``norm`` may also be a callable ``channels -> nn.Module`` (paired with ReLU). Always returns a
    module: ``nn.ReLU()`` for ``""`` with ``apply_act``, ``nn.Identity()`` without.
    """
    if norm is None or norm == "" or not isinstance(norm, str):
        mod = get_norm(norm, channels) if norm not in (None, "") else None
        act = nn.ReLU() if apply_act else None
        if mod is None:
            return act if act is not None else nn.Identity()
        return NormAct(mod, act) if act is not None else mod
    _check_channels(channels)
    try:
        spec = get_norm_spec(norm)
    except UnknownNormError:
        mod = get_norm(norm, channels)  # may resolve through detectron2's own names
        return NormAct(mod, nn.ReLU()) if apply_act else mod
    if not apply_act:
        mod = spec.factory(channels)
        return _mark(mod, spec.name, channels, False) if mod is not None else nn.Identity()
    if spec.norm_act is not None:
        return _mark(spec.norm_act(channels), spec.name, channels, True)
    mod = spec.factory(channels)
    if mod is not None:
        _mark(mod, spec.name, channels, False)
    act = spec.build_activation(channels)
    if mod is None:
        return act if act is not None else nn.Identity()
    if act is None:
        return mod
    return _mark(NormAct(mod, act), spec.name, channels, True)


def norm_conv_kind(norm) -> str:
    """``"plain"``, ``"ws"`` or ``"scaled_ws"``: the conv a norm name expects before it."""
    if norm is None or norm == "" or not isinstance(norm, str):
        return "plain"
    try:
        return get_norm_spec(norm).conv
    except UnknownNormError:
        if _original_get_norm() is not None:
            return "plain"
        raise


def norm_uses_weight_standardization(norm) -> bool:
    """True when convs before this norm are Weight-Standardized (:class:`WSConv2d`, e.g. GNWS).

    "NF" uses Scaled WS instead (``norm_conv_kind(name) == "scaled_ws"``), which is False here.
    """
    return norm_conv_kind(norm) == "ws"


def make_conv(in_channels: int, out_channels: int, kernel_size, *, norm="", stride=1,
              padding=None, dilation=1, groups=1, bias: Optional[bool] = None,
              activation: bool = False, input_activation: Optional[str] = "relu",
              **conv_kwargs) -> nn.Module:
    """The conv (plus norm, plus optionally activation) a layer with norm ``norm`` should use.

    Returns a detectron2 ``Conv2d`` / :class:`WSConv2d` / :class:`ScaledStdConv2d` whose forward
    is ``conv -> conv.norm -> conv.activation``. ``activation=True`` attaches the paired
    activation (ReLU, or TLU fused into the FRN norm). ``input_activation`` names the
    nonlinearity producing this conv's input, used only for Scaled WS's gamma (None -> 1.0).
    ``padding=None`` is "same" for odd kernels; ``bias=None`` means bias only when nothing after
    the conv adds a shift (no norm, or Scaled WS which has its own bias).
    """
    from .weight_std import _BaseConv2d, _same_padding

    kind = norm_conv_kind(norm)
    if padding is None:
        padding = _same_padding(kernel_size, dilation)
    common = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if kind == "scaled_ws":
        gamma = 1.0 if input_activation is None else activation_gain(input_activation)
        spec = get_norm_spec(norm)
        act = spec.build_activation(out_channels) if activation else None
        return ScaledStdConv2d(in_channels, out_channels, kernel_size,
                               bias=True if bias is None else bias, gamma=gamma, activation=act,
                               **common, **conv_kwargs)
    if activation:
        norm_mod = get_norm_act(norm, out_channels, apply_act=True)
    else:
        norm_mod = get_norm(norm, out_channels)
    has_norm = norm not in (None, "")
    if bias is None:
        bias = not has_norm
    cls = WSConv2d if kind == "ws" else (_BaseConv2d or nn.Conv2d)
    return cls(in_channels, out_channels, kernel_size, bias=bias, norm=norm_mod, **common,
               **conv_kwargs)


# ---------------------------------------------------------------------------------------------
# Built-in names
# ---------------------------------------------------------------------------------------------
def _register_builtins():
    from detectron2.layers.batch_norm import FrozenBatchNorm2d, NaiveSyncBatchNorm

    register_norm("BN", description="BatchNorm2d (batch statistics)")(nn.BatchNorm2d)
    register_norm("SyncBN", description="SyncBatchNorm (cross-process batch statistics; CPU/gloo "
                  "via detectron2's NaiveSyncBatchNorm)")(SyncBatchNorm)
    register_norm("FrozenBN", description="detectron2 FrozenBatchNorm2d (fixed affine)")(
        FrozenBatchNorm2d)
    register_norm("GN", description="GroupNorm, G=32 (GN paper)")(
        lambda c: GroupNorm(c, num_groups=32))
    register_norm("GNWS", conv="ws",
                  description="GroupNorm G=32 after weight-standardized convs (GN+WS)")(
        lambda c: GroupNorm(c, num_groups=32))
    register_norm("FRN", activation=TLU,
                  norm_act=lambda c: FilterResponseNorm2d(c, tlu=True),
                  description="Filter Response Norm (eps 1e-6) + TLU")(
        lambda c: FilterResponseNorm2d(c, tlu=False))
    register_norm("FRN_LEPS", activation=TLU,
                  norm_act=lambda c: FilterResponseNorm2d(c, tlu=True, learned_eps=True),
                  description="FRN with learned eps 1e-6+|eps_l| (sec. 3.3) + TLU")(
        lambda c: FilterResponseNorm2d(c, tlu=False, learned_eps=True))
    register_norm("NF", conv="scaled_ws",
                  description="no activation normalization: Scaled WS convs (NF-ResNets); "
                  "stock layers get a per-channel gain+bias")(ChannelAffine)
    # detectron2 v0.6's debugging names, kept working.
    register_norm("nnSyncBN", description="torch.nn.SyncBatchNorm")(nn.SyncBatchNorm)
    register_norm("naiveSyncBN", description="detectron2 NaiveSyncBatchNorm")(NaiveSyncBatchNorm)
    register_norm("naiveSyncBN_N", description="detectron2 NaiveSyncBatchNorm(stats_mode='N')")(
        lambda c: NaiveSyncBatchNorm(c, stats_mode="N"))


# ---------------------------------------------------------------------------------------------
# Adapting built modules: activation pairing, WS / Scaled WS convs
# ---------------------------------------------------------------------------------------------
def _spec_of(module) -> Optional[NormSpec]:
    name = norm_name_of(module)
    if name is None:
        return None
    try:
        return get_norm_spec(name)
    except UnknownNormError:
        return None


def _needs_act_swap(norm_module) -> bool:
    spec = _spec_of(norm_module)
    return (spec is not None and not getattr(norm_module, _WITH_ACT_ATTR, False)
            and not spec.pairs_with_relu and spec.activation is not None)


def _norm_with_act(norm_module) -> nn.Module:
    """norm+activation replacing ``norm_module``, keeping the norm's parameters and buffers."""
    spec = _spec_of(norm_module)
    channels = getattr(norm_module, _CHANNELS_ATTR)
    new = get_norm_act(spec.name, channels, apply_act=True)
    p = next(norm_module.parameters(), None)
    if p is not None:
        new = new.to(device=p.device, dtype=p.dtype)
    target = new.norm if isinstance(new, NormAct) and "norm" in new._modules else new
    # Same-named state carries over (FRN: gamma, beta, eps_l; the new TLU tau starts at 0).
    own = target.state_dict()
    target.load_state_dict({k: v for k, v in norm_module.state_dict().items()
                            if k in own and own[k].shape == v.shape}, strict=False)
    new.train(norm_module.training)
    return new


def _is_relu(act) -> bool:
    return isinstance(act, nn.ReLU) or act in (F.relu, F.relu_, torch.relu, torch.relu_)


def _convert_conv(conv: nn.Conv2d, spec: NormSpec, input_gain: float) -> nn.Module:
    """A WS / Scaled WS conv with ``conv``'s weights, or ``conv`` itself when already right."""
    if spec.conv == "plain" or isinstance(conv, (WSConv2d, ScaledStdConv2d)):
        return conv
    if type(conv) not in (nn.Conv2d,) and not _is_d2_conv(conv):
        return conv  # a custom conv class: leave it alone
    if conv.padding_mode != "zeros":
        return conv
    kwargs = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                  groups=conv.groups)
    if _is_d2_conv(conv):
        kwargs.update(norm=conv.norm, activation=conv.activation)
    if spec.conv == "ws":
        new = WSConv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                       bias=conv.bias is not None, **kwargs)
    else:
        new = ScaledStdConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, bias=True,
                              gamma=input_gain, **kwargs)
    new = new.to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(conv.weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    new.train(conv.training)
    return new


def _is_d2_conv(module) -> bool:
    from .weight_std import _BaseConv2d

    return _BaseConv2d is not None and type(module) is _BaseConv2d


def _adapt_sequential(seq: nn.Sequential) -> None:
    keys = list(seq._modules.keys())
    for i, key in enumerate(keys):
        mod = seq._modules[key]
        spec = _spec_of(mod)
        if spec is not None and i > 0:
            conv_key = keys[i - 1]
            conv = seq._modules[conv_key]
            if isinstance(conv, nn.Conv2d):
                gain = activation_gain("relu") if _prev_relu(seq, keys, i - 1) else 1.0
                new = _convert_conv(conv, spec, gain)
                if new is not conv:
                    seq._modules[conv_key] = new
                    if spec.conv == "scaled_ws":  # the conv has gain and bias now
                        seq._modules[key] = nn.Identity()
                        continue
            nxt = seq._modules[keys[i + 1]] if i + 1 < len(keys) else None
            if nxt is not None and _is_relu(nxt) and _needs_act_swap(mod):
                seq._modules[key] = _norm_with_act(mod)
                seq._modules[keys[i + 1]] = nn.Identity()


def _prev_relu(seq, keys, index) -> bool:
    if index == 0:
        return False
    prev = seq._modules[keys[index - 1]]
    return _is_relu(prev) or _is_relu(getattr(prev, "activation", None))


def _adapt_d2_conv(parent: nn.Module, attr: str, conv, input_gain: float):
    """detectron2 Conv2d(norm=..., activation=...) under ``parent.attr``."""
    norm_module = conv.norm
    spec = _spec_of(norm_module)
    if spec is None:
        return conv
    if conv.activation is not None and _is_relu(conv.activation) and _needs_act_swap(norm_module):
        conv.norm = _norm_with_act(norm_module)
        conv.activation = None
    new = _convert_conv(conv, spec, input_gain)
    if new is not conv:
        if spec.conv == "scaled_ws":
            new.norm = None  # Scaled WS carries the gain and bias of the "NF" affine
        _set_child(parent, attr, new)
    return new


def _set_child(parent, attr, new):
    if attr in parent._modules:
        parent._modules[attr] = new
    else:
        setattr(parent, attr, new)


def _replace_in_lists(parent, old, new):
    for value in list(vars(parent).values()):
        if isinstance(value, list):
            for i, item in enumerate(value):
                if item is old:
                    value[i] = new


def _walk_d2_convs(module: nn.Module, relu_gain: float) -> None:
    """Adapt detectron2 Conv2d children carrying a registered norm (in registration order).

    A Scaled WS conv gets the ReLU gain when its input visibly comes from a ReLU: the previous
    child applies one, or the module is a stock ResNet residual block (all of its convs read
    ReLU outputs); otherwise gamma = 1.
    """
    all_after_relu = type(module).__name__ in ("BasicBlock", "BottleneckBlock",
                                               "PairedActBasicBlock", "PairedActBottleneckBlock")
    prev_relu = False
    for attr, child in list(module._modules.items()):
        if child is None:
            continue
        if (_is_d2_conv(child) or isinstance(child, (WSConv2d, ScaledStdConv2d))) and \
                getattr(child, "norm", None) is not None:
            gain = relu_gain if (prev_relu or all_after_relu) else 1.0
            new = _adapt_d2_conv(module, attr, child, gain)
            if new is not child:
                _replace_in_lists(module, child, new)
            child = new
        prev_relu = _is_relu(child) or _is_relu(getattr(child, "activation", None)) or \
            getattr(getattr(child, "norm", None), _WITH_ACT_ATTR, False)


def adapt_norms(model: nn.Module) -> nn.Module:
    """Apply activation pairing and WS/Scaled-WS convs for registered norms (in place).

    Handles ``nn.Sequential`` runs ``[conv, norm, ReLU]``, detectron2 ``Conv2d(norm, activation)``
    and stock detectron2 ResNet stems/blocks. Idempotent; returns ``model``.
    """
    relu_gain = activation_gain("relu")
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            _adapt_sequential(module)
        _walk_d2_convs(module, relu_gain)
        _adapt_resnet_block(module)
    heads = _per_level_head_types()
    for module in model.modules():
        if isinstance(module, heads) and any(
                isinstance(m, (WSConv2d, ScaledStdConv2d)) for m in module.modules()):
            share_standardized_weights(module)  # once per forward, not once per level
    return model


def _per_level_head_types() -> tuple:
    """detectron2 heads that apply the same convs to every pyramid level."""
    types = []
    for path, name in (("detectron2.modeling.meta_arch.retinanet", "RetinaNetHead"),
                       ("detectron2.modeling.proposal_generator.rpn", "StandardRPNHead")):
        try:
            types.append(getattr(__import__(path, fromlist=[name]), name))
        except (ImportError, AttributeError):  # pragma: no cover - detectron2 absent/other
            continue
    return tuple(types)


# Stock ResNet blocks apply F.relu_ in forward; where the norm carries TLU they must not.
_BLOCK_SUBCLASSES: Dict[type, type] = {}


def _own_act(conv) -> bool:
    return bool(getattr(getattr(conv, "norm", None), _WITH_ACT_ATTR, False))


def _relu_unless_paired(conv, x):
    return x if _own_act(conv) else F.relu_(x)


def _make_block_subclasses():
    from detectron2.modeling.backbone import resnet as d2_resnet

    class PairedActBasicStem(d2_resnet.BasicStem):
        """BasicStem whose conv1 norm carries its paired activation (e.g. FRN+TLU)."""

        def forward(self, x):
            x = _relu_unless_paired(self.conv1, self.conv1(x))
            return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)

    class PairedActBasicBlock(d2_resnet.BasicBlock):
        """BasicBlock whose conv1 norm carries its paired activation (e.g. FRN+TLU)."""

        def forward(self, x):
            out = _relu_unless_paired(self.conv1, self.conv1(x))
            out = self.conv2(out)
            shortcut = self.shortcut(x) if self.shortcut is not None else x
            return F.relu_(out + shortcut)

    class PairedActBottleneckBlock(d2_resnet.BottleneckBlock):
        """BottleneckBlock whose conv1/conv2 norms carry their paired activation."""

        def forward(self, x):
            out = _relu_unless_paired(self.conv1, self.conv1(x))
            out = _relu_unless_paired(self.conv2, self.conv2(out))
            out = self.conv3(out)
            shortcut = self.shortcut(x) if self.shortcut is not None else x
            return F.relu_(out + shortcut)

    _BLOCK_SUBCLASSES.update({
        d2_resnet.BasicStem: PairedActBasicStem,
        d2_resnet.BasicBlock: PairedActBasicBlock,
        d2_resnet.BottleneckBlock: PairedActBottleneckBlock,
    })
    for sub in _BLOCK_SUBCLASSES.values():
        # Module-level names so models holding these blocks can be pickled.
        sub.__module__ = __name__
        sub.__qualname__ = sub.__name__
        globals()[sub.__name__] = sub


_BLOCK_PAIRED_CONVS = {"BasicStem": ("conv1",), "BasicBlock": ("conv1",),
                       "BottleneckBlock": ("conv1", "conv2")}


_WARNED_NF_RESNET = []


def _adapt_resnet_block(block: nn.Module) -> None:
    if not _BLOCK_SUBCLASSES:
        return
    cls = type(block)
    if not _WARNED_NF_RESNET and cls.__name__ in _BLOCK_PAIRED_CONVS and any(
            isinstance(m, ScaledStdConv2d) for m in block.modules()):
        _WARNED_NF_RESNET.append(True)
        logger.warning(
            "d2_norms: norm 'NF' in detectron2's stock ResNet gives Scaled WS convs but not the "
            "NF-ResNet residual scaling (x + alpha * f(x / beta), NF sec. 4), so activations grow "
            "with depth; use the d2_norms NF-ResNet backbone for normalizer-free training.")
    sub = _BLOCK_SUBCLASSES.get(cls)
    if sub is None:
        return
    changed = False
    for attr in _BLOCK_PAIRED_CONVS[cls.__name__]:
        conv = getattr(block, attr, None)
        if conv is not None and conv.norm is not None and _needs_act_swap(conv.norm):
            conv.norm = _norm_with_act(conv.norm)
            changed = True
    if changed:
        block.__class__ = sub


# ---------------------------------------------------------------------------------------------
# Patching detectron2
# ---------------------------------------------------------------------------------------------
_PATCH_STATE: Dict[str, object] = {}


def detectron2_get_norm(norm, out_channels):
    """What detectron2's ``get_norm`` is after ``import d2_norms``.

    Names detectron2 itself knows (``""``, BN, SyncBN, FrozenBN, GN, nnSyncBN, naiveSyncBN,
    and on newer versions naiveSyncBN_N, LN) and callables go to detectron2's own function, so
    a stock model gets exactly the modules it gets without d2_norms (same classes; unmarked, so
    :func:`adapt_norms` leaves them alone). Only names detectron2 rejects (FRN, GNWS, NF,
    GN_G<G>, ...) come from this registry. d2_norms' own components ask :func:`get_norm`
    (the registry) directly.
    """
    original = _original_get_norm()
    if original is not None and not (isinstance(norm, str) and norm and norm not in
                                     _detectron2_norm_names()):
        return original(norm, out_channels)
    return get_norm(norm, out_channels)


def _detectron2_norm_names() -> frozenset:
    """The names detectron2's own get_norm accepts (probed once: they differ by version)."""
    names = _PATCH_STATE.get("detectron2_names")
    if names is None:
        original = _original_get_norm()
        found = set()
        for name in ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN",
                     "naiveSyncBN_N", "LN"):
            try:
                original(name, 32)
            except KeyError:
                continue
            found.add(name)
        names = _PATCH_STATE["detectron2_names"] = frozenset(found)
    return names


def _retinanet_get_norm(norm, out_channels):
    """get_norm bound in detectron2's retinanet module: resolves the v0.6 type probe."""
    frame = sys._getframe(1)
    try:
        if (isinstance(norm, str) and norm and frame.f_code.co_name == "__init__"
                and "cls_subnet" not in frame.f_locals):
            head_cls = _PATCH_STATE.get("RetinaNetHead")
            self_obj = frame.f_locals.get("self")
            if head_cls is not None and isinstance(self_obj, head_cls):
                conv_dims = frame.f_locals.get("conv_dims") or []
                shapes = frame.f_locals.get("input_shape") or []
                if conv_dims:
                    width = int(conv_dims[0])
                elif shapes:
                    width = int(shapes[0].channels)
                else:
                    width = out_channels
                # The probe only reads the type name; build it at the real layers' width so a
                # width that G does not divide reports the width the subnets will have.
                return detectron2_get_norm(norm, width)
    finally:
        del frame
    return detectron2_get_norm(norm, out_channels)


def _wrap_init(cls):
    if getattr(cls.__init__, "_d2_norms_adapts", False):
        return
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        adapt_norms(self)

    __init__.__wrapped__ = original
    __init__.__signature__ = inspect.signature(original)
    __init__.__doc__ = original.__doc__
    __init__.__name__ = original.__name__
    __init__.__qualname__ = original.__qualname__
    __init__._d2_norms_adapts = True
    cls.__init__ = __init__


def patch_detectron2() -> bool:
    """Make detectron2 use this registry (idempotent). Returns False when detectron2 is absent."""
    if _PATCH_STATE.get("done"):
        return True
    try:
        import detectron2.layers as d2_layers
        import detectron2.layers.batch_norm as d2_bn
        import detectron2.modeling  # noqa: F401  (binds get_norm in all stock modules)
    except ImportError:
        return False
    original = d2_bn.get_norm
    if getattr(original, "__module__", "") == __name__:
        _PATCH_STATE["done"] = True
        return True
    _PATCH_STATE["original"] = original
    d2_bn.get_norm = detectron2_get_norm
    d2_layers.get_norm = detectron2_get_norm
    # Every module that bound the original by name so far (detectron2's own modules, and any
    # third-party detectron2 project imported before d2_norms); identity check only.
    for mod in list(sys.modules.values()):
        try:
            if getattr(mod, "get_norm", None) is original:
                mod.get_norm = detectron2_get_norm
        except Exception:  # exotic lazy modules may raise on attribute access
            continue
    try:
        from detectron2.modeling.meta_arch import retinanet as d2_retinanet

        _PATCH_STATE["RetinaNetHead"] = d2_retinanet.RetinaNetHead
        d2_retinanet.get_norm = _retinanet_get_norm
    except ImportError:  # pragma: no cover
        pass
    _make_block_subclasses()
    for path, name in _ADAPTED_COMPONENTS:
        try:
            module = __import__(path, fromlist=[name])
            _wrap_init(getattr(module, name))
        except (ImportError, AttributeError):  # pragma: no cover - other detectron2 versions
            logger.debug("d2_norms: %s.%s not found; not adapted", path, name)
    _PATCH_STATE["done"] = True
    return True


_ADAPTED_COMPONENTS = (
    ("detectron2.modeling.meta_arch.retinanet", "RetinaNetHead"),
    ("detectron2.modeling.roi_heads.box_head", "FastRCNNConvFCHead"),
    ("detectron2.modeling.roi_heads.mask_head", "MaskRCNNConvUpsampleHead"),
    ("detectron2.modeling.backbone.fpn", "FPN"),
    ("detectron2.modeling.meta_arch.semantic_seg", "SemSegFPNHead"),
    ("detectron2.modeling.backbone.resnet", "BasicStem"),
    ("detectron2.modeling.backbone.resnet", "BasicBlock"),
    ("detectron2.modeling.backbone.resnet", "BottleneckBlock"),
)
