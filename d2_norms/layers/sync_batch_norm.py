"""``SyncBatchNorm`` that also synchronizes on CPU (gloo): the registry's "SyncBN"."""
from torch import nn

__all__ = ["SyncBatchNorm"]


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
