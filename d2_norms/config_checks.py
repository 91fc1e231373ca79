"""Config checks that find every normalizer problem of a yacs config at once, before anything
is built or written.

d2_norms leaves detectron2's ``get_norm`` and its stock components as they are. A stock
component builds detectron2's own names only; given a name only d2_norms builds (FRN, GNWS, NF,
GN_G16, ...) it would fail deep in the model build (``KeyError``) or, for names that mean
another network (FRN followed by ReLU instead of TLU, GN without weight standardization, NF
without Scaled WS), it could not honour the name at all. These checks read which component the
config selects for each norm key and report, for every key at once, what to change:

* a stock component given a d2_norms name: the d2_norms component that builds it;
* a name no component knows (typo): close names;
* ``BN_IMG<k>`` (BatchNorm over groups of k images) in a RoI head, whose batch holds RoIs, and
  a per-device training batch that k does not divide (:func:`image_group_problems`);
* a norm key nobody reads (``MODEL.RPN.NORM`` with detectron2's RPN head) or a head with no
  layer to normalize (``NUM_CONV: 0``): never a silently different network;
* NF with inputs far from unit variance (detectron2's ``PIXEL_STD`` of 1 on 0-255 pixels): the
  NF-ResNet's signal propagation assumes unit-variance inputs (NF paper sec. 3-4);
* weights made with other normalizers than the config builds (checkpoints record the normalizer
  of each part, :data:`NORM_RECORD`; :func:`weights_norm_problem`).

:func:`norm_problems` returns the messages (empty: nothing to change). ``tools/train_net.py``'s
preflight and the LazyConfig trainer call it; so can a user's own script.
"""
import difflib
from dataclasses import dataclass
from typing import List, Optional, Sequence

from .config import NF_NORM, get_dotted

__all__ = ["norm_problems", "image_group_problems", "nf_input_problem", "UNIT_VARIANCE_PIXEL_STD", "Part", "PARTS",
           "check_norm_name", "active_norms", "NORM_RECORD", "norm_record",
           "weights_norm_problem"]

#: ImageNet pixel std (BGR, 0-255), what d2_norms' from-scratch configs use: unit-variance inputs.
UNIT_VARIANCE_PIXEL_STD = (57.375, 57.120, 58.395)

_D2N_BACKBONES_TEXT = ("MODEL.BACKBONE.NAME: build_d2n_resnet_fpn_backbone (Mask R-CNN), "
                       "build_d2n_retinanet_resnet_fpn_backbone (RetinaNet) or "
                       "build_d2n_resnet_backbone")


@dataclass(frozen=True)
class Part:
    """One normalizer key and the component that reads it, by the config key naming it."""

    key: str  # the norm key, e.g. MODEL.FPN.NORM
    selector: str  # the key naming the component, e.g. MODEL.BACKBONE.NAME
    d2_norms: Sequence[str]  # component names of d2_norms that read ``key``
    stock: Sequence[str]  # detectron2's component names that read ``key``
    stock_text: str  # how a message names the stock component
    use: str  # what to set to get d2_norms' component
    family: str = ""  # only for this detector family ("RetinaNet" / "GeneralizedRCNN")
    needs: str = ""  # a boolean key that must be true for the part to exist (MODEL.MASK_ON)
    num_conv_key: str = ""  # the layers the norm applies to (0: nothing to normalize)
    after_norm: str = "puts ReLU after every norm"  # what the stock component does after a norm


