"""Filter Response Normalization (FRN) and the Thresholded Linear Unit (TLU).

Singh & Krishnan, "Filter Response Normalization Layer" (CVPR 2020):

* eq. 1   ``nu2 = mean_HW(x^2)`` per sample and channel, ``x_hat = x / sqrt(nu2 + eps)``
          (no mean subtraction);
* eq. 2   ``y = gamma * x_hat + beta`` (per channel);
* eq. 3   TLU ``z = max(y, tau)`` (per channel, tau initialised at 0);
* sec 3.3 eps fixed at 1e-6, or learned as ``1e-6 + |eps_l|`` with ``eps_l`` initialised at 1e-4
          (for 1x1 maps / fully connected layers, where a tiny eps turns FRN into ``sign``).

FRN+TLU runs as ONE autograd operation (:class:`_FRNFunction`) that keeps only its input (and
the parameters) for backward; ``nu2`` and everything else is recomputed there, where a chain of
plain ops keeps about five copies. (Keeping ``1/sqrt(nu2 + eps)`` would cost ``N*C`` floats per
layer - little, but per ROI in the Mask R-CNN heads it put FRN 0.2% above BN's memory.) Its forward/backward kernels exist in two implementations giving the same numbers:

* ``eager``    - the kernels below run as ordinary PyTorch ops;
* ``compiled`` - the same kernels through ``torch.compile(dynamic=True)``, so each kernel is
  fused into a few loops and compiled for symbolic shapes, not per input shape (detection
  inputs change shape every batch). Inputs are viewed as ``(N*C, H*W)`` so a batch of one image
  does not trigger a size-1 specialisation. Per kernel, dtype and device the graphs are: one for
  ``H*W <= 4096``, one for longer rows (inductor's CPU code switches to a cascade summation
  there), one for ``H*W == 1`` maps - a bounded handful, checked by the tests and printed by
  ``tools/benchmark_layers.py``. Compilation costs ~40 s cold on a 2-core CPU and a few
  seconds with inductor's on-disk cache.

``auto`` (default) uses ``compiled`` when ``torch.compile`` works here and falls back to
``eager`` for good, with one warning, the first time compilation fails (no C++ compiler, no
Triton, unsupported Python). Choose with the environment variable ``D2_NORMS_FRN_IMPL``
(``auto`` / ``eager`` / ``compiled``) or :func:`set_frn_impl`. Statistics are always computed
in float32 (``x^2`` overflows float16 above ~256); outputs keep the input's dtype.
"""
import logging
import os
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
# Kernels on a (rows, L) view: rows = N*C (one row per sample and channel), L = H*W.
# Per-row parameters are gamma/beta/tau repeated over the batch. All math in float32.
# ---------------------------------------------------------------------------------------------
def _acc(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """float32 for every dtype except float64 (kept, so gradcheck sees float64 math)."""
    return t.to(torch.float64 if like.dtype == torch.float64 else torch.float32)


def _rstd(x2, eps) -> torch.Tensor:
    """eq. 1 per row: ``1/sqrt(mean(x^2) + eps)``, accumulated in float32 (float64 for float64)
    without materialising x^2 in eager mode."""
    acc = torch.float64 if x2.dtype == torch.float64 else torch.float32
    nu2 = torch.linalg.vector_norm(x2, 2, dim=1, dtype=acc).square() / x2.shape[1]
    return torch.rsqrt(nu2 + eps.to(acc))


def _frn_forward_kernel(x2, gamma_r, beta_r, tau_r: Optional[torch.Tensor],
                        eps) -> torch.Tensor:
    rstd = _rstd(x2, eps)
    scale = (rstd * _acc(gamma_r, x2)).unsqueeze(1)
    y = torch.addcmul(_acc(beta_r, x2).unsqueeze(1), _acc(x2, x2), scale)  # eq. 2
    if tau_r is not None:
        y = torch.maximum(y, _acc(tau_r, x2).unsqueeze(1))  # eq. 3 (TLU)
    return y.to(x2.dtype)


def _frn_backward_kernel(grad2, x2, eps, gamma_r, beta_r, tau_r):
    """Gradients of z = max(gamma * x * rstd + beta, tau) with rstd = (mean x^2 + eps)^-1/2
    (recomputed from x).

    With xh = x * rstd and gy = dL/dy:  dL/dx = rstd * gamma * (gy - xh * mean(gy * xh)),
    dL/dgamma = sum(gy * xh), dL/dbeta = sum(gy), dL/dtau = sum(dL/dz where y < tau),
    dL/deps = -rstd^2 * gamma * sum(gy * xh) / 2 (FRN sec. 3.2, written per row).
    """
    length = x2.shape[1]
    rstd = _rstd(x2, eps)
    g = _acc(grad2, x2)
    gamma = _acc(gamma_r, x2)
    xh = _acc(x2, x2) * rstd.unsqueeze(1)
    if tau_r is not None:
        y = torch.addcmul(_acc(beta_r, x2).unsqueeze(1), xh, gamma.unsqueeze(1))
        passed = y >= _acc(tau_r, x2).unsqueeze(1)  # where TLU passes y (ties go to y)
        gy = torch.where(passed, g, torch.zeros((), dtype=g.dtype, device=g.device))
        dtau_r = g.sum(1) - gy.sum(1)
    else:
        gy = g
        dtau_r = None
    dbeta_r = gy.sum(1)
    dgamma_r = (gy * xh).sum(1)
    coef = (dgamma_r / length).unsqueeze(1)
    dx = (gy - xh * coef) * (rstd * gamma).unsqueeze(1)
    deps_r = -0.5 * rstd.square() * gamma * dgamma_r
    return dx.to(x2.dtype), dgamma_r, dbeta_r, dtau_r, deps_r


def _fwd_tlu(x2, gamma_r, beta_r, tau_r, eps):
    return _frn_forward_kernel(x2, gamma_r, beta_r, tau_r, eps)


def _fwd_plain(x2, gamma_r, beta_r, eps):
    return _frn_forward_kernel(x2, gamma_r, beta_r, None, eps)


def _bwd_tlu(grad2, x2, eps, gamma_r, beta_r, tau_r):
    return _frn_backward_kernel(grad2, x2, eps, gamma_r, beta_r, tau_r)


def _bwd_plain(grad2, x2, eps, gamma_r, beta_r):
    dx, dgamma, dbeta, _, deps = _frn_backward_kernel(grad2, x2, eps, gamma_r, beta_r, None)
    return dx, dgamma, dbeta, deps


_EAGER = {"fwd_tlu": _fwd_tlu, "fwd_plain": _fwd_plain, "bwd_tlu": _bwd_tlu,
          "bwd_plain": _bwd_plain}


class _CompiledKernels:
    """Lazily ``torch.compile``-d versions of the kernels; disabled for good on first failure."""

    def __init__(self):
        self._fns = {}
        self.broken: Optional[str] = None

    def available(self) -> bool:
        if self.broken is not None:
            return False
        try:
            import torch._dynamo  # noqa: F401

            if not torch._dynamo.is_dynamo_supported():
                self.broken = "torch.compile is not supported on this Python/platform"
                return False
        except Exception as e:  # pragma: no cover - exotic builds
            self.broken = f"torch._dynamo unavailable ({e})"
            return False
        return True

    def get(self, name):
        fn = self._fns.get(name)
        if fn is None:
            fn = torch.compile(_EAGER[name], dynamic=True, fullgraph=True)
            self._fns[name] = fn
        return fn

    def call(self, name, *args):
        """Run the compiled kernel; on a compilation error fall back to eager permanently."""
        if self.available():
            try:
                return self.get(name)(*args)
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
        """Number of compiled graphs per kernel (recompilations + 1), for tests/benchmarks."""
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return {name: len(_debug_get_cache_entry_list(_EAGER[name].__code__))
                for name in self._fns}


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


def _run(name, *args):
    # Kernels see plain, contiguous tensors: no autograd flags or strides for guards to vary on,
    # and run without autocast (they choose their float32 math themselves).
    args = tuple(None if a is None else a.detach().contiguous() for a in args)
    if torch.compiler.is_compiling():
        # Inside a user's torch.compile region the outer compiler fuses the eager kernels.
        return _EAGER[name](*args)
    with torch.autocast(args[0].device.type, enabled=False):
        if _IMPL == "eager":
            return _EAGER[name](*args)
        return _COMPILED.call(name, *args)


# ---------------------------------------------------------------------------------------------
# Autograd op
# ---------------------------------------------------------------------------------------------
def _rows(param: torch.Tensor, batch: int) -> torch.Tensor:
    return param.reshape(1, -1).expand(batch, -1).reshape(-1)


class _FRNFunction(torch.autograd.Function):
    """FRN (+ TLU when tau is given) with saved tensors = input + parameters (+ 0-d eps)."""

    @staticmethod
    def forward(ctx, x, weight, bias, tau, eps):
        n, c = x.shape[0], x.shape[1]
        x2 = x.reshape(n * c, -1)
        gamma_r, beta_r = _rows(weight, n), _rows(bias, n)
        if tau is not None:
            out = _run("fwd_tlu", x2, gamma_r, beta_r, _rows(tau, n), eps)
        else:
            out = _run("fwd_plain", x2, gamma_r, beta_r, eps)
        ctx.save_for_backward(x, eps, weight, bias, tau)
        ctx.eps_needs_grad = eps.requires_grad
        return out.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, eps, weight, bias, tau = ctx.saved_tensors
        n, c = x.shape[0], x.shape[1]
        x2 = x.reshape(n * c, -1)
        grad2 = grad_out.reshape(n * c, -1)
        gamma_r, beta_r = _rows(weight, n), _rows(bias, n)
        if tau is not None:
            dx, dgamma_r, dbeta_r, dtau_r, deps_r = _run(
                "bwd_tlu", grad2, x2, eps, gamma_r, beta_r, _rows(tau, n))
        else:
            dx, dgamma_r, dbeta_r, deps_r = _run("bwd_plain", grad2, x2, eps, gamma_r, beta_r)
            dtau_r = None

        def per_channel(rows, like):
            return rows.view(n, c).sum(0).to(like.dtype)

        dweight = per_channel(dgamma_r, weight) if ctx.needs_input_grad[1] else None
        dbias = per_channel(dbeta_r, bias) if ctx.needs_input_grad[2] else None
        dtau = per_channel(dtau_r, tau) if tau is not None and ctx.needs_input_grad[3] else None
        deps = deps_r.sum().reshape(()) if ctx.eps_needs_grad else None
        return dx.view(x.shape), dweight, dbias, dtau, deps


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
    if not torch.is_tensor(eps):
        eps_t = torch.full((), float(eps), dtype=torch.float32, device=x.device)
    else:
        eps_t = eps.reshape(())
    if torch.jit.is_tracing():
        return _frn_inference(x, weight, bias, tau, eps_t)
    if x.numel() == 0 or x.shape[0] * x.shape[1] == 1:
        return frn_reference(x, weight, bias, tau, eps_t)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or bias.requires_grad
        or (tau is not None and tau.requires_grad) or eps_t.requires_grad)
    if needs_grad:
        return _FRNFunction.apply(x, weight, bias, tau, eps_t)
    # Inference: the forward kernel alone, no autograd bookkeeping (grad mode off, as inside
    # the autograd op, so both reuse one compiled graph).
    n, c = x.shape[0], x.shape[1]
    x2 = x.reshape(n * c, -1)
    with torch.no_grad():
        if tau is not None:
            out = _run("fwd_tlu", x2, _rows(weight, n), _rows(bias, n), _rows(tau, n), eps_t)
        else:
            out = _run("fwd_plain", x2, _rows(weight, n), _rows(bias, n), eps_t)
    return out.view(x.shape)


