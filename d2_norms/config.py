"""Every config key d2_norms adds to detectron2's defaults, in one place.

``add_d2_norms_config(cfg)`` adds them (idempotent: keys already present, e.g. from a merged
YAML, keep their values). Existing detectron2 keys keep their meaning (``MODEL.RESNETS.*``,
``MODEL.FPN.*``, ``MODEL.RETINANET.NORM``, ``MODEL.ROI_*_HEAD.NORM``, ...).

=====================================  ==========  =============================================
key                                    default     meaning
=====================================  ==========  =============================================
MODEL.D2NORMS.NORM                     ""          the one field: normalizer of every part (below)
MODEL.D2NORMS.ZERO_INIT_RESIDUAL       False       gamma 0 in each residual branch's last norm
MODEL.D2NORMS.NF.ALPHA                 0.2         NF-ResNet residual scale (NF sec. 4, 5.1)
MODEL.D2NORMS.NF.SKIP_GAIN_INIT        0.0         SkipInit scalar's initial value (sec. 4.4)
MODEL.D2NORMS.NF.ACTIVATION            "relu"      NF-ResNet nonlinearity (its gain: sec. 4.3)
MODEL.D2NORMS.NF.SCALED_WS             True        Scaled WS convs (False: sec. 4.1 baseline)
MODEL.D2NORMS.NF.WS_EPS                1e-6        eps of each Scaled WS conv's fan-in variance
MODEL.D2NORMS.NF.SHORTCUT_AVG_POOL     False       timm's avg-pool transition shortcut
MODEL.RPN.NORM                         ""          norm of the RPN head's conv (D2NormsRPNHead)
MODEL.RETINANET.NORM_PER_LEVEL         False       one norm per pyramid level in RetinaNet's head
D2NORMS.EVAL.BACKEND                   "auto"      faster_coco_eval | pycocotools | auto
D2NORMS.EVAL.NUM_THREADS               0           faster-coco-eval mask IoU threads (0: default)
D2NORMS.EVAL.MAX_DETS_PER_IMAGE        100         detections per image COCO AP counts
D2NORMS.EVAL.DUMP_PREDICTIONS          True        write coco_instances_results.json etc.
=====================================  ==========  =============================================

``MODEL.D2NORMS.NORM`` is the one field that sets a config's normalizer everywhere: when it is
set, ``d2_norms.engine.preflight.load_config`` fills every key of
``d2_norms.recipes.normalizer_fields`` (the norm of backbone, FPN, heads and RPN, and the recipe's
per-normalizer extras: per-level head norms, AGC for NF, PreciseBN) that the YAML files and the
command line leave unset; a key set there overrides it.

:data:`NORM_KEYS` lists every key that names a normalizer (what error messages, run summaries
and ``recipe.norm`` refer to); ``MODEL.RESNETS.NORM: "NF"`` (:data:`NF_NORM`) selects the
NF-ResNet in d2_norms' backbones. ``get_dotted`` reads ``"A.B.C"`` from a config or a parsed
YAML mapping; ``meta_architecture_family`` says which detector a META_ARCHITECTURE is.
"""
from typing import Any, Mapping

from detectron2.config import CfgNode as CN

__all__ = ["add_d2_norms_config", "NORM_KEYS", "NF_NORM", "get_dotted",
           "meta_architecture_family"]

# The norm name that selects the NF-ResNet in MODEL.RESNETS.NORM (and Scaled-WS convs without
# activation normalization in MODEL.FPN.NORM and the heads' NORM keys).
NF_NORM = "NF"

# Every key naming a normalizer, backbone first.
NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.RPN.NORM", "MODEL.RETINANET.NORM",
             "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM")


def _setdefault(node: CN, key: str, value) -> None:
    # Only add missing keys: calling add_d2_norms_config again (e.g. after a YAML was merged)
    # must not reset values the user already set.
    if key not in node:
        setattr(node, key, value)


