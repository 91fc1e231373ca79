"""Conv + norm + activation, built from one norm name resolved once: the one composer.

:func:`resolve_norm` turns a norm name (or ``""``/None, or a callable ``channels -> module``)
into a :class:`ResolvedNorm`: the registry entry, the conv class the norm needs (plain, WS for
GNWS, Scaled WS for NF) and the activation paired with it (ReLU, TLU for FRN, fused FRN+TLU
where the registry offers it). Every d2_norms component (ResNet, NF-ResNet stem widths aside,
FPN, RPN / RetinaNet / box / mask heads) builds its layers from that one resolution; a
component resolves its name once and passes the :class:`ResolvedNorm` on
(``resolve_norm`` returns a ResolvedNorm unchanged).

:meth:`ResolvedNorm.conv_norm_act` (and the shortcut :func:`conv_norm_act`) gives the layout of
detectron2's own components: a detectron2 ``Conv2d`` (or a WS / Scaled WS subclass of it)
carrying ``.norm`` and ``.activation``, so parameter names are detectron2's (``conv1.weight``,
``conv1.norm.weight``, ...); a fused norm + activation (FRN + TLU) goes to ``.norm`` as one op.
For layouts that keep conv, norm and activation apart (RetinaNet's ``nn.Sequential`` subnets,
the activation after a residual addition), :meth:`ResolvedNorm.conv`, :meth:`ResolvedNorm.norm`,
:meth:`ResolvedNorm.activation` and :meth:`ResolvedNorm.norm_with_activation` build the pieces.
Scaled WS norms ("NF") build no norm module: the conv carries the affine gain and bias (NF sec.
4.4) and its gamma is the gain of the nonlinearity feeding it (``input_activation``; None for
inputs that come from no nonlinearity, e.g. FPN features or the image).
"""
from dataclasses import dataclass
from typing import Callable, Optional, Union

from torch import nn

from collections import OrderedDict

from .norm_registry import NormSpec, UnknownNormError, get_norm, get_norm_spec
from .weight_std import ScaledStdConv2d, WSConv2d, _BaseConv2d, _same_padding, activation_gain

__all__ = ["NormAct", "ResolvedNorm", "resolve_norm", "conv_norm_act", "get_norm_act"]

NormLike = Union[str, Callable[[int], Optional[nn.Module]], None]


def _no_norm(channels):
    return None


class NormAct(nn.Sequential):
    """A norm followed by its activation (children ``norm`` and ``act``)."""

    def __init__(self, norm: Optional[nn.Module], act: Optional[nn.Module]):
        mods = OrderedDict()
        if norm is not None:
            mods["norm"] = norm
        if act is not None:
            mods["act"] = act
        super().__init__(mods)


