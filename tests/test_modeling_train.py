"""End-to-end: d2_norms backbones train 30 iterations on the synthetic shapes set and the loss
decreases (R18-FPN, 64 px images, detectron2's SimpleTrainer, CPU). Every normalizer trains;
each detector with three of them (all ten pairs with D2_NORMS_FULL_TRAIN_MATRIX=1)."""
import os

import numpy as np
import pytest
import torch

import d2_norms  # noqa: F401
import d2_norms.layers as L
from d2_norms.config import add_d2_norms_config
from d2_norms.modeling import NFBasicBlock, NormBasicBlock, NormFPN
from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.engine import SimpleTrainer, hooks
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer
from detectron2.utils.events import EventStorage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS = 30
TRAIN_SET = "synthetic_shapes_tiny_train"  # 24 images of 64 px (d2_norms.data)

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _setup():
    import d2_norms.data  # noqa: F401  (registers the synthetic sets)
    from detectron2.data import DatasetCatalog

    assert TRAIN_SET in DatasetCatalog.list()
    old_impl, old_threads = L.get_frn_impl(), torch.get_num_threads()
    L.set_frn_impl("eager")
    torch.set_num_threads(2)
    yield
    L.set_frn_impl(old_impl)
    torch.set_num_threads(old_threads)


def train_cfg(detector, norm):
    cfg = get_cfg()
    add_d2_norms_config(cfg)
    base = "Base-RetinaNet.yaml" if detector == "retinanet" else "Base-RCNN-FPN.yaml"
    cfg.merge_from_file(os.path.join(REPO, "configs", base))
    # NF models: Scaled-WS convs (no activation normalization) in the FPN and heads too. With
    # detectron2's plain "" RetinaNet head (convs initialised with std 0.01) the NF RetinaNet's
    # loss falls only ~12 % in 30 steps (lr 0.01 or 0.02), with "NF" ~45 %.
    head = norm
    backbone = ("build_d2n_retinanet_resnet_fpn_backbone" if detector == "retinanet"
                else "build_d2n_resnet_fpn_backbone")
    opts = [
        "MODEL.BACKBONE.NAME", backbone,
        "MODEL.DEVICE", "cpu",
        "MODEL.WEIGHTS", "",
        "MODEL.PIXEL_STD", [57.375, 57.120, 58.395],
        "MODEL.BACKBONE.FREEZE_AT", 0,
        "MODEL.RESNETS.DEPTH", 18,
        "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "MODEL.RESNETS.NORM", norm,
        "MODEL.FPN.NORM", head,
        "MODEL.FPN.OUT_CHANNELS", 64,
        "DATASETS.TRAIN", (TRAIN_SET,),
        "DATASETS.TEST", (),
        "INPUT.MIN_SIZE_TRAIN", (64,),
        "INPUT.MAX_SIZE_TRAIN", 64,
        "INPUT.MASK_FORMAT", "polygon",
        "DATALOADER.NUM_WORKERS", 0,
        # Per-parameter gradient-norm clipping (detectron2 v0.6 "norm"): from-scratch detectors
        # with unnormalized heads (the NF models) spike at these learning rates without it.
        "SOLVER.CLIP_GRADIENTS.ENABLED", True,
        "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 1.0,
        "SOLVER.MAX_ITER", ITERS,
        "SOLVER.STEPS", (),
        "SOLVER.WARMUP_ITERS", 5,
        "SOLVER.CHECKPOINT_PERIOD", 100000,
        "SEED", 0,
    ]
    if detector == "retinanet":
        opts += [
            "MODEL.META_ARCHITECTURE", "D2NormsRetinaNet",  # its head built for the norm
            "MODEL.ANCHOR_GENERATOR.SIZES",
            [[s, s * 2 ** (1 / 3), s * 2 ** (2 / 3)] for s in (8, 16, 32, 64, 128)],
            "MODEL.RETINANET.NUM_CLASSES", 3,
            "MODEL.RETINANET.NUM_CONVS", 2,
            "MODEL.RETINANET.NORM", head,
            "SOLVER.IMS_PER_BATCH", 4,  # RetinaNet's per-positive losses are noisy at 2
            "SOLVER.BASE_LR", 0.01,
        ]
    else:
        opts += [
            "MODEL.MASK_ON", True,
            # d2_norms' heads, built for the norm (stock heads refuse FRN / GNWS / NF)
            "MODEL.RPN.HEAD_NAME", "D2NormsRPNHead",
            "MODEL.ROI_BOX_HEAD.NAME", "D2NormsConvFCHead",
            "MODEL.ROI_MASK_HEAD.NAME", "D2NormsMaskHead",
            "MODEL.ANCHOR_GENERATOR.SIZES", [[8], [16], [32], [64], [128]],
            "MODEL.RPN.POST_NMS_TOPK_TRAIN", 100,
            "MODEL.ROI_HEADS.NUM_CLASSES", 3,
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64,
            "MODEL.ROI_BOX_HEAD.NUM_CONV", 2,
            "MODEL.ROI_BOX_HEAD.NUM_FC", 1,
            "MODEL.ROI_BOX_HEAD.CONV_DIM", 64,
            "MODEL.ROI_BOX_HEAD.FC_DIM", 128,
            "MODEL.ROI_BOX_HEAD.NORM", head,
            "MODEL.ROI_MASK_HEAD.NUM_CONV", 2,
            "MODEL.ROI_MASK_HEAD.CONV_DIM", 64,
            "MODEL.ROI_MASK_HEAD.NORM", head,
            "SOLVER.IMS_PER_BATCH", 2,
            "SOLVER.BASE_LR", 0.01,
        ]
    cfg.merge_from_list(opts)
    return cfg


