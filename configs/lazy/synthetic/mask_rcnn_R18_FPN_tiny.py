# Mask R-CNN R18-FPN from scratch on the tiny synthetic set (24 images of 64 px, 3 classes):
# a CPU-sized run of the recipe graph with either trainer, e.g.
#   tools/lazyconfig_train_net.py --config-file configs/lazy/synthetic/mask_rcnn_R18_FPN_tiny.py \
#       recipe.norm=NF train.output_dir=output/x
# The schedule is short and explicit here (not the COCO recipe's); the norms follow recipe.norm.
from detectron2.layers import ShapeSpec

from ..common.data.synthetic import dataloader
from ..common.models.mask_rcnn_fpn import model
from ..common.optim import SGD as optimizer
from ..common.schedule import lr_multiplier
from ..common.train import train

recipe = dict(detector="mask_rcnn", norm="GN", ims_per_gpu=2, num_gpus=1)

model.backbone.bottom_up.depth = 18
model.backbone.out_channels = 128
model.proposal_generator.head.in_channels = 128
model.proposal_generator.anchor_generator.sizes = [[8], [16], [32], [64], [128]]
model.proposal_generator.pre_nms_topk = (1000, 500)
model.proposal_generator.post_nms_topk = (500, 100)
roi = model.roi_heads
roi.num_classes = 3
roi.batch_size_per_image = 128
roi.box_head.input_shape = ShapeSpec(channels=128, height=7, width=7)
roi.box_head.conv_dims = [128, 128, 128, 128]
roi.box_head.fc_dims = [256]
roi.box_predictor.input_shape = ShapeSpec(channels=256)
roi.box_predictor.test_topk_per_image = 20
roi.mask_head.input_shape = ShapeSpec(channels=128, width=14, height=14)
roi.mask_head.conv_dims = [128, 128, 128, 128, 128]

optimizer.lr = 0.01
lr_multiplier.warmup_iters = 2
lr_multiplier.steps = []
train.max_iter = 10
train.checkpointer.period = 5
train.eval_period = 0  # evaluate once, at the end
train.device = "cpu"
train.seed = 1
train.output_dir = "output/lazy/synthetic/mask_rcnn_R18_FPN_tiny"
