"""Filter Response Normalization (FRN) and the Thresholded Linear Unit (TLU).

Singh & Krishnan, "Filter Response Normalization Layer" (CVPR 2020):

* eq. 1   ``nu2 = mean_HW(x^2)`` per sample and channel, ``x_hat = x / sqrt(nu2 + eps)``
          (no mean subtraction);
* eq. 2   ``y = gamma * x_hat + beta`` (per channel);
* eq. 3   TLU ``z = max(y, tau)`` (per channel, tau initialised at 0);
* sec 3.3 eps fixed at 1e-6, or learned as ``1e-6 + |eps_l|`` with ``eps_l`` initialised at 1e-4
          (for 1x1 maps / fully connected layers, where a tiny eps turns FRN into ``sign``).

FRN+TLU runs as ONE autograd operation (:class:`_FRNFunction`) that keeps its input, the
parameters and ``rstd = 1/sqrt(nu2 + eps)`` (``N*C`` floats, so backward needs no second pass
over x for it); a chain of plain ops keeps about five activation-sized copies. The kernels work
on the input as it is (``(N, C, *spatial)``, channels_last too) with ``(C, 1, ..)`` views of the
parameters: no per-row copies, ``.contiguous()`` calls or autocast contexts per call (issue 22:
107 ops per forward+backward -> 39 eager, 12 compiled; GN+ReLU 10). Two implementations of
the same kernels:

* ``eager``    - ordinary PyTorch ops (forward 8 ops, backward ~20);
* ``compiled`` - the same functions through ``torch.compile(dynamic=True)``: forward = one
  loop nest for the statistics + one for the output, backward = one pass over (grad, x) for
  every reduction (all are per (n, c) first) + one for dx. Compiled for symbolic shapes, not
  per input shape (detection inputs change shape every batch). Dynamo still compiles another
  graph for a batch of one (it specializes size 1), rows above 4096 elements (inductor's CPU
  code switches to a cascade summation), 1x1 maps, channels_last, a learned eps; each such
  shape class (and kernel, dtype, device type) gets its own copy of the function, so that no
  copy nears dynamo's per-function recompilation limit (8) - a bounded handful of graphs,
  checked by the tests and printed by ``tools/benchmark_layers.py``. Compilation costs
  seconds per graph (inductor's on-disk cache keeps them).

``auto`` (default) uses ``compiled`` when ``torch.compile`` works here and falls back to
``eager`` for good, with one warning, the first time compilation fails (no C++ compiler, no
Triton, unsupported Python). Choose with the environment variable ``D2_NORMS_FRN_IMPL``
(``auto`` / ``eager`` / ``compiled``) or :func:`set_frn_impl`. Statistics are always computed
in float32 (``x^2`` overflows float16 above ~256); outputs keep the input's dtype.
"""
import logging
import os
import types
from typing import Optional

import torch
from torch import nn

__all__ = [
    "TLU",
    "FilterResponseNorm2d",
    "FRN",
    "filter_response_norm",
    "frn_reference",
    "set_frn_impl",
    "get_frn_impl",
    "frn_compiled_available",
    "frn_compile_cache_sizes",
]

logger = logging.getLogger(__name__)

FRN_EPS = 1e-6  # sec. 3.3: fixed epsilon, and the constant part of the learned one
FRN_LEARNED_EPS_INIT = 1e-4  # sec. 3.3: initial value of eps_l

_IMPLS = ("auto", "eager", "compiled")


