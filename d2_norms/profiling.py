"""Measuring what autograd keeps for backward: the CPU memory measure of the benchmarks and of
the layer tests (on CUDA the benchmarks use ``torch.cuda.max_memory_allocated``)."""
import torch

__all__ = ["SavedTensorMeter", "count_ops"]


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


def count_ops(fn, x: torch.Tensor, *, warmup: int = 2):
    """Operators dispatched by one ``fn(x).sum().backward()`` (issue 22's launch measure).

    Counted with ``torch.profiler`` on CPU: every ``aten::`` op that has no ``aten::`` op above
    it (ops a native op calls internally are its own business; autograd engine, autograd
    Function and compiled-region records are not ops). The harness is included: the ``sum``,
    its backward (``ones_like``, ``expand``) and one ``add_`` per gradient accumulated into an
    existing ``.grad`` (``warmup`` earlier calls leave every ``.grad`` set, as in training
    without ``zero_grad(set_to_none=True)``). Deterministic for a given code path.

    Returns ``(count, names)`` in call order.
    """
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn(x).sum().backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(x).sum().backward()
    names = []
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            names.append(event.name)
    return len(names), names
