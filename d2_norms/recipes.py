"""From-scratch training recipes as rules, scaled to any total batch.

Every number of a generated config (``tools/make_configs.py``) comes from these functions;
nothing is hand-computed.

- RetinaNet follows the FRN paper (sec. 4.3, Table 6): reference total batch 64 trains 125k
  iterations; total batch M trains 125000 * 64 / M iterations at lr = base_lr * M / 64
  (base_lr one of 0.01 / 0.05 / 0.1, the paper reports the best), momentum 0.9, weight decay
  4e-4, cosine decay, with a cosine warm-up ramp (sec. 4.1).
- Mask R-CNN follows the GN paper's from-scratch setting (sec. 4 "Training Mask R-CNN from
  scratch", Table 7; detectron2's scratch GN configs): total batch 16 trains 270k iterations at
  lr 0.02, lr x0.1 at 210k and 250k; the long variant ("9x") trains 810k with steps at 750k and
  790k. Other total batches follow the linear scaling rule (lr x M/16, iterations x 16/M).
- The per-GPU batch is the knob: configs carry ``IMS_PER_BATCH = images_per_gpu * 8`` and
  ``REFERENCE_WORLD_SIZE = 8`` (the papers' 8 GPUs). On another number of GPUs detectron2's
  auto-scaling keeps the per-GPU batch and rescales lr, iterations, warm-up, steps, checkpoint and
  eval periods linearly, which is exactly the rules above evaluated at the new total batch.
- Weight decay is 0 on every normalizer parameter (GN paper sec. 4.2; ``d2_norms.solver``).
- RetinaNet cells exist for each FRN base lr (0.01 / 0.05 / 0.1; sec. 4.3 reports the best):
  the 0.05 cell keeps the plain name, the others carry an ``_lr0.01`` / ``_lr0.1`` suffix.
- Mask R-CNN trains single-scale, shorter side 800 (max 1333), as the Detectron config behind
  GN Table 7; every Mask R-CNN cell does, so a row differs from the next only in its normalizer
  and batch (docs/recipes.md).
- BN / SyncBN Mask R-CNN cells re-estimate BN statistics before each evaluation (PreciseBN,
  as detectron2's SyncBN Mask R-CNN configs).
- NF cells add adaptive gradient clipping (lambda ``NF_AGC_CLIPPING``) to the table's schedule
  (docs/recipes.md: why this lr, warm-up and lambda).
- RetinaNet cells give their head one norm per pyramid level
  (``MODEL.RETINANET.NORM_PER_LEVEL: True``, ``RETINANET_NORM_PER_LEVEL``), as Google's TPU
  RetinaNet that FRN Table 6 was trained with; NF cells leave it unset (no norm module there).
Every decision, with its reason: docs/recipes.md.
"""
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

REFERENCE_WORLD_SIZE = 8
IMAGES_PER_GPU = (1, 2, 4, 8)
NORMALIZERS = ("BN", "SyncBN", "GN", "GNWS", "FRN", "NF")
DETECTORS = ("retinanet", "mask_rcnn")
DEPTHS = (50, 101)

# FRN paper sec. 4.3
FRN_REFERENCE_BATCH = 64
FRN_REFERENCE_ITERS = 125_000
FRN_BASE_LRS = (0.01, 0.05, 0.1)
FRN_DEFAULT_BASE_LR = 0.05
FRN_WEIGHT_DECAY = 4e-4
# Warm-up length is not given in the paper; ours: 1000 iterations at the reference batch,
# scaled like the training length (0.8% of training).
FRN_REFERENCE_WARMUP = 1000

# GN paper Table 7 / detectron2 scratch Mask R-CNN
GN_REFERENCE_BATCH = 16
GN_REFERENCE_LR = 0.02
GN_SCHEDULES = {  # name -> (iterations, lr steps) at the reference batch 16
    "3x": (270_000, (210_000, 250_000)),
    "9x": (810_000, (750_000, 790_000)),
}
GN_WEIGHT_DECAY = 1e-4
GN_REFERENCE_WARMUP = 1000