# ---------------------------------------------------------------------------------------------
# Kernels on the input's own (N, C, *spatial) layout: parameters broadcast as (C, 1, ..) views
# (no per-row copies, channels_last stays channels_last); statistics in float32 (float64 for
# float64 inputs, so gradcheck sees float64 math). The forward returns rstd = 1/sqrt(nu2 + eps)
# (N*C floats) for the backward, which then needs no second pass for the statistic.
# ---------------------------------------------------------------------------------------------
def _acc(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """float32 for every dtype except float64 (kept, so gradcheck sees float64 math)."""
    return t.to(torch.float64 if like.dtype == torch.float64 else torch.float32)


def _frn_forward(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                 tau: Optional[torch.Tensor], eps: torch.Tensor):
    """eq. 1-3: ``(max(gamma * x * rstd + beta, tau), rstd)``; parameters as ``(C, 1, ..)``
    views, ``eps`` a float or 0-d tensor.

    Plain ops, TorchScript-compatible: scripted/traced FRN runs this same function.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dims = list(range(2, x.dim()))
    length = 1
    for d in x.shape[2:]:
        length = length * d
    # eq. 1 without materialising x^2 (eager); under torch.compile it fuses into one loop
    nu = torch.linalg.vector_norm(x, 2.0, dims, True, dtype=acc)
    rstd = nu.mul_(nu).div_(length).add_(eps).rsqrt_()  # (as before: exported models pin it)
    y = torch.addcmul(beta, x, rstd * gamma)  # eq. 2, float32 for half inputs
    if tau is not None:
        y = torch.maximum(y, tau)  # eq. 3 (TLU); compiled, it fuses into the same loop
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y, rstd


def _frn_backward(grad: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor,
                  gamma: torch.Tensor, beta: torch.Tensor, tau: Optional[torch.Tensor],
                  need_eps: bool):
    """Gradients of z = max(gamma * x * rstd + beta, tau), rstd = (mean x^2 + eps)^-1/2.

    With gy = dL/dy (TLU mask applied once) and A = sum_HW(gy * x) per (n, c):
    dL/dx = s * gy + k * x with s = gamma * rstd, k = -s * rstd^2 * A / L;
    dL/dgamma = sum_n rstd * A, dL/dbeta = sum gy, dL/dtau = sum g - dL/dbeta,
    dL/deps = -1/2 sum_nc gamma * rstd^3 * A (FRN sec. 3.2, written per (n, c)).
    Every reduction is over H*W first (per (n, c)), so a compiler fuses them into one pass
    over (grad, x); the sums over n are on N*C values.
    """
    acc = rstd.dtype
    dims = list(range(2, x.dim()))
    length = 1
    for d in x.shape[2:]:
        length = length * d
    scale = rstd * gamma
    dtau = None
    if tau is not None:
        passed = torch.addcmul(beta, x, scale) >= tau  # where TLU passes y (ties go to y)
        gy = grad * passed
        sgy = gy.sum(dims, keepdim=True, dtype=acc)
        dtau = (grad.sum(dims, keepdim=True, dtype=acc) - sgy).sum(0).view(-1)
    else:
        gy = grad
        sgy = gy.sum(dims, keepdim=True, dtype=acc)
    dbeta = sgy.sum(0).view(-1)
    a = (gy * x).sum(dims, keepdim=True, dtype=acc)
    ra = rstd * a
    dgamma = ra.sum(0).view(-1)
    k = ra.mul_(scale).mul_(rstd).mul_(-1.0 / length)  # ra no longer needed
    dx = torch.addcmul(gy * scale, x, k)
    if dx.dtype != x.dtype:
        dx = dx.to(x.dtype)
    deps = None
    if need_eps:
        deps = (gamma * rstd.pow(3) * a).sum().mul(-0.5)
    return dx, dgamma, dbeta, dtau, deps


def _fwd_tlu(x, gamma, beta, tau, eps):
    return _frn_forward(x, gamma, beta, tau, eps)


def _fwd_plain(x, gamma, beta, eps):
    return _frn_forward(x, gamma, beta, None, eps)


def _bwd_tlu(grad, x, rstd, gamma, beta, tau, need_eps):
    return _frn_backward(grad, x, rstd, gamma, beta, tau, need_eps)


def _bwd_plain(grad, x, rstd, gamma, beta, need_eps):
    return _frn_backward(grad, x, rstd, gamma, beta, None, need_eps)


def _tlu_backward(grad, out, tau_v, need_tau: bool):
    """Standalone TLU's backward from its output: one mask (out > tau), a multiply (not
    torch.where with a 0-d tensor, several times slower on CPU), dtau = sum of the rest."""
    dx = grad * (out > tau_v)
    dtau = None
    if need_tau:
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        dims = [d for d in range(grad.dim()) if d != 1]
        dtau = (grad - dx).sum(dims, dtype=acc)
    return dx, dtau


_EAGER = {"fwd_tlu": _fwd_tlu, "fwd_plain": _fwd_plain, "bwd_tlu": _bwd_tlu,
          "bwd_plain": _bwd_plain, "tlu_bwd": _tlu_backward}


class _CompiledKernels:
    """Lazily ``torch.compile``-d versions of the kernels; disabled for good on first failure."""

    def __init__(self):
        self._fns = {}
        self.broken: Optional[str] = None
        self._supported: Optional[bool] = None

    def available(self) -> bool:
        if self._supported is None:  # checked once: this runs on every FRN call
            try:
                import torch._dynamo

                if not torch._dynamo.is_dynamo_supported():
                    self.broken = "torch.compile is not supported on this Python/platform"
            except Exception as e:  # pragma: no cover - exotic builds
                self.broken = f"torch._dynamo unavailable ({e})"
            self._supported = self.broken is None
        return self.broken is None

    @staticmethod
    def _key(name, args):
        """Which function copy serves this call: per kernel, dtype and device type, and per
        shape class dynamo would otherwise compile another graph of the same function for
        (batch of one, 1x1 maps, rows above 4096 elements, channels_last, learned eps / which
        gradients are needed). Each copy then holds about one graph, far below dynamo's
        per-function recompilation limit (8), however many variants a model runs."""
        x = args[0] if name.startswith("fwd") else args[1]
        shape = x.shape
        length = 1
        for d in shape[2:]:
            length *= d
        flag = args[-1].requires_grad if name.startswith("fwd") and torch.is_tensor(
            args[-1]) else args[-1]
        return (name, x.dtype, x.device.type, x.dim(), shape[0] == 1, length == 1,
                length > 4096, not x.is_contiguous(), flag)

    def get(self, name, args):
        """The compiled kernel for this call (see _key). Each key gets its own copy of the
        function (own code object): dynamo's cache and recompilation limit are per code."""
        key = self._key(name, args)
        entry = self._fns.get(key)
        if entry is None:
            base = _EAGER[name]
            copy = types.FunctionType(base.__code__.replace(), base.__globals__, base.__name__,
                                      base.__defaults__, base.__closure__)
            entry = (torch.compile(copy, dynamic=True, fullgraph=True), copy)
            self._fns[key] = entry
        return entry[0]

    def call(self, name, *args):
        """Run the compiled kernel; on a compilation error fall back to eager permanently."""
        if self.available():
            try:
                return self.get(name, args)(*args)
            except Exception as e:  # compilation problems surface as many exception types
                if _IMPL == "compiled":
                    raise
                self.broken = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                logger.warning(
                    "d2_norms FRN: torch.compile failed (%s); using the eager FRN kernels from "
                    "now on (same results, slower). Set D2_NORMS_FRN_IMPL=eager to skip the "
                    "attempt.", self.broken)
        return _EAGER[name](*args)

    def cache_sizes(self):
        """Number of compiled graphs per kernel (all dtypes/devices), for tests/benchmarks."""
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        sizes = {}
        for (name, *_), (_, copy) in self._fns.items():
            sizes[name] = sizes.get(name, 0) + len(_debug_get_cache_entry_list(copy.__code__))
        return sizes