PARTS = (
    Part("MODEL.RESNETS.NORM", "MODEL.BACKBONE.NAME",
         ("build_d2n_resnet_backbone", "build_d2n_resnet_fpn_backbone",
          "build_d2n_retinanet_resnet_fpn_backbone"),
         ("build_resnet_backbone", "build_resnet_fpn_backbone",
          "build_retinanet_resnet_fpn_backbone"),
         "detectron2's ResNet (BasicStem / BottleneckBlock)",
         f"d2_norms' ResNet (norm-aware, or the NF-ResNet for NF): {_D2N_BACKBONES_TEXT}"),
    Part("MODEL.FPN.NORM", "MODEL.BACKBONE.NAME",
         ("build_d2n_resnet_fpn_backbone", "build_d2n_retinanet_resnet_fpn_backbone"),
         ("build_resnet_fpn_backbone", "build_retinanet_resnet_fpn_backbone"),
         "detectron2's FPN", f"d2_norms' FPN (NormFPN) and ResNet: {_D2N_BACKBONES_TEXT}",
         after_norm="has no activation after its norms"),
    Part("MODEL.RETINANET.NORM", "MODEL.META_ARCHITECTURE", ("D2NormsRetinaNet",), ("RetinaNet",),
         "detectron2's RetinaNetHead", "MODEL.META_ARCHITECTURE: D2NormsRetinaNet",
         family="RetinaNet"),
    Part("MODEL.RPN.NORM", "MODEL.RPN.HEAD_NAME", ("D2NormsRPNHead",), ("StandardRPNHead",),
         "detectron2's StandardRPNHead", "MODEL.RPN.HEAD_NAME: D2NormsRPNHead",
         family="GeneralizedRCNN"),
    Part("MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_BOX_HEAD.NAME", ("D2NormsConvFCHead",),
         ("FastRCNNConvFCHead",), "detectron2's FastRCNNConvFCHead",
         "MODEL.ROI_BOX_HEAD.NAME: D2NormsConvFCHead", family="GeneralizedRCNN",
         num_conv_key="MODEL.ROI_BOX_HEAD.NUM_CONV"),
    Part("MODEL.ROI_MASK_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NAME", ("D2NormsMaskHead",),
         ("MaskRCNNConvUpsampleHead",), "detectron2's MaskRCNNConvUpsampleHead",
         "MODEL.ROI_MASK_HEAD.NAME: D2NormsMaskHead", family="GeneralizedRCNN",
         needs="MODEL.MASK_ON", num_conv_key="MODEL.ROI_MASK_HEAD.NUM_CONV"),
)


def _all_names() -> List[str]:
    from .layers import detectron2_norm_names, registered_norms

    return sorted(set(registered_norms()) | set(detectron2_norm_names()))


def _close(name: str, names: Sequence[str]) -> str:
    lowered = {n.lower(): n for n in names}
    if name.lower() in lowered:
        return f" Did you mean {lowered[name.lower()]!r}? (names are case-sensitive)"
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _why_stock_cannot(spec, part: Part) -> str:
    """Why a stock component (plain conv, detectron2's norm, ReLU) cannot build ``spec``."""
    if spec.conv == "scaled_ws":
        extra = (" and the NF-ResNet's residual scaling (x + alpha * f(x / beta))"
                 if part.key == "MODEL.RESNETS.NORM" else "")
        return (f"{spec.name!r} means no activation normalization: Scaled WS convs carrying "
                f"gain and bias{extra} (NF paper); {part.stock_text} builds plain convs")
    if spec.conv == "ws":
        return (f"{spec.name!r} needs weight-standardized convs before the norm; "
                f"{part.stock_text} builds plain convs")
    if not spec.pairs_with_relu:
        act = "TLU" if spec.name.startswith("FRN") else "its own activation"
        return f"{spec.name!r} pairs with {act}; {part.stock_text} {part.after_norm}"
    return (f"{spec.name!r} is a d2_norms name; {part.stock_text} builds only detectron2's own "
            "names")


def check_norm_name(norm, part: Part, component: str) -> Optional[str]:
    """The problem with ``norm`` for ``part`` built by ``component`` (None when it builds)."""
    from .layers import (UnknownNormError, detectron2_norm_names, get_norm_spec)

    if not isinstance(norm, str):
        return None  # a callable (LazyConfig): the component calls it
    if norm == "":
        return None
    d2_names = detectron2_norm_names()
    try:
        spec = get_norm_spec(norm)
    except UnknownNormError:
        spec = None
    if component in part.stock:
        if norm in d2_names:
            return None
        if spec is not None:
            return (f"{part.key}={norm!r}: {_why_stock_cannot(spec, part)}, so it would be a "
                    f"different network. Use {part.use}, which builds {norm!r} as defined; or "
                    f"set {part.key} to one of detectron2's names "
                    f"({', '.join(sorted(d2_names))}).")
        return (f"{part.key}={norm!r}: unknown normalizer name.{_close(norm, _all_names())} "
                f"{part.stock_text} builds detectron2's names ({', '.join(sorted(d2_names))}); "
                f"{part.use} builds d2_norms' names too (d2_norms.layers.describe_norms()).")
    if spec is None and norm not in d2_names:
        return (f"{part.key}={norm!r}: unknown normalizer name.{_close(norm, _all_names())} "
                "Known names: " + ", ".join(_all_names()) + "; parametric GN_G<groups>, "
                "GN_C<channels per group>, GNWS_G<groups>, GNWS_C<channels per group> (optional "
                "_FALLBACK suffix), BN_IMG<images per group>; register your own with d2_norms.layers.register_norm.")
    return None


def _images_per_group(norm):
    from .layers import images_per_group_of

    return images_per_group_of(norm)


