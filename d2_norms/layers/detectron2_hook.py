"""How norm names reach detectron2's own ``get_norm``, and where stock components refuse them.

``import d2_norms`` binds :func:`detectron2_get_norm` (or, in the modules of detectron2's
components listed in ``STOCK_COMPONENTS``, a :class:`StockGetNorm` naming that component) in
place of ``detectron2.layers.get_norm``, in ``detectron2.layers`` and in every loaded module
that imported it by name. That is the whole integration: no class is wrapped, swapped or
rebuilt after construction.

* detectron2's own names ("", BN, SyncBN, FrozenBN, GN, nnSyncBN, naiveSyncBN, and on newer
  versions naiveSyncBN_N, LN) and callables go to detectron2's own function: a stock model
  that uses none of d2_norms' names is the model it is without d2_norms (same classes, same
  outputs; ``tests/test_import_neutrality.py``).
* d2_norms' names that mean, in a stock component, the network they name (a plain conv, the
  norm, ReLU: ``GN_G<G>``, ``GN_C<k>``, third-party norms registered with ``activation="relu"``
  and ``conv="plain"``) come from the registry.
* Names a stock component would turn into a different network (FRN/FRN_LEPS followed by ReLU
  instead of TLU; GNWS without WS convs; NF without Scaled WS convs and, in the ResNet, without
  the NF-ResNet's residual scaling; any norm registered with another activation or conv) raise
  :class:`StockComponentNormError`, naming the component, the config key and the d2_norms
  component to use. Never a silently different network.

detectron2 v0.6's ``RetinaNetHead`` asks for a width-1 norm only to read its type; for registry
names the RetinaNet binding builds that one at :data:`TYPE_PROBE_WIDTH` channels instead.
"""
import sys
from dataclasses import dataclass
from typing import Dict, Optional

from .norm_registry import NormSpec, UnknownNormError, get_norm_spec

__all__ = ["StockComponentNormError", "StockGetNorm", "STOCK_COMPONENTS", "detectron2_get_norm",
           "detectron2_norm", "install_get_norm_hook"]

TYPE_PROBE_WIDTH = 1024  # divisible by every group count a GN name is likely to ask for

_D2N_BACKBONES = ("MODEL.BACKBONE.NAME: build_d2n_resnet_fpn_backbone (Mask R-CNN), "
                  "build_d2n_retinanet_resnet_fpn_backbone (RetinaNet) or "
                  "build_d2n_resnet_backbone")
_LAZY = ("In a LazyConfig use d2_norms' generated configs (configs/lazy/, one field "
         "recipe.norm=...).")


class StockComponentNormError(ValueError):
    """A stock detectron2 component was asked for a norm it would build as another network."""


@dataclass(frozen=True)
class StockComponent:
    """What the error message says about the stock component(s) of one detectron2 module."""

    component: str
    key: str
    use: str


STOCK_COMPONENTS: Dict[str, StockComponent] = {
    "detectron2.modeling.backbone.resnet": StockComponent(
        "detectron2's ResNet (BasicStem / BasicBlock / BottleneckBlock, "
        "MODEL.BACKBONE.NAME: build_resnet_*)", "MODEL.RESNETS.NORM",
        f"d2_norms' ResNet (norm-aware, or the NF-ResNet for NF): {_D2N_BACKBONES}"),
    "detectron2.modeling.backbone.fpn": StockComponent(
        "detectron2's FPN (MODEL.BACKBONE.NAME: build_*_fpn_backbone)", "MODEL.FPN.NORM",
        f"d2_norms' FPN (NormFPN) and ResNet: {_D2N_BACKBONES}"),
    "detectron2.modeling.meta_arch.retinanet": StockComponent(
        "detectron2's RetinaNetHead (MODEL.META_ARCHITECTURE: RetinaNet)", "MODEL.RETINANET.NORM",
        "MODEL.META_ARCHITECTURE: D2NormsRetinaNet (d2_norms.modeling.heads)"),
    "detectron2.modeling.roi_heads.box_head": StockComponent(
        "detectron2's FastRCNNConvFCHead (MODEL.ROI_BOX_HEAD.NAME)", "MODEL.ROI_BOX_HEAD.NORM",
        "MODEL.ROI_BOX_HEAD.NAME: D2NormsConvFCHead (d2_norms.modeling.heads)"),
    "detectron2.modeling.roi_heads.mask_head": StockComponent(
        "detectron2's MaskRCNNConvUpsampleHead (MODEL.ROI_MASK_HEAD.NAME)",
        "MODEL.ROI_MASK_HEAD.NORM",
        "MODEL.ROI_MASK_HEAD.NAME: D2NormsMaskHead (d2_norms.modeling.heads)"),
}
_ANY_COMPONENT = StockComponent(
    "a stock detectron2 component", "its NORM key",
    "d2_norms' components: backbones build_d2n_*, MODEL.META_ARCHITECTURE: D2NormsRetinaNet, "
    "MODEL.RPN.HEAD_NAME: D2NormsRPNHead, MODEL.ROI_BOX_HEAD.NAME: D2NormsConvFCHead, "
    "MODEL.ROI_MASK_HEAD.NAME: D2NormsMaskHead")

