"""FRN / TLU against the paper's formulas, timm, gradcheck; eager vs compiled kernels."""
import logging

import pytest
import torch

import d2_norms  # noqa: F401  (shims, registry)
from d2_norms.layers import TLU, FilterResponseNorm2d, frn_reference
from d2_norms.layers import filter_response_norm as frn
from d2_norms.layers import frn as frn_module
from d2_norms.profiling import SavedTensorMeter

torch.set_num_threads(1)


@pytest.fixture
def eager():
    previous = frn_module._IMPL
    frn_module.set_frn_impl("eager")
    yield
    frn_module.set_frn_impl(previous)


def frn_formula(x, gamma, beta, tau, eps):
    """FRN eq. 1-3 written out.

    nu2 = mean_HW x^2; y = gamma x / sqrt(nu2 + eps) + beta; z = max(y, tau).
    """
    nu2 = (x * x).mean(dim=(2, 3), keepdim=True)
    x_hat = x / torch.sqrt(nu2 + eps)
    y = gamma.view(1, -1, 1, 1) * x_hat + beta.view(1, -1, 1, 1)
    if tau is None:
        return y
    return torch.where(y > tau.view(1, -1, 1, 1), y, tau.view(1, -1, 1, 1).expand_as(y))


def randomize(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.copy_(torch.empty(p.shape).uniform_(-0.5, 0.5, generator=gen)
                        + (1.0 if p is module.weight else 0.0))
    return module


@pytest.mark.parametrize("tlu", [True, False])
@pytest.mark.parametrize("shape", [(2, 8, 7, 9), (1, 8, 5, 5), (3, 8, 1, 1)])
def test_frn_matches_written_out_formula(eager, tlu, shape):
    torch.manual_seed(0)
    m = randomize(FilterResponseNorm2d(8, tlu=tlu))
    x = torch.randn(*shape) * 3
    expected = frn_formula(x, m.weight, m.bias, m.tau, 1e-6)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference path (no autograd op)
        torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


def test_learned_eps_is_1e6_plus_abs_eps_l(eager):
    m = randomize(FilterResponseNorm2d(4, learned_eps=True))
    assert m.eps_l.item() == pytest.approx(1e-4)  # sec. 3.3 initialisation
    with torch.no_grad():
        m.eps_l.fill_(-0.3)  # |eps_l| is used: eps = 1e-6 + 0.3
    x = torch.randn(2, 4, 1, 1)  # 1x1 maps: the case learned eps is for
    expected = frn_formula(x, m.weight, m.bias, m.tau, 1e-6 + 0.3)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-6)