def images_per_device(cfg, world_size: int) -> int:
    """Training images per process: SOLVER.IMS_PER_BATCH / REFERENCE_WORLD_SIZE when
    auto-scaling is on (it keeps that number on any process count), else / world_size."""
    ref = int(get_dotted(cfg, "SOLVER.REFERENCE_WORLD_SIZE", 0) or 0)
    return int(cfg.SOLVER.IMS_PER_BATCH) // (ref if ref > 0 else max(1, int(world_size)))


def image_group_problems(cfg, world_size: int) -> List[str]:
    """``BN_IMG<k>`` keys whose k does not divide the per-device training batch (its layers
    would raise at the first iteration): one message per key."""
    per_device = images_per_device(cfg, world_size)
    problems = []
    for key, norm in active_norms(cfg).items():
        k = _images_per_group(norm)
        if k is None or (per_device >= k and per_device % k == 0):
            continue
        divisors = [d for d in range(1, per_device + 1) if per_device % d == 0]
        problems.append(
            f"{key}={norm!r} normalizes over groups of {k} images, but each of the {world_size} "
            f"process(es) trains on {per_device} images per iteration (SOLVER.IMS_PER_BATCH="
            f"{cfg.SOLVER.IMS_PER_BATCH}, SOLVER.REFERENCE_WORLD_SIZE="
            f"{get_dotted(cfg, 'SOLVER.REFERENCE_WORLD_SIZE', 0)}), not a multiple of {k}. Set "
            f"SOLVER.IMS_PER_BATCH to a multiple of {k} x the number of processes, or {key} to "
            f"BN_IMG<d> with d in {divisors} (BN: statistics over the whole per-device batch).")
    return problems


def nf_input_problem(pixel_std, where: str, fix_key: str) -> Optional[str]:
    """NF with inputs far from unit variance: the problem, or None."""
    try:
        stds = [float(s) for s in pixel_std]
    except (TypeError, ValueError):
        return None
    if stds and max(stds) < 10.0:
        return (f"{where}: NF (Normalizer-Free ResNet) with pixel_std {stds}: on 0-255 pixels "
                "the inputs have a standard deviation of ~58, while the NF-ResNet's signal "
                "propagation (Scaled WS, analytic beta; NF paper sec. 3-4) assumes "
                "unit-variance inputs; the first losses are ~100x too large and training "
                f"diverges. Set {fix_key} to {list(UNIT_VARIANCE_PIXEL_STD)} (BGR; reversed for "
                "RGB), as d2_norms' NF configs do.")
    return None


def _family(cfg) -> str:
    from .config import meta_architecture_family

    return meta_architecture_family(str(get_dotted(cfg, "MODEL.META_ARCHITECTURE", "")))


def norm_problems(cfg) -> List[str]:
    """Every normalizer problem of a (yacs) config, one message each naming the key to change."""
    problems: List[str] = []
    family = _family(cfg)
    uses_nf = False
    for part in PARTS:
        norm = get_dotted(cfg, part.key, None)
        if norm is None:
            continue
        if part.family and part.family != family:
            continue  # a key of another detector (detectron2's defaults hold them all)
        if part.needs and not get_dotted(cfg, part.needs, False):
            continue
        component = str(get_dotted(cfg, part.selector, ""))
        if component not in part.d2_norms and component not in part.stock:
            continue  # a third-party component: it decides what it builds
        if part.key == "MODEL.RPN.NORM" and component in part.stock:
            if norm:
                problems.append(
                    f"MODEL.RPN.NORM={norm!r} is read only by d2_norms' RPN head; "
                    f"{part.stock_text} has no norm and would ignore it. Set {part.use}, or "
                    "MODEL.RPN.NORM to \"\".")
            continue
        if part.key == "MODEL.FPN.NORM" and norm == "" and component not in part.d2_norms:
            continue
        problem = check_norm_name(norm, part, component)
        if problem is not None:
            problems.append(problem)
            continue
        if part.num_conv_key and _images_per_group(norm) is not None:
            problems.append(
                f"{part.key}={norm!r}: BN_IMG<k> normalizes over groups of k images, but the "
                "RoI heads' batch holds RoIs (a varying number per image), not images. Use BN "
                "(statistics over all RoIs of the per-device batch), GN or another norm there; "
                "BN_IMG<k> applies to MODEL.RESNETS.NORM, MODEL.FPN.NORM, MODEL.RPN.NORM and "
                "MODEL.RETINANET.NORM.")
            continue
        if norm and part.num_conv_key and int(get_dotted(cfg, part.num_conv_key, 1)) == 0:
            problems.append(
                f"{part.key}={norm!r} but {part.num_conv_key} is 0, so no layer would be "
                f"normalized (a silently different head). Set {part.num_conv_key} (4 in the "
                f"papers' 4conv1fc box head and Mask R-CNN's mask head) or {part.key} to \"\".")
        if norm == NF_NORM:
            uses_nf = True
    if uses_nf:
        problem = nf_input_problem(get_dotted(cfg, "MODEL.PIXEL_STD", None),
                                   "MODEL.PIXEL_STD", "MODEL.PIXEL_STD")
        if problem is not None:
            problems.append(problem)
    return problems


