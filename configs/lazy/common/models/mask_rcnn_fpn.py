# Mask R-CNN R-FPN (P2-P6) from scratch with d2_norms' components (GN paper Table 7: 4conv1fc
# box head, 4-conv mask head). The same network as configs/COCO-scratch/mask_rcnn_*.yaml; the
# norm of each part follows the top-level recipe node (d2_norms/lazy/recipe.py).
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import RPN
from detectron2.modeling.roi_heads import FastRCNNOutputLayers, StandardROIHeads

from d2_norms.lazy.components import d2n_resnet
from d2_norms.lazy.recipe import UNIT_VARIANCE_BGR_STD
from d2_norms.modeling.fpn import NormFPN
from d2_norms.modeling.heads import D2NormsConvFCHead, D2NormsMaskHead, D2NormsRPNHead

model = L(GeneralizedRCNN)(
    backbone=L(NormFPN)(
        bottom_up=L(d2n_resnet)(
            depth=50,
            norm="${d2n_recipe:backbone_norm}",
            out_features=["res2", "res3", "res4", "res5"],
            freeze_at=0,  # from scratch: nothing frozen
            stride_in_1x1=False,
        ),
        in_features="${.bottom_up.out_features}",
        out_channels=256,
        norm="${d2n_recipe:fpn_norm}",
        top_block=L(LastLevelMaxPool)(),
    ),
    proposal_generator=L(RPN)(
        in_features=["p2", "p3", "p4", "p5", "p6"],
        # unnormalized except with Scaled WS (NF sec. 4.5), as the recipe says
        head=L(D2NormsRPNHead)(in_channels=256, num_anchors=3, norm="${d2n_recipe:rpn_norm}"),
        anchor_generator=L(DefaultAnchorGenerator)(
            sizes=[[32], [64], [128], [256], [512]],
            aspect_ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64],
            offset=0.0,
        ),
        anchor_matcher=L(Matcher)(thresholds=[0.3, 0.7], labels=[0, -1, 1],
                                  allow_low_quality_matches=True),
        box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_topk=(2000, 1000),
        post_nms_topk=(1000, 1000),
        nms_thresh=0.7,
    ),
    roi_heads=L(StandardROIHeads)(
        num_classes=80,
        batch_size_per_image=512,
        positive_fraction=0.25,
        proposal_matcher=L(Matcher)(thresholds=[0.5], labels=[0, 1],
                                    allow_low_quality_matches=False),
        box_in_features=["p2", "p3", "p4", "p5"],
        box_pooler=L(ROIPooler)(output_size=7, scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
                                sampling_ratio=0, pooler_type="ROIAlignV2"),
        box_head=L(D2NormsConvFCHead)(
            input_shape=ShapeSpec(channels=256, height=7, width=7),
            conv_dims=[256, 256, 256, 256],
            fc_dims=[1024],
            conv_norm="${d2n_recipe:box_head_norm}",
        ),
        box_predictor=L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=1024),
            test_score_thresh=0.05,
            box2box_transform=L(Box2BoxTransform)(weights=(10, 10, 5, 5)),
            num_classes="${..num_classes}",
        ),
        mask_in_features=["p2", "p3", "p4", "p5"],
        mask_pooler=L(ROIPooler)(output_size=14, scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
                                 sampling_ratio=0, pooler_type="ROIAlignV2"),
        mask_head=L(D2NormsMaskHead)(
            input_shape=ShapeSpec(channels=256, width=14, height=14),
            num_classes="${..num_classes}",
            conv_dims=[256, 256, 256, 256, 256],
            conv_norm="${d2n_recipe:mask_head_norm}",
        ),
    ),
    pixel_mean=[103.530, 116.280, 123.675],
    # from scratch: unit-variance inputs (NF's signal propagation assumes them)
    pixel_std=UNIT_VARIANCE_BGR_STD,
    input_format="BGR",
)