# GN Table 7's Detectron config: single-scale training, shorter side 800, longer side <= 1333.
GN_MIN_SIZE_TRAIN = (800,)
GN_MAX_SIZE_TRAIN = 1333
# detectron2 enables PreciseBN in its SyncBN Mask R-CNN configs (Misc/*syncbn*.yaml). RetinaNet
# BN cells too (issue 23): FRN Table 6's TPU RetinaNet keeps BN moving averages with decay 0.997
# (eps 1e-4), an average over ~1 / (1 - 0.997) = 333 iterations, where torch's momentum 0.1
# averages over ~10 iterations of a model still changing. Rather than a momentum knob, PreciseBN
# re-estimates the population statistics of the final weights before every evaluation (on
# TEST.PRECISE_BN.NUM_ITER batches), which an average over the last ~330 iterations
# approximates (docs/recipes.md). BN_IMG<k> is BN: the same rule (normalizer_fields).
PRECISE_BN_CELLS = {("mask_rcnn", "BN"), ("mask_rcnn", "SyncBN"),
                    ("retinanet", "BN"), ("retinanet", "SyncBN")}
# FRN paper sec. 3.3: with a fixed eps, FRN on a 1x1 map outputs ~0 (nu2 = x^2, x / sqrt(x^2 +
# eps)) and learned eps ("FRN_LEPS") is what makes it train; Table 6's sizes never meet that.
# frn_variant(): learned eps where an FRN layer can normalize a map of side <= this.
FRN_LEPS_MAX_MAP_SIDE = 2
# Strides: the backbone's res5 / FPN's P5 is 32; RetinaNet's head also normalizes P6 and P7 (3x3
# stride-2 convs: ceil(side / 2) each); Mask R-CNN's box head normalizes 7x7 RoI features (mask
# head 14x14) and its RPN head is unnormalized (NF aside, which has no FRN).
FEATURE_SIZE_DIVISIBILITY = 32
ROI_BOX_SIDE = 7
# NF recipe: AGC lambda (Brock et al. 2021 sec. 4.1) measured on the synthetic set at batch 4
# (docs/recipes.md): the only lambda of {0.01, 0.04, 0.1} stable at 16x the cell's per-image lr.
# Measured with vectors clipped element-wise; kept after issue 23 made a vector one unit (the
# weights' rule is unchanged; docs/recipes.md "The unit of a vector").
NF_AGC_CLIPPING = 0.04

# FRN Table 6 was trained with Google's TPU RetinaNet, whose class / box subnets share their
# convs across P3-P7 but give every level its own norm (``class-{i}-bn-{level}``: statistics and
# gamma / beta; FRN replaced that norm + ReLU). The RetinaNet cells build the head that way
# (d2_norms.modeling.heads.PerLevelNorm; docs/recipes.md). NF has no norm module: not set there.
RETINANET_NORM_PER_LEVEL = True

CHECKPOINTS_PER_RUN = 25
EVALS_PER_RUN = 5


@dataclass(frozen=True)
class Schedule:
    """SOLVER / TEST values of one recipe at one total batch."""

    ims_per_batch: int
    base_lr: float
    max_iter: int
    steps: Tuple[int, ...]
    warmup_iters: int
    lr_scheduler_name: str
    warmup_method: str
    weight_decay: float
    momentum: float
    checkpoint_period: int
    eval_period: int

    def solver_dict(self) -> Dict:
        d = asdict(self)
        return {
            "IMS_PER_BATCH": d["ims_per_batch"],
            "BASE_LR": d["base_lr"],
            "MAX_ITER": d["max_iter"],
            "STEPS": list(d["steps"]),
            "WARMUP_ITERS": d["warmup_iters"],
            "WARMUP_FACTOR": 0.001,
            "WARMUP_METHOD": d["warmup_method"],
            "LR_SCHEDULER_NAME": d["lr_scheduler_name"],
            "WEIGHT_DECAY": d["weight_decay"],
            "WEIGHT_DECAY_NORM": 0.0,
            "MOMENTUM": d["momentum"],
            "CHECKPOINT_PERIOD": d["checkpoint_period"],
            "REFERENCE_WORLD_SIZE": REFERENCE_WORLD_SIZE,
        }


def _check_batch(total_batch: int) -> None:
    if not isinstance(total_batch, int) or total_batch < 1:
        raise ValueError(f"total batch must be a positive integer, got {total_batch!r}")