def active_norms(cfg) -> dict:
    """``{norm key: value}`` for the parts the configured model has (a Mask R-CNN config's
    ``MODEL.RETINANET.NORM`` is not one). Checkpoints record it (:data:`NORM_RECORD`)."""
    family = _family(cfg)
    out = {}
    for part in PARTS:
        norm = get_dotted(cfg, part.key, None)
        if norm is None or not isinstance(norm, str):
            continue
        if part.family and part.family != family:
            continue
        if part.needs and not get_dotted(cfg, part.needs, False):
            continue
        if part.key == "MODEL.FPN.NORM" and str(get_dotted(cfg, part.selector, "")) in (
                "build_d2n_resnet_backbone", "build_resnet_backbone"):
            continue  # no FPN
        out[part.key] = norm
    return out


#: The checkpoint entry that says which normalizer built each part of the saved weights:
#: ``{"norms": {"MODEL.RESNETS.NORM": "GN", ...}}`` (d2_norms' checkpoints and converted files).
NORM_RECORD = "d2_norms"


def norm_record(cfg) -> dict:
    return {"norms": active_norms(cfg)}


def weights_norm_problem(cfg, checkpoint, path: str, override: str = "") -> Optional[str]:
    """Weights whose recorded normalizers differ from the config's for a part both have, or
    None (also for weights that record nothing: detectron2's, timm's, older files)."""
    record = checkpoint.get(NORM_RECORD) if isinstance(checkpoint, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("norms"), dict):
        return None
    mine = active_norms(cfg)
    diffs = [(k, v, mine[k]) for k, v in record["norms"].items() if k in mine and mine[k] != v]
    if not diffs:
        return None
    shown = "; ".join(f"{k}: {theirs!r} in the weights, {ours!r} in the config"
                      for k, theirs, ours in diffs)
    return (f"the weights in {path} were trained (or converted) with other normalizers than the "
            f"config builds ({shown}). Parameters of the same shapes would load silently into "
            "layers that compute something else (e.g. GN gamma/beta into GN+WS, a GN backbone "
            "into the NF-ResNet). Use the config the weights were made with, or weights made "
            "for this normalizer" + (f"; {override}" if override else "") + ".")


#: set on a config by ``load_config`` once ``MODEL.D2NORMS.NORM`` has been applied
NORM_FIELD_APPLIED = "_d2n_norm_field_applied"


def mark_norm_field_applied(cfg) -> None:
    cfg.__dict__[NORM_FIELD_APPLIED] = True  # not a config key: kept by clone(), not dumped


def check_norm_field_applied(cfg) -> None:
    """A config whose ``MODEL.D2NORMS.NORM`` was merged without being applied (e.g.
    ``cfg.merge_from_file`` instead of ``load_config``) would build other norms than it names:
    refused, unless its per-part keys already say what the field says (a run's config.yaml)."""
    d2n = cfg.MODEL.get("D2NORMS") or {}
    norm = d2n.get("NORM", "") if hasattr(d2n, "get") else ""
    if not norm or cfg.__dict__.get(NORM_FIELD_APPLIED):
        return
    from . import recipes
    from .config import NORM_KEYS, meta_architecture_family

    detector = {"RetinaNet": "retinanet", "GeneralizedRCNN": "mask_rcnn"}.get(
        meta_architecture_family(cfg.MODEL.META_ARCHITECTURE))
    if detector is None:
        return
    try:
        fields = recipes.normalizer_fields(detector, norm)
    except Exception:
        fields = {}
    differ = [k for k, v in fields.items() if k in NORM_KEYS and get_dotted(cfg, k, v) != v]
    if differ or not fields:
        from .engine.errors import ConfigKeyError

        raise ConfigKeyError(
            f"MODEL.D2NORMS.NORM={norm!r} was merged into this config but not applied "
            f"({', '.join(f'{k}={get_dotted(cfg, k, None)!r}' for k in differ) or 'unknown name'}"
            "): the model would be built with other norms than it names. Load configs with "
            "d2_norms.engine.preflight.load_config(path, opts) (tools/train_net.py does), which "
            "applies the field.")
