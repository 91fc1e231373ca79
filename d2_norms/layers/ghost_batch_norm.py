"""BatchNorm over groups of k images: per-GPU BN of k images per GPU, emulated on one device.

Papers train BN detectors with per-GPU statistics (plain, non-synchronised BN: each GPU
normalizes over its own k images). On fewer GPUs with more images each, plain BN would normalize
over more images, a different network. :class:`GhostBatchNorm2d` splits the per-device batch of
N images into N / k consecutive groups of k images and normalizes each group with its own
statistics ("ghost batch norm", Hoffer et al. 2017): registry names ``BN_IMG<k>``.

What it equals (tested against a real multi-process gloo run, ``tests/test_layers_ghost_bn.py``):
with G = N / k processes each running ``nn.BatchNorm2d`` on its k images (process p takes images
p*k .. p*k + k - 1), under DDP (parameter gradients averaged) and a loss defined as the mean of
the per-process losses,

* outputs: image by image the same;
* input gradients: the same up to the factor 1 / G of the mean (the single-process loss is the
  mean of the G per-process losses; each process's local loss has weight 1);
* weight / bias gradients: the same as DDP's averaged gradients;
* running statistics: each group updates the buffers as its process would (momentum, unbiased
  variance over its k images), and the buffers keep the mean of those G updates. The update is
  linear, so this equals the mean over processes of their per-process buffers, at every step
  (DDP keeps the parameters equal; detectron2 builds DDP with ``broadcast_buffers=False``, so the
  processes' buffers evolve apart). A multi-process checkpoint holds rank 0's buffers, one of the
  G samples whose mean this layer holds.

Eval (and ``track_running_stats`` with running buffers): the running statistics, image by image,
exactly ``nn.BatchNorm2d``. k equal to the batch runs ``nn.BatchNorm2d``'s own forward (bitwise
the same); a training batch that k does not divide raises :class:`ImageGroupError` saying what
to set. Parameter and buffer names are ``nn.BatchNorm2d``'s (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``): checkpoints move between ``BN`` and
``BN_IMG<k>``, and the optimizer, PreciseBN and ``FrozenBN`` conversion treat it as the
BatchNorm it is.

The batch dimension must be images: true in backbones, FPN, RPN and RetinaNet heads (each
pyramid level is a batch of the N images). In the RoI heads it is RoIs; d2_norms' box / mask
heads refuse ``BN_IMG<k>`` (:data:`IMAGE_BATCH_ONLY`).
"""
import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GhostBatchNorm2d", "ImageGroupError", "IMAGE_GROUP_NAME", "images_per_group_of"]

#: Registry names: ``BN_IMG<k>``, BatchNorm statistics over groups of k images.
IMAGE_GROUP_NAME = re.compile(r"^BN_IMG([1-9]\d*)$")


def images_per_group_of(name) -> Optional[int]:
    """k for a ``BN_IMG<k>`` name, else None."""
    if not isinstance(name, str):
        return None
    m = IMAGE_GROUP_NAME.match(name)
    return int(m.group(1)) if m else None


class ImageGroupError(ValueError):
    """A training batch that does not split into groups of ``images_per_group`` images."""


class GhostBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are those of each group of
    ``images_per_group`` consecutive images (see module docstring)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None, *, images_per_group: int):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        if (isinstance(images_per_group, bool) or not isinstance(images_per_group, int)
                or images_per_group < 1):
            raise ValueError(f"GhostBatchNorm2d: images_per_group must be a positive int, got "
                             f"{images_per_group!r}")
        self.images_per_group = images_per_group

    def extra_repr(self) -> str:
        return super().extra_repr() + f", images_per_group={self.images_per_group}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        k = self.images_per_group
        n = x.shape[0]
        use_batch_stats = self.training or (self.running_mean is None
                                            and self.running_var is None)
        if not use_batch_stats or n == k:
            return super().forward(x)
        if n % k:
            raise ImageGroupError(
                f"GhostBatchNorm2d(images_per_group={k}) (norm 'BN_IMG{k}') got a batch of {n} "
                f"images, which does not split into groups of {k}: the per-device batch "
                f"(SOLVER.IMS_PER_BATCH / number of processes) must be a multiple of {k}. Set "
                f"SOLVER.IMS_PER_BATCH to a multiple of {k} x the number of processes, or use "
                f"BN_IMG<d> with d dividing {n} (BN: statistics over the whole batch).")
        groups = n // k
        c = self.num_features
        # (N, C, H, W) -> (k, G*C, H, W): channel g*C + c holds channel c of group g's k images,
        # so batch_norm's per-channel statistics are per (group, channel).
        xg = x.reshape(groups, k, c, *x.shape[2:]).transpose(0, 1).reshape(k, groups * c,
                                                                            *x.shape[2:])
        weight = self.weight.repeat(groups) if self.weight is not None else None
        bias = self.bias.repeat(groups) if self.bias is not None else None
        update = self.training and self.track_running_stats and self.running_mean is not None
        factor = 0.0
        running_mean = running_var = None
        if update:
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
            # each group updates its own copy of the buffers, as its process would
            running_mean = self.running_mean.repeat(groups)
            running_var = self.running_var.repeat(groups)
        yg = F.batch_norm(xg, running_mean, running_var, weight, bias, True, factor, self.eps)
        if update:
            with torch.no_grad():
                # the mean of the G per-group updates = the mean of G processes' buffers
                self.running_mean.copy_(running_mean.view(groups, c).mean(0))
                self.running_var.copy_(running_var.view(groups, c).mean(0))
        return yg.reshape(k, groups, c, *x.shape[2:]).transpose(0, 1).reshape(x.shape)