_COMPILED = _CompiledKernels()


def _read_impl_from_env() -> str:
    impl = os.environ.get("D2_NORMS_FRN_IMPL", "auto").strip().lower() or "auto"
    if impl not in _IMPLS:
        raise ValueError(
            f"D2_NORMS_FRN_IMPL={impl!r} is not valid; use one of {', '.join(_IMPLS)}")
    return impl


_IMPL = _read_impl_from_env()


def set_frn_impl(impl: str) -> None:
    """Choose the FRN kernels: ``"auto"`` (compiled if possible), ``"eager"`` or ``"compiled"``.

    ``"compiled"`` raises instead of falling back when compilation fails.
    """
    global _IMPL
    if impl not in _IMPLS:
        raise ValueError(f"FRN implementation {impl!r} is not valid; use one of {_IMPLS}")
    _IMPL = impl


def get_frn_impl() -> str:
    """The kernels FRN will use now: ``"compiled"`` or ``"eager"``."""
    if _IMPL == "eager":
        return "eager"
    if _IMPL == "compiled":
        return "compiled"
    return "compiled" if _COMPILED.available() else "eager"


def frn_compiled_available() -> bool:
    """True unless torch.compile is unsupported here or already failed in this process."""
    return _COMPILED.available()


def frn_compile_cache_sizes():
    """``{kernel name: number of compiled graphs}`` for the kernels compiled so far."""
    return _COMPILED.cache_sizes()


