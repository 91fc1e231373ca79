"""Inputs at the edges: images without annotations, a batch of one image, images so small that
the deepest feature maps are 1x1. RetinaNet and Mask R-CNN (R18-FPN, d2_norms backbones) train
on them with every batch-independent normalizer: finite losses and finite gradients."""
import math
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH_INDEPENDENT = ("GN", "GNWS", "FRN", "NF")


def model_for(detector, norm, size):
    from d2_norms.engine.preflight import load_config

    name = "retinanet" if detector == "retinanet" else "mask_rcnn"
    cfg = load_config(os.path.join(REPO, "configs", "COCO-scratch",
                                   f"{name}_R_50_FPN_{norm}_2img.yaml"), [])
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS",
        "64", "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.RETINANET.NUM_CLASSES", "3",
        "MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.ROI_BOX_HEAD.CONV_DIM", "64",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "128", "MODEL.ROI_MASK_HEAD.CONV_DIM", "64",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
        "INPUT.MIN_SIZE_TEST", str(size), "INPUT.MAX_SIZE_TEST", str(size)])
    torch.manual_seed(0)
    return build_model(cfg)


def image(size, boxes, seed=0):
    g = torch.Generator().manual_seed(seed)
    inst = Instances((size, size))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.arange(len(boxes), dtype=torch.int64) % 3
    masks = torch.zeros(len(boxes), size, size, dtype=torch.bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes):
        m[int(y0):int(y1), int(x0):int(x1)] = True
    inst.gt_masks = BitMasks(masks)
    return {"image": torch.randint(0, 256, (3, size, size), generator=g).float(),
            "instances": inst, "height": size, "width": size}


def train_step(model, batch):
    model.train()
    model.zero_grad()
    with EventStorage(0):  # detectron2's heads log statistics while training
        losses = model(batch)
    for name, value in losses.items():
        assert math.isfinite(value.item()), f"{name} = {value.item()}"
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    return losses


@pytest.mark.parametrize("detector", ["retinanet", "mask_rcnn"])
@pytest.mark.parametrize("norm", BATCH_INDEPENDENT + ("BN",))
def test_images_without_annotations(detector, norm):
    model = model_for(detector, norm, 64)
    losses = train_step(model, [image(64, [], seed=1), image(64, [], seed=2)])
    # nothing to find: no box regression to learn, but classification still trains
    assert losses["loss_box_reg"].item() == 0.0
    # and a batch mixing an empty image with an annotated one
    train_step(model, [image(64, [], seed=3), image(64, [[8, 8, 40, 30]], seed=4)])


@pytest.mark.parametrize("detector", ["retinanet", "mask_rcnn"])
@pytest.mark.parametrize("norm", BATCH_INDEPENDENT)
def test_batch_of_one_image(detector, norm):
    model = model_for(detector, norm, 64)
    train_step(model, [image(64, [[4, 6, 30, 40], [20, 20, 60, 50]])])
    model.eval()
    with torch.no_grad():
        out = model([{"image": image(64, [])["image"], "height": 64, "width": 64}])
    assert len(out) == 1 and "instances" in out[0]


@pytest.mark.parametrize("norm", BATCH_INDEPENDENT)
def test_32px_image_gives_1x1_maps_deep_in_retinanet_and_trains(norm):
    model = model_for("retinanet", norm, 32)
    batch = [image(32, [[2, 2, 28, 30]])]
    features = model.backbone(model.preprocess_image(batch).tensor)
    shapes = {k: tuple(v.shape[-2:]) for k, v in features.items()}
    assert shapes == {"p3": (4, 4), "p4": (2, 2), "p5": (1, 1), "p6": (1, 1), "p7": (1, 1)}
    train_step(model, batch)


@pytest.mark.parametrize("norm", BATCH_INDEPENDENT)
def test_32px_image_in_mask_rcnn(norm):
    model = model_for("mask_rcnn", norm, 32)
    batch = [image(32, [[2, 2, 28, 30]])]
    features = model.backbone(model.preprocess_image(batch).tensor)
    assert tuple(features["p5"].shape[-2:]) == (1, 1) and tuple(features["p6"].shape[-2:]) == (1, 1)
    train_step(model, batch)


def test_bn_cannot_normalize_a_single_value_per_channel():
    """Why the batch-independent normalizers matter here: BN on one image with a 1x1 map has
    one value per channel and refuses (torch's own error), where the others above train."""
    model = model_for("retinanet", "BN", 32)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        train_step(model, [image(32, [[2, 2, 28, 30]])])


@pytest.mark.slow
def test_training_keeps_images_without_annotations_when_asked(tmp_path):
    """DATALOADER.FILTER_EMPTY_ANNOTATIONS False: the loader keeps the synthetic set's empty
    images, and one epoch of training (which visits each image once) runs through them."""
    from d2_norms.engine.defaults import setup_cfg
    from d2_norms.engine.trainer import Trainer

    def cfg_with(filter_empty):
        args = type("A", (), {"config_file": os.path.join(
            REPO, "configs", "synthetic", "mask_rcnn_R18_FPN_GN.yaml"), "opts": [
            "DATASETS.TRAIN", "('synthetic_shapes_tiny_train',)", "DATASETS.TEST", "()",
            "DATALOADER.NUM_WORKERS", "0", "DATALOADER.FILTER_EMPTY_ANNOTATIONS",
            str(filter_empty), "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "12",
            "SOLVER.WARMUP_ITERS", "2", "SOLVER.BASE_LR", "0.01", "SOLVER.STEPS", "()",
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
            "SOLVER.CHECKPOINT_PERIOD", "100", "OUTPUT_DIR", str(tmp_path)]})
        return setup_cfg(args, log=False)

    kept = Trainer.build_train_loader(cfg_with(False))
    dropped = Trainer.build_train_loader(cfg_with(True))
    empty = [i for i in range(len(kept.dataset)) if not kept.dataset.dataset[i]["annotations"]]
    assert len(empty) >= 1 and len(dropped.dataset) == len(kept.dataset) - len(empty)
    # 12 iterations x 2 images = one epoch of 24: every image, the empty ones included
    it = iter(kept.batch_sampler)
    seen = {index for _ in range(12) for _, index in next(it)}
    assert set(empty) <= seen

    trainer = Trainer(cfg_with(False))
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.iter == 12
    assert trainer._trainer.last_finite_losses[0] == 11
