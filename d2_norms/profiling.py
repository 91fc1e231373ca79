"""Measuring what autograd keeps for backward: the CPU memory measure of the benchmarks and of
the layer tests (on CUDA the benchmarks use ``torch.cuda.max_memory_allocated``)."""
import torch

__all__ = ["SavedTensorMeter"]


class SavedTensorMeter:
    """Bytes autograd saves for backward while the ``with`` block runs: unique storages, each
    counted once (a tensor saved by two ops, or as two views, is one storage).

    Parameters saved by an op count too (as they would in GPU memory); compare models that have
    the same parameters, or subtract them.
    """

    def __init__(self):
        self.storages = {}

    def pack(self, t):
        try:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), str(storage.device))
            self.storages[key] = max(self.storages.get(key, 0), storage.nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without storage
            pass
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())
