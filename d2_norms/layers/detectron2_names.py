"""The normalizer names detectron2's own ``get_norm`` knows, read from detectron2 (never changed).

d2_norms does not touch ``detectron2.layers.get_norm``: stock components build what detectron2
builds. This module only asks detectron2 which names it accepts (they differ by version: main
adds ``LN`` and ``naiveSyncBN_N``), so that d2_norms' config checks can tell a stock component's
valid name from one only d2_norms' components build, and so that d2_norms' components accept
detectron2-only names too.
"""
from typing import FrozenSet, Optional

from torch import nn

__all__ = ["detectron2_norm_names", "detectron2_norm"]

_CANDIDATES = ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN")
_NAMES: list = []


def _detectron2_get_norm():
    from detectron2.layers.batch_norm import get_norm

    return get_norm


def detectron2_norm_names() -> FrozenSet[str]:
    """The names detectron2's own ``get_norm`` builds (probed once)."""
    if not _NAMES:
        found = set()
        get_norm = _detectron2_get_norm()
        for name in _CANDIDATES:
            try:
                get_norm(name, 32)
            except (KeyError, ValueError, TypeError, AssertionError):
                continue
            found.add(name)
        _NAMES.append(frozenset(found))
    return _NAMES[0]


def detectron2_norm(name, channels: int) -> Optional[nn.Module]:
    """detectron2's own module for a name it knows; None for names it does not know."""
    if not isinstance(name, str) or name not in detectron2_norm_names():
        return None
    return _detectron2_get_norm()(name, channels)
