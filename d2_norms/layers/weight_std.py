"""Weight-standardized convolutions: WS (for GN+WS) and Scaled WS (NF-ResNets).

* :class:`WSConv2d` - Weight Standardization (Qiao et al., 2019): each output channel's weights
  are standardized over their fan-in, ``W_hat = (W - mean) / sqrt(var + eps)``, in the forward
  pass (differentiable), used with GroupNorm ("GNWS").
* :class:`ScaledStdConv2d` - Scaled WS (Brock et al., ICLR 2021, eq. 3 and sec. 4.4):
  ``W_hat = g_c * gamma * (W - mean) / (sqrt(var + eps) * sqrt(fan_in))`` with gamma the gain of
  the nonlinearity that produced the conv's input (:func:`activation_gain`), ``g_c`` a learnable
  per-output-channel gain (init 1) and a learnable bias added to the output.

Mean and (biased) variance are over ``in_channels/groups * kh * kw`` and computed in float32.
Both are plain convolutions once the weights are fixed, so :meth:`fold` and
:func:`fold_weight_standardization` turn them into ordinary convs for inference ("free at
inference", NF sec. 4.2).

Both classes subclass detectron2's ``Conv2d`` when detectron2 is importable, so they accept its
``norm=`` and ``activation=`` keywords and apply them after the convolution.
"""
import functools
import math
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

try:  # detectron2's Conv2d adds norm/activation keywords and empty-input handling
    from detectron2.layers import Conv2d as _BaseConv2d
except ImportError:  # pragma: no cover - d2_norms is a detectron2 plugin; keep layers usable
    _BaseConv2d = None

__all__ = [
    "WSConv2d",
    "ScaledStdConv2d",
    "standardize_weight",
    "activation_gain",
    "fold_weight_standardization",
    "share_standardized_weights",
    "RELU_GAIN",
    "WS_EPS",
]

WS_EPS = 1e-6
# NF sec. 4.3: Var(relu(x)) = (1/2)(1 - 1/pi) for x ~ N(0, 1); gamma = 1 / sqrt(Var).
RELU_GAIN = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))