_EPS_TENSORS = {}


def _eps_tensor(eps: float, device: torch.device) -> torch.Tensor:
    """A cached 0-d float32 tensor holding ``eps`` (the compiled kernels' eps argument)."""
    key = (eps, device)
    t = _EPS_TENSORS.get(key)
    if t is None:
        t = _EPS_TENSORS[key] = torch.full((), eps, dtype=torch.float32, device=device)
    return t


def _run(name, *args):
    """One kernel call: the inputs as they are (no copies, no context managers). Inside a
    user's torch.compile region the outer compiler fuses the eager kernels itself."""
    if _IMPL == "eager" or torch.compiler.is_compiling():
        return _EAGER[name](*args)
    if name.startswith("fwd"):  # one graph for training and inference (no requires_grad guard)
        eps = args[-1]
        if not torch.is_tensor(eps):  # dynamo would make a new tensor of the float per call
            eps = _eps_tensor(float(eps), args[0].device)
        args = (args[0].detach(),) + args[1:-1] + (eps,)
    else:  # a gradient in x's layout (e.g. not sum()'s stride-0 one): no graph per stride
        grad, x = args[0], args[1]
        fmt = torch.contiguous_format
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
                memory_format=torch.channels_last):
            fmt = torch.channels_last
        if not grad.is_contiguous(memory_format=fmt):
            args = (grad.contiguous(memory_format=fmt),) + args[1:]
    return _COMPILED.call(name, *args)


# ---------------------------------------------------------------------------------------------
# Autograd op
# ---------------------------------------------------------------------------------------------
def _channel_views(x, weight, bias, tau):
    """The parameters as ``(C, 1, ..)`` views broadcasting over x: no copies per call, and
    plain tensors (torch.compile treats nn.Parameters' shapes as static: one graph per C)."""
    shape = [-1] + [1] * (x.dim() - 2)
    return weight.view(shape), bias.view(shape), None if tau is None else tau.view(shape)


class _FRNFunction(torch.autograd.Function):
    """FRN (+ TLU when tau is given); saves the input, rstd (N*C floats) and the parameters."""

    @staticmethod
    def forward(ctx, x, weight, bias, tau, eps):
        gamma, beta, tau_v = _channel_views(x, weight, bias, tau)
        if tau is not None:
            out, rstd = _run("fwd_tlu", x, gamma, beta, tau_v, eps)
        else:
            out, rstd = _run("fwd_plain", x, gamma, beta, eps)
        ctx.save_for_backward(x, rstd, gamma, beta, tau_v)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, rstd, gamma, beta, tau_v = ctx.saved_tensors
        need_eps = ctx.needs_input_grad[4]
        if tau_v is not None:
            dx, dgamma, dbeta, dtau, deps = _run("bwd_tlu", grad_out, x, rstd, gamma, beta,
                                                 tau_v, need_eps)
        else:
            dx, dgamma, dbeta, dtau, deps = _run("bwd_plain", grad_out, x, rstd, gamma, beta,
                                                 need_eps)
        return dx, dgamma, dbeta, dtau, deps


