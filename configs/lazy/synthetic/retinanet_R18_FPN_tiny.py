# RetinaNet R18-FPN from scratch on the tiny synthetic set (24 images of 64 px, 3 classes):
# a CPU-sized run of the recipe graph with either trainer, e.g.
#   tools/lazyconfig_train_net.py --config-file configs/lazy/synthetic/retinanet_R18_FPN_tiny.py \
#       recipe.norm=GN train.output_dir=output/x
# The schedule is short and explicit here (not the COCO recipe's); the norms follow recipe.norm.
from detectron2.layers import ShapeSpec

from ..common.data.synthetic import dataloader
from ..common.models.retinanet import model
from ..common.optim import SGD as optimizer
from ..common.schedule import lr_multiplier
from ..common.train import train

recipe = dict(detector="retinanet", norm="FRN", ims_per_gpu=2, num_gpus=1)

model.backbone.bottom_up.depth = 18
model.backbone.out_channels = 64
model.backbone.top_block.in_channels = 512
model.backbone.top_block.out_channels = 64
model.head.input_shape = [ShapeSpec(channels=64)] * 5
model.head.conv_dims = [64, 64, 64, 64]
model.num_classes = 3
model.anchor_generator.sizes = [[8], [16], [32], [64], [128]]
model.anchor_generator.aspect_ratios = [0.5, 1.0, 2.0]
model.head.num_anchors = 3
model.max_detections_per_image = 20
dataloader.train.mapper.use_instance_mask = False
dataloader.evaluator.tasks = ["bbox"]

optimizer.lr = 0.005
lr_multiplier.warmup_iters = 2
lr_multiplier.steps = []
lr_multiplier.lr_scheduler_name = "WarmupMultiStepLR"
lr_multiplier.warmup_method = "linear"
train.max_iter = 10
train.checkpointer.period = 5
train.eval_period = 0  # evaluate once, at the end
train.device = "cpu"
train.seed = 1
train.output_dir = "output/lazy/synthetic/retinanet_R18_FPN_tiny"
