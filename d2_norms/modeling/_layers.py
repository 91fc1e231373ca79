"""The few layer-level helpers the backbones need, on top of ``d2_norms.layers``.

Everything normalizer-specific comes from ``d2_norms.layers`` (registry, FRN/TLU, GN, WS and
Scaled-WS convs, activation gains). This module only arranges those pieces the way
detectron2's ResNet arranges its own: a conv carrying ``conv.norm`` and ``conv.activation``
(so parameter names match detectron2's ResNet/FPN checkpoints: ``conv1.weight``,
``conv1.norm.weight``, ...), and the paired activation on its own for after the residual add.
"""
from typing import Optional

import torch
from torch import nn

from detectron2.layers import Conv2d

from d2_norms import layers as L

__all__ = [
    "norm_activation",
    "conv_norm_act",
    "norm_scale_parameter",
    "activation_gain",
    "scaled_ws_conv",
    "nf_activation",
]


def _spec(norm: str):
    """The registry entry of ``norm``; None for "" and for names only detectron2 knows."""
    if not norm:
        return None
    try:
        return L.get_norm_spec(norm)
    except L.UnknownNormError:
        L.get_norm(norm, 32)  # detectron2's own names still work; otherwise the clear error
        return None


def norm_activation(norm: str, channels: int) -> nn.Module:
    """The activation paired with ``norm`` on its own (TLU for FRN, ReLU for BN/GN/"" ...)."""
    spec = _spec(norm)
    act = nn.ReLU() if spec is None else spec.build_activation(channels)
    return nn.Identity() if act is None else act


def conv_norm_act(in_channels, out_channels, kernel_size, *, norm: str, stride=1, padding=0,
                  dilation=1, groups=1, apply_act=True, input_activation: Optional[str] = "relu"):
    """A conv of the type ``norm`` expects, with ``conv.norm`` and (``apply_act``) its activation.

    The conv has no bias (the norm shifts), except for Scaled-WS norms which carry their own
    gain and bias (gamma from ``input_activation``; None for the image). A norm with a fused
    activation (FRN+TLU) is attached as ``conv.norm`` alone; otherwise the activation module
    goes to ``conv.activation`` (so ``conv.norm`` is exactly ``get_norm(norm, C)``).
    """
    kind = L.norm_conv_kind(norm)
    common = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    spec = _spec(norm)
    if kind == "scaled_ws":
        gamma = 1.0 if input_activation is None else L.activation_gain(input_activation)
        act = (spec.build_activation(out_channels) if spec is not None else nn.ReLU()) \
            if apply_act else None
        return L.ScaledStdConv2d(in_channels, out_channels, kernel_size, bias=True,
                                 gamma=gamma, activation=act, **common)
    if apply_act and spec is not None and spec.norm_act is not None:
        norm_module, act = L.get_norm_act(norm, out_channels, apply_act=True), None
    else:
        norm_module = L.get_norm(norm, out_channels)
        act = norm_activation(norm, out_channels) if apply_act else None
    # No bias even without a norm, as detectron2's ResNet (the FPN builds its own convs).
    cls = L.WSConv2d if kind == "ws" else Conv2d
    return cls(in_channels, out_channels, kernel_size, bias=False, norm=norm_module,
               activation=act, **common)


def norm_scale_parameter(module: nn.Module) -> Optional[torch.Tensor]:
    """The affine scale (gamma) of the norm in ``module`` (a conv's ``.norm``), None if none."""
    norm = getattr(module, "norm", module)
    if norm is None:
        return None
    for m in norm.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() == 1:
            return w
    return None


def activation_gain(name: str) -> float:
    """Scaled-WS gain 1/sqrt(Var(g(x))), x ~ N(0,1) (NF paper sec. 4.3)."""
    return float(L.activation_gain(name))


def scaled_ws_conv(in_channels, out_channels, kernel_size, *, stride=1, padding=0, dilation=1,
                   groups=1, bias=True, gamma=1.0) -> nn.Module:
    """Scaled WS conv (NF eq. 3) with fixed gain ``gamma`` and a learnable affine gain."""
    return L.ScaledStdConv2d(in_channels, out_channels, kernel_size, stride=stride,
                             padding=padding, dilation=dilation, groups=groups, bias=bias,
                             gamma=gamma)


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