def _standardize(weight: torch.Tensor, row_scale: Optional[torch.Tensor],
                 eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``((W - mean) * rsqrt(var + eps) * s, mean, rstd)`` per output channel, in ONE native op.

    ``native_group_norm`` with one group per output channel over the 4-D weight is exactly
    this (biased variance, eps inside the square root, per-row scale as its gamma) and needs
    no reshapes: the fewest launches for a per-step cost, with a native backward that is
    3-5x faster on CPU than the hand-written one it replaced. Differentiable (autograd knows
    the op), scriptable and traceable. Half-precision weights are standardized in float32.
    """
    out = weight.shape[0]
    w = weight
    if w.dtype == torch.float16 or w.dtype == torch.bfloat16:
        w = w.float()
        if row_scale is not None:
            row_scale = row_scale.float()
    w_hat, mean, rstd = torch.native_group_norm(w, row_scale, None, 1, out, w.numel() // out,
                                                out, eps)
    if w_hat.dtype != weight.dtype:  # (a same-dtype .to() is still a dispatched op)
        w_hat = w_hat.to(weight.dtype)
    return w_hat, mean, rstd


class _WSConvFunction(torch.autograd.Function):
    """``conv2d(x, standardize(W) * gain * scale)`` as one op that keeps x, W and per-channel
    statistics for backward and recomputes the standardized weight there.

    Standardizing in front of a plain conv makes autograd keep the standardized copy of every
    weight (the conv saves it): a whole extra model's worth of weights per step. Recomputing
    it is one native op over the weights, small next to the convolution. Per call: forward =
    group_norm + conv (+ 2 tiny ops for the gain), backward = group_norm + conv backward +
    group_norm backward (+ 2 for the gain). Under autocast the conv runs in the autocast
    dtype, as ``F.conv2d`` would.
    """

    @staticmethod
    def forward(ctx, x, weight, gain, bias, scale, eps, stride, padding, dilation, groups):
        row_scale = None if gain is None else gain.view(-1) * scale
        w_hat, mean, rstd = _standardize(weight, row_scale, eps)
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) \
            if torch.is_autocast_enabled(device_type) else None
        if dtype is None:
            out = torch.conv2d(x, w_hat, bias, stride, padding, dilation, groups)
            xc = x
        else:
            xc, wc = x.to(dtype), w_hat.to(dtype)
            bc = None if bias is None else bias.to(dtype)
            with torch.autocast(device_type, enabled=False):
                out = torch.conv2d(xc, wc, bc, stride, padding, dilation, groups)
        ctx.save_for_backward(xc, weight, mean, rstd, row_scale)
        ctx.conf = (scale, eps, stride, padding, dilation, groups, dtype, x.dtype,
                    None if bias is None else (bias.shape[0], bias.dtype),
                    None if gain is None else gain.shape)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        xc, weight, mean, rstd, row_scale = ctx.saved_tensors
        (scale, eps, stride, padding, dilation, groups, dtype, x_dtype, bias_info,
         gain_shape) = ctx.conf
        need_x, need_w, need_g, need_b = ctx.needs_input_grad[:4]
        need_g = need_g and gain_shape is not None
        w_hat = _standardize(weight, row_scale, eps)[0]
        if dtype is not None:
            w_hat = w_hat.to(dtype)
            grad_out = grad_out.to(dtype)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_out, xc, w_hat, None if bias_info is None else [bias_info[0]],
            stride, padding, dilation, False, [0] * len(stride), groups,
            [need_x, need_w or need_g, need_b and bias_info is not None])
        dx = gx if gx is None or gx.dtype == x_dtype else gx.to(x_dtype)
        dw = dgain = None
        if need_w or need_g:
            w = weight
            if w.dtype != mean.dtype or gw.dtype != mean.dtype:  # half weights / autocast
                w, gw = w.to(mean.dtype), gw.to(mean.dtype)
                row_scale = None if row_scale is None else row_scale.to(mean.dtype)
            out = weight.shape[0]
            dw, ds, _ = torch.ops.aten.native_group_norm_backward(
                gw, w, mean, rstd, row_scale, 1, out, w.numel() // out, out,
                [need_w, need_g, False])
            if dw is not None and dw.dtype != weight.dtype:
                dw = dw.to(weight.dtype)
            if need_g:
                dgain = (ds * scale).view(gain_shape)
        db = gb if gb is None or gb.dtype == bias_info[1] else gb.to(bias_info[1])
        return dx, dw, dgain, db, None, None, None, None, None, None


def standardize_weight(weight: torch.Tensor, eps: float = WS_EPS, gain=None,
                       scale: float = 1.0) -> torch.Tensor:
    """``(W - mean) / sqrt(var + eps) * scale * gain`` per output channel over the fan-in.

    ``gain`` is an optional per-output-channel tensor (any shape with ``out`` elements).
    Statistics in float32 (float64 for float64 weights); the result has the weight's dtype.
    One native op (``native_group_norm``, one group per output channel), differentiable.
    """
    out_channels = weight.shape[0]
    row_scale = None
    if gain is not None:
        row_scale = gain.reshape(out_channels) * scale
    elif scale != 1.0:
        row_scale = torch.full((out_channels,), float(scale), dtype=weight.dtype,
                               device=weight.device)
    return _standardize(weight, row_scale, float(eps))[0]


class _Conv2dBase(_BaseConv2d if _BaseConv2d is not None else nn.Conv2d):
    def __init__(self, *args, **kwargs):
        if _BaseConv2d is None:
            self._norm = kwargs.pop("norm", None)
            self._activation = kwargs.pop("activation", None)
        super().__init__(*args, **kwargs)
        if _BaseConv2d is None:
            self.norm, self.activation = self._norm, self._activation
            del self._norm, self._activation

    def _row_scale(self) -> Optional[torch.Tensor]:
        """Per-output-channel factor after standardization (None: 1)."""
        return None

    def _gain_and_scale(self):
        """(per-channel gain parameter or None, constant factor) for the fused op."""
        return None, 1.0

    def standardized_weight(self) -> torch.Tensor:
        """The weight the convolution uses (differentiable; one native op, see _standardize)."""
        return _standardize(self.weight, self._row_scale(), float(self.eps))[0]

    def _scripted_conv(self, x: torch.Tensor) -> torch.Tensor:
        """TorchScript's forward: standardize (the eager op's forward) + conv."""
        weight = _standardize(self.weight, self._row_scale(), self.eps)[0]
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def _fused(self, x) -> bool:
        return (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and not torch.jit.is_scripting() and not torch.jit.is_tracing())

    # Set by share_standardized_weights' hooks while the owning head runs its forward.
    _ws_sharing = False
    _ws_shared_weight = None

    def forward(self, x):
        if torch.jit.is_scripting():
            # Training-only machinery (fused autograd op, per-forward weight sharing) is left out
            # of TorchScript; for export, fold_weight_standardization removes the
            # standardization altogether.
            x = self._scripted_conv(x)
        elif self._ws_sharing:
            # A head running this conv on every pyramid level: standardize once per forward;
            # every level's conv saves this same tensor (one copy, not one per level).
            if self._ws_shared_weight is None:
                self._ws_shared_weight = self.standardized_weight()
            x = F.conv2d(x, self._ws_shared_weight, self.bias, self.stride, self.padding,
                         self.dilation, self.groups)
        elif self._fused(x):
            gain, scale = self._gain_and_scale()
            x = _WSConvFunction.apply(x, self.weight, gain, self.bias, scale, float(self.eps),
                                      self.stride, self.padding, self.dilation, self.groups)
        else:
            x = F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding,
                         self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def fold(self) -> nn.Conv2d:
        """A plain conv (detectron2 ``Conv2d``) with the standardized weights baked in.

        The result computes the same function with fixed weights (for inference/export); the
        norm and activation modules are carried over (shared, not copied).
        """
        cls = _BaseConv2d if _BaseConv2d is not None else nn.Conv2d
        kwargs = {}
        if _BaseConv2d is not None:
            kwargs = {"norm": self.norm, "activation": self.activation}
        conv = cls(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                   padding=self.padding, dilation=self.dilation, groups=self.groups,
                   bias=self.bias is not None, padding_mode=self.padding_mode, **kwargs)
        conv = conv.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.standardized_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        if _BaseConv2d is None:
            conv.norm, conv.activation = self.norm, self.activation
        conv.train(self.training)
        return conv


def _same_padding(kernel_size, dilation):
    ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    dl = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    return tuple(d * (k - 1) // 2 for k, d in zip(ks, dl))


class WSConv2d(_Conv2dBase):
    """Conv2d with Weight Standardization (Qiao et al.): weights standardized over the fan-in.

    Same arguments as ``torch.nn.Conv2d`` (``padding=None`` means "same" for odd kernels), plus
    ``eps`` (added to the variance, default 1e-6) and detectron2's ``norm=``/``activation=``.
    Use with GroupNorm for GN+WS. ``bias`` defaults to False (a norm follows).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None,
                 dilation=1, groups=1, bias=False, *, eps: float = WS_EPS, **kwargs):
        if padding is None:
            padding = _same_padding(kernel_size, dilation)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, **kwargs)
        self.eps = eps

    def extra_repr(self):
        return super().extra_repr() + f", eps={self.eps:g}"