@dataclass(frozen=True)
class ResolvedNorm:
    """A norm resolved once: what goes before it (``conv_kind``), itself, and after it.

    ``spec`` is the registry entry; None for no norm (``""``/None), a callable, or a name only
    detectron2's own ``get_norm`` knows (e.g. "LN" on detectron2 main): those pair with ReLU
    and a plain conv, as in detectron2.
    """

    name: NormLike
    spec: Optional[NormSpec]
    conv_kind: str
    factory: Callable[[int], Optional[nn.Module]]

    @property
    def has_norm(self) -> bool:
        return self.name not in (None, "")

    @property
    def fuses_activation(self) -> bool:
        """The registry offers norm + activation as one module (FRN + TLU)."""
        return self.spec is not None and self.spec.norm_act is not None

    @property
    def pairs_with_relu(self) -> bool:
        return self.spec is None or self.spec.pairs_with_relu

    @property
    def activation_name(self) -> Optional[str]:
        """The paired activation as ``activation_gain`` knows it: "relu", None (no activation).

        Raises for a custom activation factory (its gain needs a module, see ``conv``).
        """
        if self.spec is None or self.spec.activation == "relu":
            return "relu"
        if self.spec.activation is None:
            return None
        raise ValueError(
            f"norm {self.name!r} pairs with a custom activation; pass the gain of the "
            "nonlinearity feeding each Scaled WS conv as input_activation= (a name, a callable "
            "on tensors or a float), or register the norm with activation='relu'.")

    # -- pieces ---------------------------------------------------------------------------
    def norm(self, channels: int) -> Optional[nn.Module]:
        """The norm after a conv of width ``channels``; None without one and for Scaled WS
        norms (their conv carries gain and bias)."""
        _check_channels(channels)
        if self.conv_kind == "scaled_ws":
            return None
        return self.factory(channels)

    def norm_with_activation(self, channels: int) -> nn.Module:
        """The norm and its paired activation as one module, as ``get_norm_act`` builds it:
        the fused op (FRN + TLU), ``NormAct(norm, act)``, the norm or activation alone, or
        ``nn.Identity()`` when there is neither."""
        if self.fuses_activation and self.conv_kind != "scaled_ws":
            _check_channels(channels)
            return self.spec.norm_act(channels)
        norm, act = self.norm(channels), self.activation(channels)
        if norm is None:
            return act if act is not None else nn.Identity()
        return norm if act is None else NormAct(norm, act)

    def activation(self, channels: int) -> Optional[nn.Module]:
        """The paired activation on its own: ReLU, TLU (FRN), None for norms without one."""
        if self.spec is None:
            return nn.ReLU()
        return self.spec.build_activation(channels)

    def conv(self, in_channels: int, out_channels: int, kernel_size, *, stride=1, padding=None,
             dilation=1, groups=1, bias: Optional[bool] = None,
             input_activation: Union[str, Callable, float, None] = "relu",
             norm: Optional[nn.Module] = None, activation: Optional[nn.Module] = None,
             plain_cls: Optional[type] = None, **conv_kwargs) -> nn.Module:
        """The conv this norm needs (detectron2 ``Conv2d``, ``WSConv2d`` or ``ScaledStdConv2d``).

        ``padding=None``: "same" for odd kernels. ``bias=None``: a bias only when nothing after
        the conv shifts its output (no norm, or a Scaled WS conv, whose bias is the affine
        shift). ``input_activation`` sets a Scaled WS conv's gamma (its gain; None -> 1).
        ``norm`` / ``activation`` are attached as ``conv.norm`` / ``conv.activation``.
        ``plain_cls``: the class of a plain conv (default detectron2 ``Conv2d``; torch's
        ``nn.Conv2d`` for layouts keeping the norm in a separate module, as RetinaNet's
        subnets, whose checkpoints name it so); WS / Scaled WS convs keep their class.
        """
        if padding is None:
            padding = _same_padding(kernel_size, dilation)
        if bias is None:
            bias = not self.has_norm or self.conv_kind == "scaled_ws"
        if self.conv_kind == "plain" and plain_cls is not None and plain_cls is not _BaseConv2d:
            if norm is not None or activation is not None:
                raise ValueError(f"plain_cls={plain_cls.__name__} carries no norm/activation; "
                                 "build them as separate modules")
            return plain_cls(in_channels, out_channels, kernel_size, stride=stride,
                             padding=padding, dilation=dilation, groups=groups, bias=bias,
                             **conv_kwargs)
        common = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                      bias=bias, norm=norm, activation=activation, **conv_kwargs)
        if self.conv_kind == "scaled_ws":
            return ScaledStdConv2d(in_channels, out_channels, kernel_size,
                                   gamma=_gain(input_activation), **common)
        cls = WSConv2d if self.conv_kind == "ws" else _BaseConv2d
        return cls(in_channels, out_channels, kernel_size, **common)

    # -- composed ---------------------------------------------------------------------------
    def conv_norm_act(self, in_channels: int, out_channels: int, kernel_size, *,
                      apply_act: bool = True, fuse_act: bool = True,
                      activation_in_norm: bool = False, stride=1, padding=None, dilation=1,
                      groups=1, bias: Optional[bool] = None,
                      input_activation: Union[str, Callable, float, None] = "relu",
                      **conv_kwargs) -> nn.Module:
        """conv -> ``conv.norm`` -> ``conv.activation`` for this norm (see module docstring).

        ``apply_act=False``: no activation (a residual branch's last conv, the FPN).
        ``fuse_act``: a norm with a fused activation (FRN + TLU) goes to ``conv.norm`` as one
        op and ``conv.activation`` stays None; False keeps them apart (FRN, then TLU).
        ``activation_in_norm``: ``conv.norm`` is the norm with its activation as one module
        (``norm_with_activation``) (the RetinaNet subnets' norm slot).
        """
        act = None
        if self.conv_kind == "scaled_ws":
            norm = None
            act = self.activation(out_channels) if apply_act else None
        elif apply_act and activation_in_norm:
            norm = self.norm_with_activation(out_channels)
        elif apply_act and fuse_act and self.fuses_activation:
            _check_channels(out_channels)
            norm = self.spec.norm_act(out_channels)
        else:
            norm = self.norm(out_channels)
            act = self.activation(out_channels) if apply_act else None
        return self.conv(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias,
                         input_activation=input_activation, norm=norm, activation=act,
                         **conv_kwargs)


def _check_channels(channels):
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"a norm layer needs a positive int width, got {channels!r}")


def _gain(input_activation) -> float:
    if input_activation is None:
        return 1.0
    if isinstance(input_activation, (int, float)) and not isinstance(input_activation, bool):
        return float(input_activation)
    return float(activation_gain(input_activation))


def resolve_norm(norm: NormLike) -> ResolvedNorm:
    """Resolve ``norm`` once (see :class:`ResolvedNorm`).

    Raises ``UnknownNormError`` (a ValueError listing the registered names) for a name neither
    the registry nor detectron2 knows, TypeError for anything but a name, callable or None.
    A ResolvedNorm is returned as it is.
    """
    if isinstance(norm, ResolvedNorm):
        return norm
    if norm is None or norm == "":
        return ResolvedNorm(norm, None, "plain", _no_norm)
    if isinstance(norm, str):
        try:
            spec = get_norm_spec(norm)
        except UnknownNormError:
            get_norm(norm, 32)  # names only detectron2 knows pass; otherwise the clear error
            return ResolvedNorm(norm, None, "plain", lambda c: get_norm(norm, c))
        return ResolvedNorm(norm, spec, spec.conv, spec.factory)
    if callable(norm):
        return ResolvedNorm(norm, None, "plain", norm)
    raise TypeError(f"norm must be a name (str), a callable channels -> nn.Module or None, "
                    f"got {type(norm).__name__}")


def conv_norm_act(in_channels: int, out_channels: int, kernel_size, *, norm: NormLike = "",
                  **kwargs) -> nn.Module:
    """``resolve_norm(norm).conv_norm_act(...)``: one conv with its norm and activation."""
    return resolve_norm(norm).conv_norm_act(in_channels, out_channels, kernel_size, **kwargs)


def get_norm_act(norm: NormLike, channels: int, apply_act: bool = True) -> nn.Module:
    """The norm with its paired activation as one module (``apply_act=False``: the norm alone,
    ``nn.Identity()`` without one): fused FRN + TLU, ``NormAct(norm, ReLU)``, ``nn.ReLU()`` for
    ``""``. Scaled WS norms ("NF") have no norm module: their conv carries gain and bias."""
    resolved = resolve_norm(norm)
    if apply_act:
        return resolved.norm_with_activation(channels)
    module = resolved.norm(channels)
    return module if module is not None else nn.Identity()
