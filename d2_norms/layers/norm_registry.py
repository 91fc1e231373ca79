"""Normalizers by name: what each name builds and what goes before and after it.

================  =========================================  ===========  ======================
name              norm module (``get_norm(name, C)``)         activation   conv before it
================  =========================================  ===========  ======================
``""``            None                                       ReLU         plain
``BN``            BatchNorm2d                                ReLU         plain
``SyncBN``        SyncBatchNorm (gloo/CPU-capable)            ReLU         plain
``FrozenBN``      detectron2 FrozenBatchNorm2d                ReLU         plain
``GN``            GroupNorm, G=32                            ReLU         plain
``GNWS``          GroupNorm, G=32                            ReLU         WSConv2d
``FRN``           FRN without TLU                            TLU (fused)  plain
``FRN_LEPS``      FRN without TLU, learned eps (sec. 3.3)    TLU (fused)  plain
``NF``            None (the conv carries gain and bias)      ReLU         ScaledStdConv2d
================  =========================================  ===========  ======================

plus ``GN_G<G>`` / ``GN_C<k>`` / ``GNWS_G<G>`` / ``GNWS_C<k>`` (G groups or k channels per group,
GN Table 3), each with an optional ``_FALLBACK`` suffix (largest dividing G instead of an error),
``BN_IMG<k>`` (BatchNorm with statistics over each group of k images of the per-device batch:
per-GPU BN at k images per GPU, emulated on one device; :mod:`.ghost_batch_norm`),
and detectron2's debugging names ``nnSyncBN``, ``naiveSyncBN``, ``naiveSyncBN_N``.

This module only maps names to :class:`NormSpec` entries; it builds nothing into models and
patches nothing. Modules are composed from a spec in one place,
:mod:`d2_norms.layers.conv_norm_act` (conv of the kind the norm needs, the norm, its paired
activation). detectron2's own ``get_norm`` is not changed: stock components build only
detectron2's names, and :mod:`d2_norms.config_checks` refuses a d2_norms name given to one.

Third-party normalizers: ``@register_norm(name, activation=..., conv=..., norm_act=...)`` on a
factory ``channels -> nn.Module``; every d2_norms component (backbones, FPN, heads) then builds
it with the conv and activation it declares.
"""
import functools
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Union

from torch import nn

from .frn import TLU, FilterResponseNorm2d
from .ghost_batch_norm import GhostBatchNorm2d, images_per_group_of
from .group_norm import GroupNorm
from .sync_batch_norm import SyncBatchNorm

__all__ = [
    "NormSpec",
    "UnknownNormError",
    "register_norm",
    "unregister_norm",
    "registered_norms",
    "describe_norms",
    "get_norm_spec",
    "get_norm",
    "norm_conv_kind",
    "norm_uses_weight_standardization",
]

CONV_KINDS = ("plain", "ws", "scaled_ws")


class UnknownNormError(ValueError):
    """A norm name that is not registered."""


@dataclass(frozen=True)
class NormSpec:
    """What a registered name means.

    factory: ``channels -> nn.Module or None`` (the norm alone).
    activation: ``"relu"``, ``None`` (no activation) or ``channels -> nn.Module``.
    norm_act: optional ``channels -> nn.Module`` building norm + activation as one module.
    conv: ``"plain"``, ``"ws"`` or ``"scaled_ws"``.
    """

    name: str
    factory: Callable[[int], Optional[nn.Module]]
    activation: Union[str, None, Callable[[int], nn.Module]] = "relu"
    norm_act: Optional[Callable[[int], nn.Module]] = None
    conv: str = "plain"
    description: str = ""

    @property
    def pairs_with_relu(self) -> bool:
        return self.activation == "relu" and self.norm_act is None

    def build_activation(self, channels: int) -> Optional[nn.Module]:
        if self.activation is None:
            return None
        if self.activation == "relu":
            return nn.ReLU()
        if isinstance(self.activation, str):
            raise ValueError(f"norm {self.name!r}: unknown activation {self.activation!r}")
        return self.activation(channels)


_REGISTRY: "OrderedDict[str, NormSpec]" = OrderedDict()
_LOCK = threading.Lock()
_FAMILY = re.compile(r"^(GN|GNWS)(?:_G(\d+)|_C(\d+))?(_FALLBACK)?$")


def _check_name(name):
    if not isinstance(name, str):
        raise TypeError(f"norm names are strings, got {type(name).__name__}")