def frn_retinanet_schedule(total_batch: int, base_lr: float = FRN_DEFAULT_BASE_LR) -> Schedule:
    """FRN paper sec. 4.3 at total batch ``total_batch`` (see module docstring)."""
    _check_batch(total_batch)
    if base_lr <= 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    scale = total_batch / FRN_REFERENCE_BATCH
    max_iter = round(FRN_REFERENCE_ITERS / scale)
    return Schedule(
        ims_per_batch=total_batch,
        base_lr=base_lr * scale,
        max_iter=max_iter,
        steps=(),
        warmup_iters=round(FRN_REFERENCE_WARMUP / scale),
        lr_scheduler_name="WarmupCosineLR",
        warmup_method="cosine",
        weight_decay=FRN_WEIGHT_DECAY,
        momentum=0.9,
        checkpoint_period=max_iter // CHECKPOINTS_PER_RUN,
        eval_period=max_iter // EVALS_PER_RUN,
    )


def gn_mask_rcnn_schedule(total_batch: int, length: str = "3x") -> Schedule:
    """GN paper from-scratch Mask R-CNN at total batch ``total_batch`` (see module docstring)."""
    _check_batch(total_batch)
    if length not in GN_SCHEDULES:
        raise ValueError(f"unknown schedule {length!r}; choose one of {sorted(GN_SCHEDULES)}")
    iters, steps = GN_SCHEDULES[length]
    scale = total_batch / GN_REFERENCE_BATCH
    max_iter = round(iters / scale)
    return Schedule(
        ims_per_batch=total_batch,
        base_lr=GN_REFERENCE_LR * scale,
        max_iter=max_iter,
        steps=tuple(round(s / scale) for s in steps),
        warmup_iters=round(GN_REFERENCE_WARMUP / scale),
        lr_scheduler_name="WarmupMultiStepLR",
        warmup_method="linear",
        weight_decay=GN_WEIGHT_DECAY,
        momentum=0.9,
        checkpoint_period=max_iter // CHECKPOINTS_PER_RUN,
        eval_period=max_iter // EVALS_PER_RUN,
    )


def schedule_for(detector: str, images_per_gpu: int, *, world_size: int = REFERENCE_WORLD_SIZE,
                 frn_base_lr: float = FRN_DEFAULT_BASE_LR, length: str = "3x") -> Schedule:
    total = images_per_gpu * world_size
    if detector == "retinanet":
        return frn_retinanet_schedule(total, frn_base_lr)
    if detector == "mask_rcnn":
        return gn_mask_rcnn_schedule(total, length)
    raise ValueError(f"unknown detector {detector!r}; choose one of {DETECTORS}")


# Which YAML norm fields each normalizer name sets. The normalizer applies everywhere it can:
# backbone, FPN and heads, as in the papers' tables. "NF" in the FPN/heads means Scaled WS convs
# with gain and bias, still no activation normalization (NF RetinaNet's loss fell 46% in 30
# steps with it vs 11-14% with plain convs, tests/test_modeling_train.py).
def norm_fields(detector: str, normalizer: str) -> Dict[str, str]:
    if normalizer not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {normalizer!r}; choose one of {NORMALIZERS}")
    rest = normalizer
    fields = {"MODEL.RESNETS.NORM": normalizer, "MODEL.FPN.NORM": rest}
    if detector == "retinanet":
        fields["MODEL.RETINANET.NORM"] = rest
    else:
        fields["MODEL.ROI_BOX_HEAD.NORM"] = rest
        fields["MODEL.ROI_MASK_HEAD.NORM"] = rest
        if normalizer == "NF":
            # NF sec. 4.5: Scaled WS in every conv, so also in the RPN head's 3x3 conv (gamma 1:
            # it reads FPN features). The other normalizers leave the RPN head unnormalized, as
            # the GN paper and detectron2's GN / from-scratch configs do.
            fields["MODEL.RPN.NORM"] = "NF"
    return fields