class ScaledStdConv2d(_Conv2dBase):
    """Conv2d with Scaled Weight Standardization (NF paper eq. 3, affine gain/bias sec. 4.4).

    Args:
        gamma: the nonlinearity gain (a float, or an activation name / callable for
            :func:`activation_gain`, e.g. ``"relu"`` -> sqrt(2 / (1 - 1/pi))); 1.0 when the input
            does not come from a nonlinearity (e.g. the image).
        eps: added to the fan-in variance (default 1e-6, as timm's ScaledStdConv2d).
        gain_init: initial value of the learnable per-output-channel gain.
        bias: learnable output bias (default True; it is the layer's only shift).

    ``padding=None`` means "same" for odd kernels. Parameters: ``weight``, ``gain``
    ``(out, 1, 1, 1)``, ``bias``.
    """

    # NF App. B.1: the affine gain and bias are not weight-decayed (d2_norms.solver reads this).
    d2n_norm_params = ("gain", "bias")

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None,
                 dilation=1, groups=1, bias=True, *, gamma: Union[float, str, Callable] = 1.0,
                 eps: float = WS_EPS, gain_init: float = 1.0, **kwargs):
        if padding is None:
            padding = _same_padding(kernel_size, dilation)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, **kwargs)
        self.gamma = float(gamma) if isinstance(gamma, (int, float)) else activation_gain(gamma)
        self.eps = eps
        self.gain = nn.Parameter(torch.full((out_channels, 1, 1, 1), float(gain_init)))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @property
    def fan_in(self) -> int:
        return self.weight[0].numel()

    def _row_scale(self) -> Optional[torch.Tensor]:
        # eq. 3: gamma * (W - mu) / (sigma * sqrt(N)), times the learned gain g_c.
        # (fan-in written out: TorchScript compiles no properties of a scripted module)
        return self.gain.reshape(-1) * (self.gamma / math.sqrt(self.weight[0].numel()))

    def _gain_and_scale(self):
        # the constant from the weight's shape, not self.weight[0] (an op per call)
        return self.gain, self.gamma / math.sqrt(math.prod(self.weight.shape[1:]))

    def extra_repr(self):
        return super().extra_repr() + f", gamma={self.gamma:.6g}, eps={self.eps:g}"


def fold_weight_standardization(model: nn.Module) -> nn.Module:
    """Replace every WSConv2d / ScaledStdConv2d in ``model`` by its folded plain conv, in place.

    Returns ``model`` (or the folded conv when ``model`` itself is one). Use for inference:
    the outputs are unchanged (up to float rounding) and the per-step standardization is gone.
    Lists holding a folded conv (detectron2 heads keep their convs in lists too, e.g. FPN's
    ``lateral_convs``) are updated, and the weight-sharing hooks of
    :func:`share_standardized_weights` are removed.
    """
    if isinstance(model, _Conv2dBase):
        return model.fold()
    for name, child in list(model.named_children()):
        if isinstance(child, _Conv2dBase):
            folded = child.fold()
            setattr(model, name, folded)
            for value in vars(model).values():
                if isinstance(value, list):
                    for i, item in enumerate(value):
                        if item is child:
                            value[i] = folded
        else:
            fold_weight_standardization(child)
    _unshare_standardized_weights(model)
    return model


