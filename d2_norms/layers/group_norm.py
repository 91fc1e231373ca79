"""Group Normalization (Wu & He, ECCV 2018).

GN eq. 1-7: channels are split into G groups; each sample's group ``(C/G, H, W)`` is
normalised by its own mean and variance (eq. 1-2, with the set S_i of eq. 7), then a per-channel
affine ``gamma * x_hat + beta`` (eq. 4). G = 32 is the paper's default (sec. 3.1); Table 3 also
evaluates a fixed number of channels per group, which :class:`GroupNorm` accepts as
``channels_per_group``. G = 1 is LayerNorm over (C, H, W) and G = C is InstanceNorm (sec. 3.1).

A width that the grouping does not divide raises :class:`GroupNormDivisibilityError`, naming
the width and G, unless the caller asked for ``fallback="largest_divisor"`` (G becomes the
largest divisor of C not above the requested G; with channels_per_group, the group size becomes
the smallest divisor of C not below the requested one).
"""
import logging

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GroupNorm", "GroupNormDivisibilityError", "GN_DEFAULT_GROUPS", "resolve_num_groups"]

logger = logging.getLogger(__name__)

GN_DEFAULT_GROUPS = 32  # GN paper sec. 3.1 / Table 2
_FALLBACKS = ("error", "largest_divisor")


class GroupNormDivisibilityError(ValueError):
    """The layer width cannot be split into the requested groups."""


def resolve_num_groups(num_channels: int, num_groups=None, channels_per_group=None,
                       fallback: str = "error") -> int:
    """Number of groups G for a layer of ``num_channels`` (see the module docstring)."""
    if fallback not in _FALLBACKS:
        raise ValueError(f"GroupNorm fallback must be one of {_FALLBACKS}, got {fallback!r}")
    if (num_groups is None) == (channels_per_group is None):
        raise ValueError("GroupNorm: give exactly one of num_groups or channels_per_group")
    if num_channels < 1:
        raise ValueError(f"GroupNorm needs at least one channel, got num_channels={num_channels}")
    if num_groups is not None:
        if num_groups < 1:
            raise ValueError(f"GroupNorm needs num_groups >= 1, got {num_groups}")
        if num_channels % num_groups == 0:
            return num_groups
        if fallback == "largest_divisor":
            groups = max(g for g in range(1, min(num_groups, num_channels) + 1)
                         if num_channels % g == 0)
            logger.info("GroupNorm: %d channels are not divisible by G=%d; using G=%d",
                        num_channels, num_groups, groups)
            return groups
        divisors = [g for g in (1, 2, 4, 8, 16, 32, 64) if num_channels % g == 0]
        raise GroupNormDivisibilityError(
            f"GroupNorm: a layer with {num_channels} channels cannot be split into G={num_groups} "
            f"groups ({num_channels} % {num_groups} = {num_channels % num_groups}). Use a width "
            f"divisible by {num_groups}, choose G among the divisors of {num_channels} "
            f"(e.g. {divisors}; norm name 'GN_G<G>'), or fall back to the largest divisor "
            "(norm name suffix '_FALLBACK' / GroupNorm(fallback='largest_divisor')).")
    cpg = channels_per_group
    if cpg < 1:
        raise ValueError(f"GroupNorm needs channels_per_group >= 1, got {cpg}")
    if num_channels % cpg == 0:
        return num_channels // cpg
    if fallback == "largest_divisor":
        size = min(s for s in range(cpg, num_channels + 1) if num_channels % s == 0)
        logger.info("GroupNorm: %d channels are not divisible into groups of %d; using groups "
                    "of %d", num_channels, cpg, size)
        return num_channels // size
    raise GroupNormDivisibilityError(
        f"GroupNorm: a layer with {num_channels} channels cannot be split into groups of "
        f"{cpg} channels ({num_channels} % {cpg} = {num_channels % cpg}). Use a width divisible "
        f"by {cpg}, another group size (norm name 'GN_C<channels>'), or fall back (norm name "
        "suffix '_FALLBACK' / GroupNorm(fallback='largest_divisor')).")


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with G or channels-per-group, clear width errors and float32 statistics.

    Args:
        num_channels: C.
        num_groups: G (default 32 when ``channels_per_group`` is not given).
        channels_per_group: fixed C/G (GN Table 3); exclusive with ``num_groups``.
        eps: added to the variance (eq. 1).
        fallback: ``"error"`` (default) or ``"largest_divisor"``.

    float16/bfloat16 inputs are normalised with float32 statistics and the result is cast back,
    so large activations neither overflow nor lose the variance.
    """

    def __init__(self, num_channels: int, num_groups=None, *, channels_per_group=None,
                 eps: float = 1e-5, affine: bool = True, fallback: str = "error"):
        if num_groups is None and channels_per_group is None:
            num_groups = GN_DEFAULT_GROUPS
        groups = resolve_num_groups(num_channels, num_groups, channels_per_group, fallback)
        super().__init__(groups, num_channels, eps=eps, affine=affine)
        self.requested_groups = num_groups
        self.requested_channels_per_group = channels_per_group

    def forward(self, x):
        # Written for TorchScript too (F.group_norm instead of super().forward, a list for the
        # shape): stock detectron2 models holding this layer stay scriptable.
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"GroupNorm({self.num_channels} channels) got an input of shape {list(x.shape)}")
        weight, bias = self.weight, self.bias
        if x.dtype == torch.float16 or x.dtype == torch.bfloat16:
            weight = weight.float() if weight is not None else None
            bias = bias.float() if bias is not None else None
            return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)