def normalizer_fields(detector: str, normalizer: str) -> Dict[str, object]:
    """Every yacs key one normalizer name decides for a detector (``MODEL.D2NORMS.NORM``, the
    lazy ``recipe.norm``): the norm of each part and the recipe's per-normalizer extras
    (RetinaNet per-level head norms, AGC for Scaled WS, PreciseBN for the BN cells), with the
    value that undoes them for other normalizers (e.g. no RPN norm, no clipping).

    A recipe name (:data:`NORMALIZERS`) gives the cells' values; any other registered name
    (``FRN_LEPS``, ``GN_G16``, a third-party norm, detectron2's) goes to every part, the RPN head
    only when it needs Scaled WS convs, AGC only then. Unknown names: UnknownNormError."""
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose one of {DETECTORS}")
    if normalizer in NORMALIZERS:
        fields: Dict[str, object] = dict(norm_fields(detector, normalizer))
        scaled_ws = normalizer == "NF"
        has_module = normalizer != "NF"
    else:
        from d2_norms.layers import UnknownNormError, detectron2_norm_names, get_norm_spec

        try:
            conv = get_norm_spec(normalizer).conv
        except UnknownNormError:
            if normalizer not in detectron2_norm_names():
                raise
            conv = "plain"
        scaled_ws, has_module = conv == "scaled_ws", conv != "scaled_ws"
        parts = ["MODEL.RESNETS.NORM", "MODEL.FPN.NORM"] + (
            ["MODEL.RETINANET.NORM"] if detector == "retinanet"
            else ["MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM"])
        fields = {k: normalizer for k in parts}
        if detector != "retinanet" and scaled_ws:
            fields["MODEL.RPN.NORM"] = normalizer
        from d2_norms.layers.ghost_batch_norm import images_per_group_of

        if detector != "retinanet" and images_per_group_of(normalizer) is not None:
            # the RoI heads' batch holds RoIs, not images: BN over all RoIs of the device batch
            fields["MODEL.ROI_BOX_HEAD.NORM"] = fields["MODEL.ROI_MASK_HEAD.NORM"] = "BN"
    if detector == "retinanet":
        fields["MODEL.RETINANET.NORM_PER_LEVEL"] = RETINANET_NORM_PER_LEVEL and has_module
    else:
        fields.setdefault("MODEL.RPN.NORM", "")
    fields["TEST.PRECISE_BN.ENABLED"] = uses_precise_bn(detector, normalizer)
    fields["SOLVER.CLIP_GRADIENTS.ENABLED"] = scaled_ws
    if scaled_ws:
        fields["SOLVER.CLIP_GRADIENTS.CLIP_TYPE"] = "agc"
        fields["SOLVER.CLIP_GRADIENTS.CLIP_VALUE"] = NF_AGC_CLIPPING
    return fields


def uses_precise_bn(detector: str, normalizer: str) -> bool:
    """PreciseBN before every evaluation: the BN / SyncBN cells (:data:`PRECISE_BN_CELLS`), and
    ``BN_IMG<k>`` wherever BN would."""
    from d2_norms.layers.ghost_batch_norm import images_per_group_of

    if images_per_group_of(normalizer) is not None:
        normalizer = "BN"
    return (detector, normalizer) in PRECISE_BN_CELLS


