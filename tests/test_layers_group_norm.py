"""GroupNorm against GN eq. 1-7 written out, LayerNorm (G=1) and InstanceNorm (G=C)."""
import pytest
import torch
from torch import nn

import d2_norms  # noqa: F401
from d2_norms.layers import GroupNorm, GroupNormDivisibilityError, get_norm

torch.set_num_threads(1)


def gn_formula(x, groups, gamma, beta, eps=1e-5):
    """GN eq. 1-4 with S_i of eq. 7: per sample and group over (C/G, H, W), biased variance."""
    n, c, h, w = x.shape
    xg = x.reshape(n, groups, c // groups, h, w)
    mu = xg.mean(dim=(2, 3, 4), keepdim=True)
    var = ((xg - mu) ** 2).mean(dim=(2, 3, 4), keepdim=True)
    x_hat = ((xg - mu) / torch.sqrt(var + eps)).reshape(n, c, h, w)
    return gamma.view(1, -1, 1, 1) * x_hat + beta.view(1, -1, 1, 1)


def random_affine(m, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
    return m


@pytest.mark.parametrize("kwargs,groups", [({}, 32), ({"num_groups": 8}, 8),
                                           ({"channels_per_group": 16}, 4)])
def test_matches_formula(kwargs, groups):
    m = random_affine(GroupNorm(64, **kwargs))
    assert m.num_groups == groups
    x = torch.randn(2, 64, 5, 7) * 4 + 1
    torch.testing.assert_close(m(x), gn_formula(x, groups, m.weight, m.bias), rtol=1e-5, atol=1e-5)


def test_g1_is_layernorm_over_chw():
    m = random_affine(GroupNorm(12, num_groups=1))
    ln = nn.LayerNorm([12, 4, 6], elementwise_affine=False)
    x = torch.randn(3, 12, 4, 6) * 2 + 0.5
    expected = ln(x) * m.weight.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


def test_g_equal_c_is_instancenorm():
    m = random_affine(GroupNorm(12, num_groups=12))
    inorm = nn.InstanceNorm2d(12, affine=True)
    inorm.load_state_dict({"weight": m.weight, "bias": m.bias})
    x = torch.randn(3, 12, 5, 4) * 3 - 1
    torch.testing.assert_close(m(x), inorm(x), rtol=1e-5, atol=1e-5)
    assert GroupNorm(12, channels_per_group=1).num_groups == 12


def test_divisibility_error_names_width_and_groups():
    with pytest.raises(GroupNormDivisibilityError, match=r"48 channels.*G=32"):
        GroupNorm(48)
    with pytest.raises(GroupNormDivisibilityError, match=r"48 channels.*groups of 32"):
        GroupNorm(48, channels_per_group=32)
    with pytest.raises(GroupNormDivisibilityError, match=r"100 channels.*G=32"):
        get_norm("GN", 100)
    with pytest.raises(GroupNormDivisibilityError, match=r"100 channels.*G=32"):
        get_norm("GNWS", 100)


def test_explicit_fallback():
    assert GroupNorm(48, fallback="largest_divisor").num_groups == 24
    assert GroupNorm(48, channels_per_group=32, fallback="largest_divisor").num_groups == 1
    assert GroupNorm(48, channels_per_group=10, fallback="largest_divisor").num_groups == 4
    assert get_norm("GN_FALLBACK", 100).num_groups == 25
    assert get_norm("GN_G16", 64).num_groups == 16
    assert get_norm("GN_C8", 64).num_groups == 8
    with pytest.raises(ValueError, match="fallback"):
        GroupNorm(64, fallback="nearest")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_large_inputs(dtype):
    m = random_affine(GroupNorm(32, num_groups=8))
    x32 = torch.randn(2, 32, 6, 6) * 1e3 + 500
    x = x32.to(dtype).requires_grad_()
    out = m(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), gn_formula(x.detach().float(), 8, m.weight, m.bias),
                               rtol=2e-2, atol=3e-2)
    out.float().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


def test_batch_of_one_and_1x1_maps():
    m = random_affine(GroupNorm(16, num_groups=4))
    x = torch.randn(1, 16, 1, 1, requires_grad=True)
    out = m(x)
    torch.testing.assert_close(out, gn_formula(x, 4, m.weight, m.bias), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_wrong_input_width():
    with pytest.raises(ValueError, match="16 channels"):
        GroupNorm(16, num_groups=4)(torch.randn(1, 8, 2, 2))
