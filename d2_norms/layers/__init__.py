"""Normalizer layers of d2_norms, one idea per file, and the name registry.

* ``frn.py``: :class:`FilterResponseNorm2d` (= :data:`FRN`), :class:`TLU`,
  :func:`filter_response_norm` (FRN paper eq. 1-3, learned eps sec. 3.3; one fused autograd op,
  eager or torch.compile);
* ``group_norm.py``: :class:`GroupNorm` (GN paper, G groups or channels per group);
* ``weight_std.py``: :class:`WSConv2d` (GN+WS), :class:`ScaledStdConv2d` (NF eq. 3),
  :func:`activation_gain`, :func:`fold_weight_standardization` / ``conv.fold()`` for inference;
* ``sync_batch_norm.py``: :class:`SyncBatchNorm` (also on CPU / gloo);
* ``ghost_batch_norm.py``: :class:`GhostBatchNorm2d` (``BN_IMG<k>``: BatchNorm statistics over
  groups of k images, per-GPU BN emulated on one device);
* ``norm_registry.py``: name -> :class:`NormSpec` (norm factory, paired activation, conv kind),
  :func:`register_norm` for third parties;
* ``conv_norm_act.py``: the one composer (:func:`resolve_norm`, :func:`conv_norm_act`,
  :func:`get_norm_act`) every d2_norms component builds its layers with;
* ``detectron2_names.py``: which names detectron2's own ``get_norm`` builds (read, never
  changed: importing d2_norms leaves detectron2's ``get_norm`` and stock components as they are;
  a stock component asked for a d2_norms name is refused by the config checks,
  :mod:`d2_norms.config_checks`, before anything is built).
"""
from .conv_norm_act import NormAct, ResolvedNorm, conv_norm_act, get_norm_act, resolve_norm
from .detectron2_names import detectron2_norm, detectron2_norm_names
from .frn import (FRN, TLU, FilterResponseNorm2d, filter_response_norm,
                  frn_compile_cache_sizes, frn_compiled_available, frn_reference, get_frn_impl,
                  set_frn_impl)
from .ghost_batch_norm import (GhostBatchNorm2d, ImageGroupError, images_per_group_of)
from .group_norm import GroupNorm, GroupNormDivisibilityError, resolve_num_groups
from .norm_registry import (NormSpec, UnknownNormError, describe_norms, get_norm, get_norm_spec,
                            norm_conv_kind, norm_uses_weight_standardization, register_norm,
                            registered_norms, unregister_norm)
from .norm_registry import _register_builtins
from .sync_batch_norm import SyncBatchNorm
from .weight_std import (RELU_GAIN, ScaledStdConv2d, WSConv2d, activation_gain,
                         fold_weight_standardization, share_standardized_weights,
                         standardize_weight)

_register_builtins()

__all__ = [
    "FRN", "TLU", "FilterResponseNorm2d", "filter_response_norm", "frn_reference",
    "set_frn_impl", "get_frn_impl",
    "frn_compiled_available", "frn_compile_cache_sizes",
    "GroupNorm", "GroupNormDivisibilityError", "resolve_num_groups",
    "WSConv2d", "ScaledStdConv2d", "activation_gain", "standardize_weight",
    "fold_weight_standardization", "share_standardized_weights", "RELU_GAIN",
    "SyncBatchNorm", "GhostBatchNorm2d", "ImageGroupError", "images_per_group_of", "NormSpec", "UnknownNormError", "describe_norms", "get_norm",
    "get_norm_spec", "norm_conv_kind", "norm_uses_weight_standardization", "register_norm",
    "registered_norms", "unregister_norm",
    "NormAct", "ResolvedNorm", "resolve_norm", "conv_norm_act", "get_norm_act",
    "detectron2_norm", "detectron2_norm_names",
]