def smallest_map_side(detector: str, image_side: int) -> int:
    """Side of the smallest feature map a norm layer sees for a square input of ``image_side``
    px (padded to :data:`FEATURE_SIZE_DIVISIBILITY`): RetinaNet P7, Mask R-CNN min(res5 / P5,
    the 7x7 RoI features). For a non-square image take its shorter side."""
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose one of {DETECTORS}")
    if not isinstance(image_side, int) or image_side < 1:
        raise ValueError(f"image side must be a positive int (px), got {image_side!r}")
    q = FEATURE_SIZE_DIVISIBILITY
    side = -(-image_side // q)  # res5 / P5 of the padded image
    if detector == "retinanet":
        for _ in ("P6", "P7"):
            side = -(-side // 2)
        return side
    return min(side, ROI_BOX_SIDE)


def frn_variant(smallest_side: int) -> str:
    """The rule for FRN's eps (FRN sec. 3.3): ``"FRN_LEPS"`` (learned eps) when an FRN layer can
    normalize a map of side <= :data:`FRN_LEPS_MAX_MAP_SIDE`, else ``"FRN"`` (fixed eps 1e-6).
    ``smallest_side``: :func:`smallest_map_side` at the config's smallest input. COCO cells:
    RetinaNet at 1024 px has P7 8x8 (6x6 for a 4:3 image), Mask R-CNN at 800 px min(25, 7) = 7:
    FRN. The batch study's RetinaNet at 160 px has P7 2x2: FRN_LEPS."""
    if not isinstance(smallest_side, int) or smallest_side < 1:
        raise ValueError(f"map side must be a positive int, got {smallest_side!r}")
    return "FRN_LEPS" if smallest_side <= FRN_LEPS_MAX_MAP_SIDE else "FRN"


def config_name(detector: str, depth: int, normalizer: str, images_per_gpu: int,
                length: Optional[str] = None, frn_base_lr: Optional[float] = None) -> str:
    suffix = f"_{length}" if length and length != "3x" else ""
    if frn_base_lr is not None and frn_base_lr != FRN_DEFAULT_BASE_LR:
        if detector != "retinanet":
            raise ValueError("frn_base_lr applies to RetinaNet (FRN recipe) cells only")
        suffix += f"_lr{frn_base_lr:g}"
    return f"{detector}_R_{depth}_FPN_{normalizer}_{images_per_gpu}img{suffix}.yaml"


DETECTOR_TITLES = {"retinanet": "RetinaNet", "mask_rcnn": "Mask R-CNN"}
BASES = {"retinanet": "Base-RetinaNet-scratch.yaml", "mask_rcnn": "Base-MaskRCNN-scratch.yaml"}
RECIPE_NOTES = {
    "retinanet": "FRN paper sec. 4.3 schedule (batch 64 -> 125k it, lr base_lr*M/64, cosine)",
    "mask_rcnn": "GN paper from-scratch schedule (batch 16 -> {} it, lr 0.02*M/16, steps)",
}


def _yaml_value(value) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float):
        return repr(float(f"{value:.10g}"))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return str(value)


def _nested(flat: Dict[str, object]) -> Dict:
    root: Dict = {}
    for key, value in flat.items():
        node = root
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return root


def _dump(node: Dict, indent: int = 0):
    for key, value in node.items():
        if isinstance(value, dict):
            yield " " * indent + f"{key}:"
            yield from _dump(value, indent + 2)
        else:
            yield " " * indent + f"{key}: {_yaml_value(value)}"


def extra_fields(detector: str, normalizer: str) -> Dict[str, object]:
    """Per-cell settings beyond the schedule: the RetinaNet head's per-level norms, input sizes,
    PreciseBN, the NF recipe's AGC."""
    flat: Dict[str, object] = {}
    if detector == "retinanet" and normalizer != "NF":
        flat["MODEL.RETINANET.NORM_PER_LEVEL"] = RETINANET_NORM_PER_LEVEL
    if detector == "mask_rcnn":
        flat["INPUT.MIN_SIZE_TRAIN"] = GN_MIN_SIZE_TRAIN
        flat["INPUT.MAX_SIZE_TRAIN"] = GN_MAX_SIZE_TRAIN
    if normalizer == "NF":
        flat.update({"SOLVER.CLIP_GRADIENTS.ENABLED": True,
                     "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "agc",
                     "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": NF_AGC_CLIPPING})
    if (detector, normalizer) in PRECISE_BN_CELLS:
        flat["TEST.PRECISE_BN.ENABLED"] = True
    return flat


def render_config(detector: str, depth: int, normalizer: str, images_per_gpu: int,
                  length: str = "3x", frn_base_lr: Optional[float] = None) -> str:
    """The YAML text of one matrix cell (``frn_base_lr`` None: the FRN default 0.05)."""
    lr = FRN_DEFAULT_BASE_LR if frn_base_lr is None else frn_base_lr
    sched = schedule_for(detector, images_per_gpu, frn_base_lr=lr, length=length)
    name = config_name(detector, depth, normalizer, images_per_gpu, length,
                       frn_base_lr if detector == "retinanet" else None)
    # One field names the normalizer; load_config derives every per-part key and extra from it
    # (normalizer_fields), so editing this line changes the cell's normalizer everywhere.
    flat: Dict[str, object] = {"MODEL.D2NORMS.NORM": normalizer, "MODEL.RESNETS.DEPTH": depth}
    decided = set(normalizer_fields(detector, normalizer))
    extra = {k: v for k, v in extra_fields(detector, normalizer).items() if k not in decided}
    flat.update({k: v for k, v in extra.items() if k.startswith("MODEL.")})
    flat.update({f"SOLVER.{k}": v for k, v in sched.solver_dict().items()})
    flat.update({k: v for k, v in extra.items() if k.startswith("SOLVER.")})
    flat.update({k: v for k, v in extra.items() if k.startswith("INPUT.")})
    flat["TEST.EVAL_PERIOD"] = sched.eval_period
    flat.update({k: v for k, v in extra.items() if k.startswith("TEST.")})
    flat["OUTPUT_DIR"] = "output/COCO-scratch/" + name[: -len(".yaml")]
    note = RECIPE_NOTES[detector].format(GN_SCHEDULES[length][0] if detector == "mask_rcnn" else "")
    if detector == "retinanet":
        note += f"; base_lr {lr:g} of the paper's sweep {{0.01, 0.05, 0.1}}"
    header = [
        "# Generated by tools/make_configs.py from d2_norms/recipes.py: edit the rule, not this file.",
        f"# {DETECTOR_TITLES[detector]} R{depth}-FPN from scratch, {normalizer}, "
        f"{images_per_gpu} image(s) per GPU (total {sched.ims_per_batch} on "
        f"{REFERENCE_WORLD_SIZE} GPUs; other GPU counts keep {images_per_gpu}/GPU and rescale).",
        f"# {note}.",
        "# MODEL.D2NORMS.NORM sets the normalizer of backbone, FPN and heads (with the recipe's",
        "# per-normalizer extras); a per-part key (e.g. MODEL.FPN.NORM) set here overrides it.",
        f'_BASE_: "{BASES[detector]}"',
    ]
    return "\n".join(header + list(_dump(_nested(flat)))) + "\n"


def matrix_cells():
    """(detector, depth, normalizer, images_per_gpu, length, frn_base_lr) of every generated
    config; ``frn_base_lr`` is None for Mask R-CNN."""
    for detector in DETECTORS:
        for depth in DEPTHS:
            for normalizer in NORMALIZERS:
                for ims in IMAGES_PER_GPU:
                    if detector == "retinanet":
                        for lr in FRN_BASE_LRS:
                            yield detector, depth, normalizer, ims, "3x", lr
                    else:
                        yield detector, depth, normalizer, ims, "3x", None
    for normalizer in NORMALIZERS:
        for ims in IMAGES_PER_GPU:
            yield "mask_rcnn", 50, normalizer, ims, "9x", None


def write_matrix(out_dir: str, check: bool = False):
    """Write (or with ``check`` compare) every matrix config; return the names that differ.

    Files are written to a temporary name then renamed, so an interrupted run leaves no
    half-written config."""
    import os

    from d2_norms.fileio import atomic_write_text

    changed = []
    expected = set()
    for cell in matrix_cells():
        name = config_name(*cell)
        expected.add(name)
        text = render_config(*cell)
        path = os.path.join(out_dir, name)
        current = open(path).read() if os.path.exists(path) else None
        if current == text:
            continue
        changed.append(name)
        if not check:
            atomic_write_text(path, text)
    stale = sorted(f for f in os.listdir(out_dir) if f.endswith(".yaml")
                   and not f.startswith("Base-") and f not in expected)
    changed += [f"{f} (not produced by the generator)" for f in stale]
    return changed


# The papers' settings as cells of the matrix above.
PAPER_TABLES = {
    # FRN paper Table 6: RetinaNet R101-FPN from scratch, BN / GN / FRN at 8, 4, 2 images per
    # GPU on 8 GPUs, each at base lr 0.01, 0.05 and 0.1 (sec. 4.3 reports the best).
    "frn-table6": [("retinanet", 101, norm, ims, "3x", lr)
                   for norm in ("BN", "GN", "FRN") for ims in (8, 4, 2) for lr in FRN_BASE_LRS],
    # GN paper Table 7: Mask R-CNN R50/R101-FPN with GN from scratch, batch 16 (2 per GPU on 8).
    "gn-table7": [("mask_rcnn", depth, "GN", 2, "3x", None) for depth in (50, 101)],
}