def frn_reference(x, weight, bias, tau=None, eps=FRN_EPS):
    """FRN (+TLU) written with plain differentiable ops (for tracing/scripting and empty inputs).

    Statistics are in float32; the result has x's dtype.
    """
    dims = tuple(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    xf = _acc(x, x)
    nu2 = xf.square().mean(dim=dims, keepdim=True) if dims else xf.square()
    y = xf * torch.rsqrt(nu2 + eps) * _acc(weight, x).view(shape) + _acc(bias, x).view(shape)
    if tau is not None:
        y = torch.maximum(y, _acc(tau, x).view(shape))
    return y.to(x.dtype)


def filter_response_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
        tau: Optional[torch.Tensor] = None, eps=FRN_EPS) -> torch.Tensor:
    """Functional FRN (eq. 1-2), followed by TLU (eq. 3) when ``tau`` is given.

    Args:
        x: ``(N, C, *spatial)`` input; the statistics are over the spatial dims (none for
            ``(N, C)`` inputs, where FRN needs a learned eps, sec. 3.3).
        weight, bias, tau: per-channel ``(C,)`` gamma, beta and TLU threshold.
        eps: float, or a 0-dim tensor (a learned epsilon; gradients flow into it).
    """
    if x.dim() < 2:
        raise ValueError(f"FRN expects an (N, C, ...) input, got shape {tuple(x.shape)}")
    if torch.jit.is_tracing():
        eps_t = eps.reshape(()) if torch.is_tensor(eps) else torch.full(
            (), float(eps), dtype=torch.float32, device=x.device)
        return _frn_inference(x, weight, bias, tau, eps_t)
    if x.dim() == 2:  # (N, C): one value per statistic; the kernels want a spatial dim
        return filter_response_norm(x.unsqueeze(-1), weight, bias, tau, eps).squeeze(-1)
    if x.numel() == 0:
        return frn_reference(x, weight, bias, tau, eps)
    if torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or bias.requires_grad
            or (tau is not None and tau.requires_grad)
            or (torch.is_tensor(eps) and eps.requires_grad)):
        return _FRNFunction.apply(x, weight, bias, tau, eps)
    # Inference: the forward kernel alone, no autograd bookkeeping.
    gamma, beta, tau_v = _channel_views(x, weight, bias, tau)
    if tau is not None:
        return _run("fwd_tlu", x, gamma, beta, tau_v, eps)[0]
    return _run("fwd_plain", x, gamma, beta, eps)[0]


def _frn_inference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   tau: Optional[torch.Tensor], eps: torch.Tensor) -> torch.Tensor:
    """The eager forward kernel as plain ops: TorchScript and ``torch.jit.trace`` run this (no
    autograd op, no compiled kernel, no Python-only calls), so an exported FRN computes what
    the eager layer computes in eval mode, op for op. Differentiable (plain ops)."""
    if x.dim() == 2:
        x = x.unsqueeze(-1)
        shape = [-1, 1]
        tau_v: Optional[torch.Tensor] = None if tau is None else tau.view(shape)
        return _frn_forward(x, weight.view(shape), bias.view(shape), tau_v, eps)[0].squeeze(-1)
    shape = [-1] + [1] * (x.dim() - 2)
    tau_v = None if tau is None else tau.view(shape)
    return _frn_forward(x, weight.view(shape), bias.view(shape), tau_v, eps)[0]


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
class _TLUFunction(torch.autograd.Function):
    """``max(x, tau)`` that keeps its OUTPUT for backward, not its input.

    A standalone TLU runs after a residual addition, where its output is the next block's
    input: the next conv keeps that tensor anyway, so saving it here costs nothing, while
    saving ``x`` (as ``torch.maximum`` does) keeps one more activation per block (this is what
    ReLU does too: it saves its output). From the output alone, ``x > tau`` is ``z > tau``; at
    an exact tie ``x == tau`` the gradient goes to tau.
    """

    @staticmethod
    def forward(ctx, x, tau):
        tau_v = tau.view(_channel_shape(x))
        out = torch.maximum(x, tau_v if tau_v.dtype == x.dtype else tau_v.to(x.dtype))
        ctx.save_for_backward(out, tau)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        out, tau = ctx.saved_tensors
        tau_v = tau.view(_channel_shape(out))
        if tau_v.dtype != out.dtype:
            tau_v = tau_v.to(out.dtype)
        dx, dtau = _run("tlu_bwd", grad_out, out, tau_v, ctx.needs_input_grad[1])
        if dtau is not None and dtau.dtype != tau.dtype:
            dtau = dtau.to(tau.dtype)
        return (dx if ctx.needs_input_grad[0] else None), dtau


def _channel_shape(x: torch.Tensor):
    return (1, -1) + (1,) * (x.dim() - 2)


