"""Normalizer layers of d2_norms and the name registry Detectron2's ``get_norm`` consults.

Importing this package registers the built-in names ("", BN, SyncBN, FrozenBN, GN, GNWS, FRN,
FRN_LEPS, NF, parametric GN_G<G>/GN_C<k>/GNWS_*) and patches detectron2 (see
:mod:`d2_norms.layers.norm_registry`). Layers:

* :class:`FilterResponseNorm2d` (= :data:`FRN`), :class:`TLU`, :func:`filter_response_norm`
  (FRN paper eq. 1-3, learned eps sec. 3.3; one fused autograd op, eager or torch.compile);
* :class:`GroupNorm` (GN paper, G groups or channels per group);
* :class:`WSConv2d` (GN+WS), :class:`ScaledStdConv2d` (NF eq. 3), :func:`activation_gain`,
  :func:`fold_weight_standardization` / ``conv.fold()`` for inference.
"""
from .frn import (FRN, TLU, FilterResponseNorm2d, filter_response_norm,
                  frn_compile_cache_sizes, frn_compiled_available, frn_reference, get_frn_impl,
                  set_frn_impl)
from .group_norm import GroupNorm, GroupNormDivisibilityError, resolve_num_groups
from .norm_registry import (ChannelAffine, NormAct, NormSpec, SyncBatchNorm, UnknownNormError,
                            adapt_norms, describe_norms, get_norm, get_norm_act, get_norm_spec,
                            make_conv, norm_conv_kind, norm_name_of,
                            norm_uses_weight_standardization, patch_detectron2, register_norm,
                            registered_norms, unregister_norm)
from .norm_registry import _register_builtins
from .weight_std import (RELU_GAIN, ScaledStdConv2d, WSConv2d, activation_gain,
                         fold_weight_standardization, share_standardized_weights,
                         standardize_weight)

_register_builtins()
patch_detectron2()

__all__ = [
    "FRN", "TLU", "FilterResponseNorm2d", "filter_response_norm", "frn_reference",
    "set_frn_impl", "get_frn_impl",
    "frn_compiled_available", "frn_compile_cache_sizes",
    "GroupNorm", "GroupNormDivisibilityError", "resolve_num_groups",
    "WSConv2d", "ScaledStdConv2d", "activation_gain", "standardize_weight",
    "fold_weight_standardization", "share_standardized_weights", "RELU_GAIN",
    "ChannelAffine", "NormAct", "NormSpec", "SyncBatchNorm", "UnknownNormError", "adapt_norms",
    "describe_norms", "get_norm", "get_norm_act", "get_norm_spec", "make_conv", "norm_conv_kind",
    "norm_name_of", "norm_uses_weight_standardization", "patch_detectron2", "register_norm",
    "registered_norms", "unregister_norm",
]