def test_frn_on_fc_features(eager):
    """(N, C) inputs: FRN over an empty spatial extent, nu2 = x^2 (FC-like heads, sec. 3.3)."""
    m = randomize(FilterResponseNorm2d(6, learned_eps=True))
    x = torch.randn(5, 6, requires_grad=True)
    eps = 1e-6 + m.eps_l.abs()
    expected = torch.maximum(m.weight * x / torch.sqrt(x * x + eps) + m.bias, m.tau)
    out = m(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    gx, gel = torch.autograd.grad(out, (x, m.eps_l), g)
    ex, eel = torch.autograd.grad(expected, (x, m.eps_l), g)
    torch.testing.assert_close(gx, ex, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gel, eel, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tlu", [True, False])
def test_matches_timm(eager, tlu):
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(1)
    ours = randomize(FilterResponseNorm2d(16, tlu=tlu), seed=3)
    ref = timm_layers.FilterResponseNormTlu2d(16, apply_act=tlu, eps=1e-6)
    ref.load_state_dict(ours.state_dict())
    for shape in [(2, 16, 13, 11), (1, 16, 4, 4)]:
        x = torch.randn(*shape, requires_grad=True)
        out, out_ref = ours(x), ref(x)
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, [x] + list(ours.parameters()), g)
        grads_ref = torch.autograd.grad(out_ref, [x] + list(ref.parameters()), g)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _gradcheck_inputs(shape, tlu, learned):
    gen = torch.Generator().manual_seed(7)
    c = shape[1]
    x = torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)
    w = (torch.rand(c, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    b = (torch.randn(c, dtype=torch.float64, generator=gen) * 0.3).requires_grad_()
    tau = None
    if tlu:
        tau = (torch.randn(c, dtype=torch.float64, generator=gen) * 0.3).requires_grad_()
    eps_l = torch.tensor(0.05, dtype=torch.float64, requires_grad=True) if learned else None
    return x, w, b, tau, eps_l


@pytest.mark.parametrize("tlu,learned,shape", [
    (True, False, (2, 3, 4, 5)),
    (False, False, (2, 3, 4, 5)),
    (True, True, (2, 3, 1, 1)),
    (False, True, (1, 3, 3, 2)),
])
def test_gradcheck_float64(eager, tlu, learned, shape):
    """The fused op's hand-written backward against finite differences (float64 kernels)."""
    x, w, b, tau, eps_l = _gradcheck_inputs(shape, tlu, learned)
    inputs = [x, w, b] + ([tau] if tlu else []) + ([eps_l] if learned else [])

    def fn(*args):
        tt = args[3] if tlu else None
        eps = (1e-6 + args[-1].abs()) if learned else 1e-3
        return frn(args[0], args[1], args[2], tt, eps)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_module_learned_eps(eager):
    m = randomize(FilterResponseNorm2d(3, learned_eps=True)).double()
    x = torch.randn(2, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    out = m(x)
    (g_eps,) = torch.autograd.grad(out.sum(), m.eps_l)
    assert g_eps.abs() > 0  # eps is learned through the fused op


def test_gradcheck_tlu_module():
    m = TLU(3).double()
    with torch.no_grad():
        m.tau.copy_(torch.tensor([-0.2, 0.1, 0.4], dtype=torch.float64))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():  # keep inputs away from the kink at tau
        x += torch.where((x - m.tau.view(1, -1, 1, 1)).abs() < 1e-3, 0.01, 0.0)
    assert torch.autograd.gradcheck(lambda inp, tau: torch.maximum(inp, tau.view(1, -1, 1, 1)),
                                    (x, m.tau))
    assert torch.autograd.gradcheck(m, (x,))
    expected = torch.where(x > m.tau.view(1, -1, 1, 1), x, m.tau.view(1, -1, 1, 1).expand_as(x))
    torch.testing.assert_close(m(x), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_large_inputs_stay_finite(eager, dtype):
    m = randomize(FilterResponseNorm2d(8))
    x32 = torch.randn(2, 8, 6, 6) * 1e3  # x^2 ~ 1e6 overflows float16 (max 65504)
    x = x32.to(dtype).requires_grad_()
    out = m(x)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    expected = frn_formula(x.detach().float(), m.weight, m.bias, m.tau, 1e-6)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    out.float().square().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32
               for p in m.parameters())


def test_batch_of_one_and_empty_batch(eager):
    m = randomize(FilterResponseNorm2d(4))
    x = torch.randn(1, 4, 3, 3, requires_grad=True)
    torch.testing.assert_close(m(x), frn_formula(x, m.weight, m.bias, m.tau, 1e-6))
    m(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    empty = torch.zeros(0, 4, 14, 14, requires_grad=True)  # a mask head with no instances
    out = m(empty)
    assert out.shape == empty.shape
    out.sum().backward()
    assert empty.grad.shape == empty.shape


def _saved_bytes(fn, *inputs):
    with SavedTensorMeter() as meter:
        fn(*inputs)
    return meter.total


@pytest.mark.parametrize("learned_eps", [False, True])
def test_saves_only_input_rstd_and_parameters(eager, learned_eps):
    """The input, 1/sqrt(nu2 + eps) per (sample, channel) in float32 (N*C floats, so that
    backward needs no second pass over x for it) and the parameters: nothing else."""
    m = FilterResponseNorm2d(32, learned_eps=learned_eps)
    x = torch.randn(64, 32, 4, 4, requires_grad=True)
    saved = _saved_bytes(m, x)
    params_and_eps = 3 * 32 * 4 + 2 * 4  # gamma, beta, tau; the 0-d eps (and eps_l)
    assert saved <= x.numel() * 4 + 64 * 32 * 4 + params_and_eps
    # the unfused chain (reference ops) keeps several activation-sized tensors
    assert _saved_bytes(lambda t: frn_reference(t, m.weight, m.bias, m.tau), x) > 3 * x.numel() * 4


@pytest.mark.parametrize("impl", ["eager", "compiled"])
def test_channels_last_input_is_not_copied(impl):
    """channels_last in, channels_last out (the kernels broadcast (C, 1, 1) parameter views
    over the input as it is), same numbers as the formula, gradients too."""
    if impl == "compiled" and not frn_module.frn_compiled_available():
        pytest.skip("torch.compile unsupported here")
    previous = frn_module._IMPL
    frn_module.set_frn_impl(impl)
    try:
        m = randomize(FilterResponseNorm2d(8), seed=2)
        x = (torch.randn(2, 8, 6, 5) * 2).to(memory_format=torch.channels_last)
        x.requires_grad_()
        with SavedTensorMeter() as meter:
            out = m(x)
        assert out.is_contiguous(memory_format=torch.channels_last)
        x_ref = x.detach().contiguous().requires_grad_()
        ref = frn_formula(x_ref, m.weight, m.bias, m.tau, 1e-6)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        g = torch.randn(2, 8, 6, 5)
        out.backward(g)
        ref.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
        # x itself is kept (no contiguous copy)
        assert (x.untyped_storage().data_ptr(), "cpu") in meter.storages
    finally:
        frn_module.set_frn_impl(previous)


def test_eps_validation_and_channel_mismatch():
    with pytest.raises(ValueError, match="eps"):
        FilterResponseNorm2d(4, eps=-1.0)
    with pytest.raises(ValueError, match="4 channels|got an input with 5"):
        FilterResponseNorm2d(4)(torch.randn(1, 5, 2, 2))


# ---------------------------------------------------------------------------------------------
# compiled kernels
# ---------------------------------------------------------------------------------------------
needs_compile = pytest.mark.skipif(not frn_module.frn_compiled_available(),
                                   reason="torch.compile unsupported here")


@needs_compile
@pytest.mark.parametrize("tlu", [True, False])
def test_compiled_equals_eager_and_does_not_recompile_per_shape(tlu):
    previous = frn_module._IMPL
    fwd, bwd = ("fwd_tlu", "bwd_tlu") if tlu else ("fwd_plain", "bwd_plain")

    def run(shape, impl):
        frn_module.set_frn_impl(impl)
        xi = x_by_shape[shape].clone().requires_grad_()
        out = m(xi)
        g = torch.linspace(-1, 1, out.numel()).view_as(out) + 0.5
        return (out,) + torch.autograd.grad(out, [xi] + list(m.parameters()), g)

    try:
        m = randomize(FilterResponseNorm2d(16, tlu=tlu), seed=5)
        # Shape classes with a graph each: batch > 1 / batch of one (dynamo specializes size
        # 1), rows of H*W <= 4096 / longer (inductor's CPU code reduces differently). Within a
        # class no recompilation, whatever N, C, H, W.
        classes = [[(2, 16, 12, 10), (3, 16, 20, 6), (2, 16, 33, 17)],
                   [(1, 16, 7, 9), (1, 16, 5, 64)],
                   [(1, 16, 70, 70)], [(2, 16, 50, 120)]]
        shapes = [s for c in classes for s in c]
        x_by_shape = {s: torch.randn(*s) * 2 for s in shapes}
        before = frn_module.frn_compile_cache_sizes() if frn_module._COMPILED._fns else {}
        start = (before.get(fwd, 0), before.get(bwd, 0))
        counts = []
        for shape in shapes:
            eager_res, compiled_res = run(shape, "eager"), run(shape, "compiled")
            # output and dx: elementwise; parameter grads are sums over N*H*W elements whose
            # float32 summation order differs (inductor uses cascade sums)
            for i, (a, b) in enumerate(zip(eager_res, compiled_res)):
                tol = 1e-5 if i < 2 else 2e-4
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)
            sizes = frn_module.frn_compile_cache_sizes()
            counts.append((sizes[fwd] - start[0], sizes[bwd] - start[1]))
        assert counts[-1][0] <= len(classes) and counts[-1][1] <= len(classes), counts
        # another channel count, shapes again, inference (no grad): no new graph
        m2 = randomize(FilterResponseNorm2d(24, tlu=tlu), seed=6)
        frn_module.set_frn_impl("compiled")
        for shape in shapes:
            xi = torch.randn(shape[0], 24, *shape[2:], requires_grad=True)
            m2(xi).sum().backward()
            with torch.no_grad():
                m(x_by_shape[shape])
        sizes = frn_module.frn_compile_cache_sizes()
        assert (sizes[fwd] - start[0], sizes[bwd] - start[1]) == counts[-1], (sizes, counts)
    finally:
        frn_module.set_frn_impl(previous)


def test_falls_back_to_eager_when_compilation_fails(monkeypatch, caplog):
    kernels = frn_module._CompiledKernels()

    def broken_compile(*args, **kwargs):
        def fn(*a, **k):
            raise RuntimeError("InductorError: no C++ compiler found")
        return fn

    monkeypatch.setattr(frn_module, "_COMPILED", kernels)
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(frn_module, "_IMPL", "auto")
    m = randomize(FilterResponseNorm2d(4))
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger=frn_module.__name__):
        out = m(x)
    assert "torch.compile failed" in caplog.text
    torch.testing.assert_close(out, frn_formula(x, m.weight, m.bias, m.tau, 1e-6))
    out.sum().backward()
    assert frn_module.get_frn_impl() == "eager" and not frn_module.frn_compiled_available()
    # explicit "compiled" re-raises instead of hiding the failure
    monkeypatch.setattr(frn_module, "_COMPILED", frn_module._CompiledKernels())
    monkeypatch.setattr(frn_module, "_IMPL", "compiled")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        m(x)


def test_impl_validation(monkeypatch):
    with pytest.raises(ValueError, match="eager"):
        frn_module.set_frn_impl("fast")
    monkeypatch.setenv("D2_NORMS_FRN_IMPL", "bogus")
    with pytest.raises(ValueError, match="D2_NORMS_FRN_IMPL"):
        frn_module._read_impl_from_env()


def test_functional_accepts_tensor_eps(eager):
    x = torch.randn(2, 3, 4, 4)
    w, b = torch.ones(3), torch.zeros(3)
    eps = torch.tensor(0.5)
    torch.testing.assert_close(frn(x, w, b, None, eps), frn_formula(x, w, b, None, 0.5))


def test_tlu_gradients_match_torch_maximum_and_keep_only_the_output():
    """TLU's autograd op saves its output (the next conv keeps it anyway), not its input."""
    m = TLU(4)
    with torch.no_grad():
        m.tau.copy_(torch.tensor([-0.3, 0.0, 0.2, 0.5]))
    x = torch.randn(3, 4, 5, 5)
    with torch.no_grad():  # no exact ties with tau
        x += torch.where((x - m.tau.view(1, -1, 1, 1)).abs() < 1e-4, 1e-3, 0.0)
    g = torch.randn(3, 4, 5, 5)
    x1 = x.clone().requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = m(x1)
    out.backward(g)
    tau_ref = m.tau.detach().clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    ref = torch.maximum(x2, tau_ref.view(1, -1, 1, 1))
    ref.backward(g)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(m.tau.grad, tau_ref.grad)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].untyped_storage().data_ptr() == \
        out.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() != x1.untyped_storage().data_ptr() for t in saved)