def _mean_positive_anchors(model, cfg, num_batches=5):
    """Mean number of anchors RetinaNet assigns to an object per batch (label_anchors)."""
    loader = iter(build_detection_train_loader(cfg))
    counts = []
    was_training = model.training
    model.eval()  # only the feature shapes matter here; keep BN statistics untouched
    with torch.no_grad():
        for _ in range(num_batches):
            batch = next(loader)
            images = model.preprocess_image(batch)
            features = model.backbone(images.tensor)
            anchors = model.anchor_generator([features[f] for f in model.head_in_features])
            gt_labels, _ = model.label_anchors(anchors, [x["instances"] for x in batch])
            labels = torch.stack(gt_labels)
            counts.append(int(((labels >= 0) & (labels != model.num_classes)).sum()))
    model.train(was_training)
    return max(1.0, float(np.mean(counts)))


def _loss_on(model, batches, normalizer):
    """Mean total loss on fixed batches, leaving the model as it was (buffers, RNG, EMA)."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    saved_normalizer = getattr(model, "loss_normalizer", None)
    rng = torch.get_rng_state()
    torch.manual_seed(1234)  # same proposal / ROI sampling before and after training
    total = 0.0
    with torch.no_grad(), EventStorage(0):
        for batch in batches:
            if normalizer is not None:
                model.loss_normalizer = normalizer
            total += float(sum(model(batch).values()))
    torch.set_rng_state(rng)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    if saved_normalizer is not None:
        model.loss_normalizer = saved_normalizer
    return total / len(batches)


# Every normalizer trains; each detector with three of them (the papers' pairings: FRN with
# RetinaNet, GN with Mask R-CNN; NF with both). D2_NORMS_FULL_TRAIN_MATRIX=1 runs all ten.
CASES = [("retinanet", "BN"), ("retinanet", "FRN"), ("retinanet", "NF"),
         ("mask_rcnn", "GN"), ("mask_rcnn", "GNWS"), ("mask_rcnn", "NF")]
if os.environ.get("D2_NORMS_FULL_TRAIN_MATRIX"):
    CASES = [(d, n) for d in ("retinanet", "mask_rcnn")
             for n in ("BN", "GN", "GNWS", "FRN", "NF")]


@pytest.mark.parametrize("detector, norm", CASES)
def test_trains_with_decreasing_loss(detector, norm):
    cfg = train_cfg(detector, norm)
    torch.manual_seed(0)
    np.random.seed(0)
    model = build_model(cfg)
    blocks = NFBasicBlock if norm == "NF" else NormBasicBlock
    assert isinstance(model.backbone, NormFPN)
    assert isinstance(model.backbone.bottom_up.res2[0], blocks)
    normalizer = None
    if detector == "retinanet":
        # detectron2 divides RetinaNet's losses by an EMA of #positive anchors that starts at 100
        # (a COCO-sized value); on 64 px images (~20 positives per batch) the EMA's decay alone
        # would inflate the losses over 30 steps. Start it (and measure) at this set's value.
        normalizer = model.loss_normalizer = _mean_positive_anchors(model, cfg)
    # Two fixed batches (8 images) to measure the loss on before and after training: unlike the
    # per-step training losses, this is free of batch-to-batch noise (#objects per image).
    held = iter(build_detection_train_loader(cfg))
    fixed = [next(held), next(held)]
    before = _loss_on(model, fixed, normalizer)

    optimizer = build_optimizer(cfg, model)
    trainer = SimpleTrainer(model, build_detection_train_loader(cfg), optimizer)
    trainer.register_hooks([hooks.LRScheduler(optimizer, build_lr_scheduler(cfg, optimizer))])
    trainer.train(0, ITERS)
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == ITERS and all(np.isfinite(losses)), losses
    after = _loss_on(model, fixed, normalizer)
    print(f"{detector} {norm}: fixed-batch loss {before:.3f} -> {after:.3f}; training loss "
          f"(mean of first/last 8 steps) {np.mean(losses[:8]):.3f} -> {np.mean(losses[-8:]):.3f}")
    # From scratch, 30 SGD steps on 24 images: the classification / objectness terms fall fast.
    # Measured (fixed batches, before -> after): see docs/backbones.md; required: -15 %.
    assert after < 0.85 * before, (before, after, losses)
