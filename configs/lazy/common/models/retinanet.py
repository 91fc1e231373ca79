# RetinaNet R-FPN (P3-P7) from scratch with d2_norms' components (FRN paper sec. 4.3, Table 6).
# The same network as the yacs cells configs/COCO-scratch/retinanet_*.yaml; the norm of each
# part follows the top-level recipe node (d2_norms/lazy/recipe.py).
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher

from d2_norms.lazy.components import d2n_resnet
from d2_norms.lazy.recipe import UNIT_VARIANCE_BGR_STD
from d2_norms.modeling.fpn import NormFPN, NormLastLevelP6P7
from d2_norms.modeling.heads import D2NormsRetinaNet, D2NormsRetinaNetHead

model = L(D2NormsRetinaNet)(
    backbone=L(NormFPN)(
        bottom_up=L(d2n_resnet)(
            depth=50,
            norm="${d2n_recipe:backbone_norm}",
            out_features=["res3", "res4", "res5"],
            freeze_at=0,  # from scratch: nothing frozen
            stride_in_1x1=False,
        ),
        in_features=["res3", "res4", "res5"],
        out_channels=256,
        norm="${d2n_recipe:fpn_norm}",
        top_block=L(NormLastLevelP6P7)(in_channels=2048, out_channels=256, in_feature="res5",
                                       norm="${..norm}"),
    ),
    head=L(D2NormsRetinaNetHead)(
        input_shape=[ShapeSpec(channels=256)] * 5,
        num_classes="${..num_classes}",
        conv_dims=[256, 256, 256, 256],
        prior_prob=0.01,
        num_anchors=9,
        norm="${d2n_recipe:head_norm}",
        # one norm per pyramid level, as the TPU RetinaNet of FRN Table 6 (docs/recipes.md)
        norm_per_level="${d2n_recipe:head_norm_per_level}",
    ),
    anchor_generator=L(DefaultAnchorGenerator)(
        # three scales per octave (the yacs bases' rounded values)
        sizes=[[32.0, 40.32, 50.8], [64.0, 80.63, 101.59], [128.0, 161.27, 203.19],
               [256.0, 322.54, 406.37], [512.0, 645.08, 812.75]],
        aspect_ratios=[0.5, 1.0, 2.0],
        strides=[8, 16, 32, 64, 128],
        offset=0.0,
    ),
    box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
    anchor_matcher=L(Matcher)(thresholds=[0.4, 0.5], labels=[0, -1, 1],
                              allow_low_quality_matches=True),
    num_classes=80,
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    focal_loss_alpha=0.25,
    focal_loss_gamma=2.0,
    smooth_l1_beta=0.0,
    box_reg_loss_type="smooth_l1",
    test_score_thresh=0.05,
    test_topk_candidates=1000,
    test_nms_thresh=0.5,
    max_detections_per_image=100,
    pixel_mean=[103.530, 116.280, 123.675],
    # from scratch: unit-variance inputs (NF's signal propagation assumes them)
    pixel_std=UNIT_VARIANCE_BGR_STD,
    input_format="BGR",
)