def test_tlu_without_grad_is_plain_maximum():
    m = TLU(2)
    x = torch.randn(1, 2, 3, 3)
    with torch.no_grad():
        out = m(x)
    assert out.grad_fn is None
    torch.testing.assert_close(out, torch.clamp_min(x, 0.0))


@needs_compile
@pytest.mark.parametrize("shape", [(16, 8, 1, 1), (2, 8, 7, 9), (5, 8)])
def test_compiled_learned_eps_gradients_match_eager(shape):
    """FRN_LEPS (eps = 1e-6 + |eps_l|) through the compiled kernels: output and every gradient,
    eps_l's included, equal the eager kernels' (1x1 maps, maps, (N, C) features)."""
    m = randomize(FilterResponseNorm2d(8, learned_eps=True), seed=4)
    with torch.no_grad():
        m.eps_l.fill_(0.02)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 2
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    results = []
    previous = frn_module._IMPL
    try:
        for impl in ("eager", "compiled"):
            frn_module.set_frn_impl(impl)
            xi = x.clone().requires_grad_()
            out = m(xi)
            results.append((out,) + torch.autograd.grad(out, [xi] + list(m.parameters()), g))
    finally:
        frn_module.set_frn_impl(previous)
    assert results[1][-1].abs() > 0  # eps_l learns
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)