def register_norm(name: str, *, activation: Union[str, None, Callable] = "relu",
                  conv: str = "plain", norm_act: Optional[Callable[[int], nn.Module]] = None,
                  description: str = "", overwrite: bool = False):
    """Decorator registering ``factory(channels) -> nn.Module`` under ``name``.

    Example::

        @register_norm("MyNorm", activation=lambda c: nn.SiLU())
        def my_norm(channels):
            return MyNorm(channels)

    After this, ``MODEL.*.NORM: "MyNorm"`` works in every d2_norms component (backbones, FPN,
    heads), each building ``MyNorm`` followed by SiLU. Stock detectron2 components build only
    detectron2's own names; d2_norms' config checks (:mod:`d2_norms.config_checks`) refuse a
    registered name given to one, before anything is built, naming the d2_norms component.
    """
    _check_name(name)
    if name == "":
        raise ValueError("the empty norm name means 'no norm' and cannot be registered")
    if conv not in CONV_KINDS:
        raise ValueError(f"register_norm({name!r}): conv must be one of {CONV_KINDS}, got {conv!r}")
    if isinstance(activation, str) and activation != "relu":
        raise ValueError(f"register_norm({name!r}): activation must be 'relu', None or a "
                         f"factory channels -> nn.Module, got {activation!r}")

    def decorator(factory):
        if not callable(factory):
            raise TypeError(f"register_norm({name!r}) decorates a callable channels -> nn.Module")
        with _LOCK:
            if name in _REGISTRY and not overwrite:
                raise ValueError(f"norm {name!r} is already registered "
                                 f"({_REGISTRY[name].description or _REGISTRY[name].factory}); "
                                 "pass overwrite=True to replace it")
            doc = description or (factory.__doc__ or "").strip().split("\n")[0]
            _REGISTRY[name] = NormSpec(name, factory, activation, norm_act, conv, doc)
        return factory

    return decorator


def unregister_norm(name: str) -> None:
    """Remove a registered name (tests / plugins that re-register)."""
    with _LOCK:
        _REGISTRY.pop(name, None)


def registered_norms():
    """Registered names, in registration order ("" first)."""
    return list(_REGISTRY)


def describe_norms() -> str:
    lines = [f"{name:16s} act={_act_str(s):6s} conv={s.conv:9s} {s.description}"
             for name, s in _REGISTRY.items()]
    lines.append("GN_G<G>, GN_C<k>, GNWS_G<G>, GNWS_C<k> (+ _FALLBACK): parametric GroupNorm")
    lines.append("BN_IMG<k>: BatchNorm with statistics over each group of k images (per-GPU BN "
                 "at k images per GPU)")
    return "\n".join(lines)


def _act_str(spec):
    if spec.norm_act is not None:
        return "fused"
    if spec.activation is None:
        return "none"
    return spec.activation if isinstance(spec.activation, str) else "custom"


def _family_spec(name: str) -> Optional[NormSpec]:
    m = _FAMILY.match(name)
    if m is None or (m.group(2) is None and m.group(3) is None and m.group(4) is None):
        return None
    base, groups, cpg, fb = m.groups()
    fallback = "largest_divisor" if fb else "error"
    if groups is not None:
        kwargs = {"num_groups": int(groups)}
    elif cpg is not None:
        kwargs = {"channels_per_group": int(cpg)}
    else:
        kwargs = {"num_groups": 32}

    def factory(channels):
        return GroupNorm(channels, fallback=fallback, **kwargs)

    what = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    return NormSpec(name, factory, "relu", None, "ws" if base == "GNWS" else "plain",
                    f"GroupNorm({what}, fallback={fallback})")


def _image_group_spec(name: str) -> Optional[NormSpec]:
    k = images_per_group_of(name)
    if k is None:
        return None
    # a class-like factory: CycleBatchNormList calls it as bn_class(num_features=C, affine=False)
    factory = functools.partial(GhostBatchNorm2d, images_per_group=k)
    return NormSpec(name, factory, "relu", None, "plain",
                    f"BatchNorm2d, statistics over each group of {k} images (per-GPU BN at {k} "
                    "images per GPU)")


def get_norm_spec(name: str) -> NormSpec:
    """The :class:`NormSpec` of a registered (or parametric GN / BN_IMG) name; raises
    UnknownNormError."""
    _check_name(name)
    spec = _REGISTRY.get(name)
    if spec is None:
        spec = _family_spec(name)
    if spec is None:
        spec = _image_group_spec(name)
    if spec is None:
        raise UnknownNormError(_unknown_message(name))
    return spec