def add_d2_norms_config(cfg: CN) -> CN:
    """Add d2_norms' keys (table above) to a detectron2 config, in place; idempotent."""
    if cfg.is_frozen():
        raise RuntimeError("add_d2_norms_config: the config is frozen; call it before freeze()")
    _setdefault(cfg.MODEL, "D2NORMS", CN())
    d2n = cfg.MODEL.D2NORMS
    # GN paper sec. 4.1 / Goyal et al. 2017: gamma of each residual block's last norm starts at
    # 0, so every block is the identity at initialisation. Off by default, as in detectron2 (its
    # note: it hurt GN models trained from scratch). With MODEL.RESNETS.NORM "" (no norm, no
    # gamma) it zero-initialises the branch's last conv instead.
    _setdefault(d2n, "ZERO_INIT_RESIDUAL", False)
    # The one field for the normalizer (resolved by load_config; "" = the per-part keys only).
    _setdefault(d2n, "NORM", "")

    _setdefault(d2n, "NF", CN())
    nf = d2n.NF
    # NF paper sec. 4: x_{l+1} = x_l + alpha * f_l(x_l / beta_l); alpha = 0.2 (sec. 5.1).
    _setdefault(nf, "ALPHA", 0.2)
    # Initial value of the learnable scalar at the end of each residual branch (SkipInit, sec.
    # 4.4). 0.0 = SkipInit as trained in the paper; 1.0 = the plain NF-ResNet of the SPPs (Fig. 2).
    _setdefault(nf, "SKIP_GAIN_INIT", 0.0)
    # Nonlinearity of the NF-ResNet; its Scaled-WS gain is 1/sqrt(Var(g(x))), x ~ N(0,1) (4.3).
    _setdefault(nf, "ACTIVATION", "relu")
    # True: Scaled WS in every conv (eq. 3). False: plain He-initialised convs, the mean-shift
    # baseline of sec. 4.1 (for Signal Propagation Plots / ablations, not for training).
    _setdefault(nf, "SCALED_WS", True)
    # Epsilon added to each Scaled-WS conv's fan-in variance. 1e-6 as timm's ScaledStdConv2d
    # default; timm's NF-ResNets (NfCfg.std_conv_eps) use 1e-5, which converted weights need.
    _setdefault(nf, "WS_EPS", 1e-6)
    # False: a striding transition block's shortcut is a strided 1x1 conv (the paper's
    # pre-activation transition). True: 2x2 average pool, then a stride-1 1x1 conv (timm's
    # NF-ResNets, DownsampleAvg), needed by weights converted from timm.
    _setdefault(nf, "SHORTCUT_AVG_POOL", False)

    # Norm of the RPN head's 3x3 conv(s), read by D2NormsRPNHead; "" = detectron2's plain conv.
    _setdefault(cfg.MODEL.RPN, "NORM", "")
    # RetinaNet head (D2NormsRetinaNetHead): False = detectron2's layout, one norm per subnet
    # layer shared by all pyramid levels (BN / SyncBN: per-level statistics, shared affine,
    # CycleBatchNormList); checkpoint names unchanged. True = one whole norm per level and layer
    # (own statistics and gamma/beta; convs still shared), as Google's TPU RetinaNet
    # (class-{i}-bn-{level}), for every normalizer; no effect for "NF" (no norm module) and "".
    # Names: head.cls_subnet.{k}.{level}.weight etc. (d2_norms.modeling.heads.PerLevelNorm).
    _setdefault(cfg.MODEL.RETINANET, "NORM_PER_LEVEL", False)

    _setdefault(cfg, "D2NORMS", CN())
    _setdefault(cfg.D2NORMS, "EVAL", CN())
    ev = cfg.D2NORMS.EVAL
    # "auto": faster-coco-eval when installed, else pycocotools (the reference implementation).
    _setdefault(ev, "BACKEND", "auto")
    _setdefault(ev, "NUM_THREADS", 0)  # faster-coco-eval's mask IoU threads; 0 = its default
    _setdefault(ev, "MAX_DETS_PER_IMAGE", 100)  # detections per image counted by COCO AP
    # Write coco_instances_results.json and instances_predictions.pth into the evaluator's
    # output folder (OUTPUT_DIR/inference), as detectron2's COCOEvaluator does.
    _setdefault(ev, "DUMP_PREDICTIONS", True)
    return cfg


def meta_architecture_family(name: str) -> str:
    """"RetinaNet" or "GeneralizedRCNN" for a META_ARCHITECTURE name that is (a subclass of)
    one of them, e.g. d2_norms' "D2NormsRetinaNet"; otherwise the name itself (also for names
    that are not registered, e.g. in the config of a run made with another plugin)."""
    from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, RetinaNet

    try:
        cls = META_ARCH_REGISTRY.get(name)
    except KeyError:
        return name
    for family in (RetinaNet, GeneralizedRCNN):
        if isinstance(cls, type) and issubclass(cls, family):
            return family.__name__
    return name


def get_dotted(node: Mapping, dotted: str, default: Any = None) -> Any:
    """``node["A"]["B"]["C"]`` for ``dotted = "A.B.C"``, or ``default`` where a level is missing
    or not a mapping."""
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node