def _set_ws_sharing(module: nn.Module, on: bool) -> None:
    for m in module.modules():
        if isinstance(m, _Conv2dBase):
            m._ws_sharing = on
            m._ws_shared_weight = None


def share_standardized_weights(module: nn.Module) -> nn.Module:
    """Standardize each WS / Scaled-WS conv inside ``module`` once per forward of ``module``.

    For heads that run the same convs on every pyramid level (RetinaNet's subnets, the RPN
    conv). Per call, the fused op would standardize the weight again for each level in forward
    and twice more in backward; shared, it is done once each way, and autograd keeps one
    standardized copy of the head's weights in all. Exact: the same weight feeds every level
    and the levels' gradients meet in one standardization backward. The cache lives only
    during ``module``'s forward (hooks clear it before and after, also when the forward
    raises), so a changed weight is never missed. Idempotent; returns ``module``.
    """
    if getattr(module, "_d2n_shares_ws", False):
        return module
    handles = (
        module.register_forward_pre_hook(lambda mod, args: _set_ws_sharing(mod, True)),
        module.register_forward_hook(lambda mod, args, out: _set_ws_sharing(mod, False),
                                     always_call=True),
    )
    module._d2n_shares_ws = True
    module._d2n_ws_hooks = handles  # removed by fold_weight_standardization
    return module


def _unshare_standardized_weights(module: nn.Module) -> None:
    """Remove :func:`share_standardized_weights`' hooks: nothing is left to share once the
    convs are folded, and TorchScript cannot compile the Python hooks."""
    for handle in getattr(module, "_d2n_ws_hooks", ()):
        handle.remove()
    for attr in ("_d2n_ws_hooks", "_d2n_shares_ws"):
        if attr in module.__dict__:
            delattr(module, attr)


# ---------------------------------------------------------------------------------------------
# Nonlinearity gains (NF sec. 4.3, App. D)
# ---------------------------------------------------------------------------------------------
_ACTIVATIONS = {
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "elu": F.elu,
    "selu": F.selu,
    "celu": F.celu,
    "leaky_relu": F.leaky_relu,
    "softplus": F.softplus,
    "mish": F.mish,
    "relu6": F.relu6,
    "hardswish": F.hardswish,
    "hardtanh": F.hardtanh,
}
_IDENTITY = ("identity", "linear", "none", "")


@functools.lru_cache(maxsize=None)
def _numeric_gain(name_or_fn, num_vectors: int, width: int, seed: int) -> float:
    fn = _ACTIVATIONS[name_or_fn] if isinstance(name_or_fn, str) else name_or_fn
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_vectors, width, generator=gen, dtype=torch.float64)
    y = fn(x)
    # App. D: average the empirical variance of each vector, gamma = mean(var)^(-1/2).
    return float(y.var(dim=1, correction=0).mean().rsqrt())


def activation_gain(name: Union[str, Callable], *, num_vectors: int = 1024, width: int = 256,
                    seed: int = 0) -> float:
    """Gain gamma making ``Var(W g(x)) = 1`` for ``x ~ N(0, 1)`` (NF sec. 4.3).

    ReLU is analytic, ``sqrt(2 / (1 - 1/pi))`` (about 1.7129); identity/linear is 1. Other
    nonlinearities (a name from ``activation_gain.names`` or any callable on tensors) are
    estimated numerically as NF App. D does: draw ``num_vectors`` Gaussian vectors of size
    ``width``, apply the nonlinearity, take ``mean(var)^(-1/2)``; float64, fixed seed.
    """
    if isinstance(name, str):
        key = name.strip().lower()
        if key == "relu":
            return RELU_GAIN
        if key in _IDENTITY:
            return 1.0
        if key not in _ACTIVATIONS:
            raise ValueError(
                f"activation_gain: unknown nonlinearity {name!r}; known: "
                f"{', '.join(sorted(_ACTIVATIONS) + list(_IDENTITY[:2]))}, or pass a callable")
        return _numeric_gain(key, num_vectors, width, seed)
    if isinstance(name, nn.Module) or callable(name):
        return _numeric_gain(name, num_vectors, width, seed)
    raise TypeError(f"activation_gain expects a name or a callable, got {type(name).__name__}")


activation_gain.names = tuple(sorted(_ACTIVATIONS))