def _frn_inference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   tau: Optional[torch.Tensor], eps: torch.Tensor) -> torch.Tensor:
    """The eager forward kernel on the ``(N*C, H*W)`` view, as plain ops: TorchScript and
    ``torch.jit.trace`` run this (no autograd op, no compiled kernel, no Python-only calls), so
    an exported FRN computes what the eager layer computes in eval mode, op for op.

    Differentiable (plain ops), so a trace taken with gradients enabled still works. Shapes
    come from ``x`` at run time (an ROI head's batch changes per image). The one difference to
    eager: an input with N*C == 1 goes through the same kernel here, eager uses
    :func:`frn_reference` for it (same math, a different summation order: ~1e-7).
    """
    n = x.shape[0]
    c = x.shape[1]
    length = 1
    for d in x.shape[2:]:
        length = length * d
    x2 = x.reshape(n * c, length)  # explicit length: reshape(0, -1) of an empty batch fails
    gamma_r = weight.reshape(1, -1).expand(n, -1).reshape(-1)
    beta_r = bias.reshape(1, -1).expand(n, -1).reshape(-1)
    tau_r: Optional[torch.Tensor] = None
    if tau is not None:
        tau_r = tau.reshape(1, -1).expand(n, -1).reshape(-1)
    return _frn_forward_kernel(x2, gamma_r, beta_r, tau_r, eps).view(x.shape)


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
        out = torch.maximum(x, tau.view(_channel_shape(x)).to(x.dtype))
        ctx.save_for_backward(out, tau)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        out, tau = ctx.saved_tensors
        passed = out > tau.view(_channel_shape(out)).to(out.dtype)
        zero = torch.zeros((), dtype=grad_out.dtype, device=grad_out.device)
        dx = torch.where(passed, grad_out, zero) if ctx.needs_input_grad[0] else None
        dtau = None
        if ctx.needs_input_grad[1]:
            dims = [d for d in range(grad_out.dim()) if d != 1]
            acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
            dtau = torch.where(passed, zero, grad_out).sum(dims, dtype=acc).to(tau.dtype)
        return dx, dtau


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