_STATE: Dict[str, object] = {}


def _original():
    return _STATE.get("original")


def _detectron2_norm_names() -> frozenset:
    """The names detectron2's own get_norm accepts (probed once: they differ by version)."""
    names = _STATE.get("names")
    if names is None:
        found = set()
        for name in ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN",
                     "naiveSyncBN_N", "LN"):
            try:
                _original()(name, 32)
            except KeyError:
                continue
            found.add(name)
        names = _STATE["names"] = frozenset(found)
    return names


def _is_detectron2s(norm) -> bool:
    return not isinstance(norm, str) or norm == "" or (
        _original() is not None and norm in _detectron2_norm_names())


def detectron2_norm(name, channels):
    """detectron2's own module for a name it knows; None for names it does not know."""
    if _original() is None or not isinstance(name, str) or name not in _detectron2_norm_names():
        return None
    return _original()(name, channels)


def _why_not(spec: NormSpec, component: StockComponent) -> Optional[str]:
    """Why a stock component (plain conv, norm, ReLU) would not build what ``spec`` names."""
    if spec.conv == "scaled_ws":
        extra = (" and the NF-ResNet's residual scaling (x + alpha * f(x / beta))"
                 if component.key == "MODEL.RESNETS.NORM" else "")
        return (f"{spec.name!r} means no activation normalization: Scaled WS convs carrying "
                f"gain and bias{extra} (NF paper); a stock component would build plain convs")
    if spec.conv == "ws":
        return (f"{spec.name!r} needs weight-standardized convs (WSConv2d) before the norm; a "
                "stock component would build plain convs (GroupNorm without WS)")
    if not spec.pairs_with_relu:
        act = "TLU" if spec.name.startswith("FRN") else "its own activation"
        return (f"{spec.name!r} pairs with {act}, not ReLU; a stock component would put ReLU "
                "after it (and after residual additions)")
    return None


class StockGetNorm:
    """``get_norm`` as the stock component(s) of one detectron2 module see it."""

    def __init__(self, component: StockComponent = _ANY_COMPONENT, type_probe: bool = False):
        self.component = component
        self.type_probe = type_probe  # v0.6 RetinaNetHead: get_norm(norm, 1) reads the type

    def __call__(self, norm, out_channels):
        if _is_detectron2s(norm):
            return _original()(norm, out_channels)
        c = self.component
        try:
            spec = get_norm_spec(norm)
        except UnknownNormError as e:
            raise UnknownNormError(f"{c.component}: {c.key}={norm!r}: {e}") from None
        why = _why_not(spec, c)
        if why is not None:
            raise StockComponentNormError(
                f"{c.component} cannot build {c.key}={norm!r}: {why}, so it would be a "
                f"different network. Use {c.use}, or set {c.key} to a norm it builds as named "
                f"(BN, SyncBN, GN, GN_G<groups>, ...). {_LAZY} See docs/layers.md.")
        if self.type_probe and out_channels == 1:
            out_channels = TYPE_PROBE_WIDTH
        return spec.factory(out_channels)

    def __repr__(self):
        return f"d2_norms get_norm hook for {self.component.component}"


detectron2_get_norm = StockGetNorm()
detectron2_get_norm.__doc__ = "What ``detectron2.layers.get_norm`` is after ``import d2_norms``."


def _hook_for(module_name: str) -> StockGetNorm:
    component = STOCK_COMPONENTS.get(module_name)
    if component is None:
        return detectron2_get_norm
    return StockGetNorm(component, type_probe=module_name.endswith("meta_arch.retinanet"))


def install_get_norm_hook() -> bool:
    """Bind the hook in detectron2 (idempotent). False when detectron2 is absent."""
    if _STATE.get("done"):
        return True
    try:
        import detectron2.layers as d2_layers
        import detectron2.layers.batch_norm as d2_bn
        import detectron2.modeling  # noqa: F401  (binds get_norm in all stock modules)
    except ImportError:
        return False
    original = d2_bn.get_norm
    _STATE["original"] = original
    d2_bn.get_norm = detectron2_get_norm
    d2_layers.get_norm = detectron2_get_norm
    # Every module that bound the original by name so far (detectron2's own modules, and any
    # third-party detectron2 project imported before d2_norms); identity check only. Modules
    # imported later import the hook from detectron2.layers.
    for name, mod in list(sys.modules.items()):
        try:
            if getattr(mod, "get_norm", None) is original:
                mod.get_norm = _hook_for(name)
        except Exception:  # exotic lazy modules may raise on attribute access
            continue
    _STATE["done"] = True
    return True