def _unknown_message(name):
    names = ", ".join(repr(n) for n in _REGISTRY)
    hint = ""
    lowered = {n.lower(): n for n in _REGISTRY}
    if name.lower() in lowered:
        hint = f" Did you mean {lowered[name.lower()]!r}? (names are case-sensitive)"
    return (f"Unknown norm {name!r}.{hint} Registered norms: {names}; parametric: GN_G<groups>, "
            "GN_C<channels per group>, GNWS_G<groups>, GNWS_C<channels per group> (optionally "
            "with a _FALLBACK suffix), BN_IMG<images per group>. Register your own with "
            "@d2_norms.layers.register_norm(name).")


def _check_channels(channels):
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"get_norm: channels must be a positive int, got {channels!r}")


def get_norm(norm, out_channels):
    """The normalization layer for ``norm`` (a registered name or a callable), or None.

    Args:
        norm: ``""``/None (no norm), a registered name (see module docstring) or a callable
            ``channels -> nn.Module``.
        out_channels: the width of the layer to normalize.
    """
    if norm is None:
        return None
    if isinstance(norm, str):
        if len(norm) == 0:
            return None
        _check_channels(out_channels)
        try:
            spec = get_norm_spec(norm)
        except UnknownNormError:
            from .detectron2_names import detectron2_norm

            module = detectron2_norm(norm, out_channels)  # names only detectron2 knows ("LN")
            if module is None:
                raise
            return module
        return spec.factory(out_channels)
    if callable(norm):
        return norm(out_channels)
    raise TypeError(f"norm must be a name (str), a callable or None, got {type(norm).__name__}")


def norm_conv_kind(norm) -> str:
    """``"plain"``, ``"ws"`` or ``"scaled_ws"``: the conv a norm name expects before it."""
    if norm is None or norm == "" or not isinstance(norm, str):
        return "plain"
    try:
        return get_norm_spec(norm).conv
    except UnknownNormError:
        get_norm(norm, 32)  # names only detectron2 knows: plain; otherwise the clear error
        return "plain"


def norm_uses_weight_standardization(norm) -> bool:
    """True when convs before this norm are Weight-Standardized (:class:`WSConv2d`, e.g. GNWS).

    "NF" uses Scaled WS instead (``norm_conv_kind(name) == "scaled_ws"``), which is False here.
    """
    return norm_conv_kind(norm) == "ws"



def _no_norm_module(channels):
    """No normalization layer: the Scaled WS conv before it carries gain and bias (NF 4.4)."""
    return None


def _register_builtins():
    from detectron2.layers.batch_norm import FrozenBatchNorm2d, NaiveSyncBatchNorm

    register_norm("BN", description="BatchNorm2d (batch statistics)")(nn.BatchNorm2d)
    register_norm("SyncBN", description="SyncBatchNorm (cross-process batch statistics; CPU/gloo "
                  "via detectron2's NaiveSyncBatchNorm)")(SyncBatchNorm)
    register_norm("FrozenBN", description="detectron2 FrozenBatchNorm2d (fixed affine)")(
        FrozenBatchNorm2d)
    register_norm("GN", description="GroupNorm, G=32 (GN paper)")(
        lambda c: GroupNorm(c, num_groups=32))
    register_norm("GNWS", conv="ws",
                  description="GroupNorm G=32 after weight-standardized convs (GN+WS)")(
        lambda c: GroupNorm(c, num_groups=32))
    register_norm("FRN", activation=TLU,
                  norm_act=lambda c: FilterResponseNorm2d(c, tlu=True),
                  description="Filter Response Norm (eps 1e-6) + TLU")(
        lambda c: FilterResponseNorm2d(c, tlu=False))
    register_norm("FRN_LEPS", activation=TLU,
                  norm_act=lambda c: FilterResponseNorm2d(c, tlu=True, learned_eps=True),
                  description="FRN with learned eps 1e-6+|eps_l| (sec. 3.3) + TLU")(
        lambda c: FilterResponseNorm2d(c, tlu=False, learned_eps=True))
    register_norm("NF", conv="scaled_ws",
                  description="no activation normalization: Scaled WS convs carrying the affine "
                  "gain and bias (NF-ResNets)")(_no_norm_module)
    # detectron2 v0.6's debugging names, kept working.
    register_norm("nnSyncBN", description="torch.nn.SyncBatchNorm")(nn.SyncBatchNorm)
    register_norm("naiveSyncBN", description="detectron2 NaiveSyncBatchNorm")(NaiveSyncBatchNorm)
    register_norm("naiveSyncBN_N", description="detectron2 NaiveSyncBatchNorm(stats_mode='N')")(
        lambda c: NaiveSyncBatchNorm(c, stats_mode="N"))