class TLU(nn.Module):
    """Thresholded Linear Unit ``max(x, tau)`` (FRN eq. 3), tau per channel (dim 1), init 0.

    Training keeps only the output for backward (:class:`_TLUFunction`), like ReLU.
    """

    # tau is a normalizer parameter: no weight decay with SOLVER.WEIGHT_DECAY_NORM 0 (the
    # optimizer reads this declaration, d2_norms.solver.optimizer).
    d2n_is_normalizer = True

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features
        self.tau = nn.Parameter(torch.zeros(num_features))

    def forward(self, x):
        if (torch.is_grad_enabled() and (x.requires_grad or self.tau.requires_grad)
                and not torch.jit.is_scripting() and not torch.jit.is_tracing()
                and x.dim() >= 2):
            return _TLUFunction.apply(x, self.tau)
        return torch.maximum(x, self.tau.view(_channel_shape(x)).to(x.dtype))

    def extra_repr(self):
        return str(self.num_features)


class FilterResponseNorm2d(nn.Module):
    """FRN layer (FRN paper, Fig. 2): FRN (eq. 1-2) followed by TLU (eq. 3) in one fused op.

    Args:
        num_features: channels C.
        tlu: apply TLU (the FRN layer of the paper). ``tlu=False`` gives FRN alone, for places
            where no activation follows the norm (e.g. FPN convs, the last conv of a block).
        eps: the fixed epsilon (1e-6); with ``learned_eps`` it is the constant part of
            ``eps + |eps_l|``.
        learned_eps: learn eps as ``eps + |eps_l|`` with ``eps_l`` initialised at
            ``learned_eps_init`` (sec. 3.3) - use for 1x1 maps and FC-like layers.

    Parameters ``weight`` (gamma, init 1), ``bias`` (beta, init 0), ``tau`` (init 0, only with
    TLU) and ``eps_l`` (only with learned eps). Works on ``(N, C, *spatial)`` inputs.
    """

    d2n_is_normalizer = True  # all of them are normalizer parameters (d2_norms.solver)

    def __init__(self, num_features: int, *, tlu: bool = True, eps: float = FRN_EPS,
                 learned_eps: bool = False, learned_eps_init: float = FRN_LEARNED_EPS_INIT):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"FilterResponseNorm2d needs num_features >= 1, got {num_features}")
        if eps < 0:
            raise ValueError(f"FilterResponseNorm2d needs eps >= 0, got {eps}")
        self.num_features = num_features
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.tau = nn.Parameter(torch.zeros(num_features)) if tlu else None
        self.eps_l = nn.Parameter(torch.tensor(float(learned_eps_init))) if learned_eps else None

    @property
    def has_tlu(self) -> bool:
        return self.tau is not None

    @property
    def learned_eps(self) -> bool:
        return self.eps_l is not None

    def effective_eps(self):
        """eps as used in eq. 1: the float, or the tensor ``eps + |eps_l|`` (sec. 3.3)."""
        if self.eps_l is None:
            return self.eps
        return self.eps + self.eps_l.abs()

    def forward(self, x):
        if x.dim() < 2:
            raise ValueError(f"FRN expects an (N, C, ...) input, got shape {list(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"FilterResponseNorm2d({self.num_features}) got an input with {x.shape[1]} "
                f"channels (shape {list(x.shape)})")
        if torch.jit.is_scripting():
            # TorchScript: the eager kernel as plain ops (the autograd op, the compiled kernels
            # and their Python dispatch are training/eager machinery; see _frn_inference).
            eps_l = self.eps_l
            if eps_l is None:
                eps = torch.full((), self.eps, dtype=torch.float32, device=x.device)
            else:
                eps = (self.eps + eps_l.abs()).reshape(())
            return _frn_inference(x, self.weight, self.bias, self.tau, eps)
        else:
            return filter_response_norm(x, self.weight, self.bias, self.tau,
                                        self.effective_eps())

    def extra_repr(self):
        eps = f"eps={self.eps:g}" + (" + |eps_l| (learned)" if self.learned_eps else "")
        return f"{self.num_features}, {eps}, tlu={self.has_tlu}"


FRN = FilterResponseNorm2d
