# Mask R-CNN R101-FPN from scratch, GN paper Table 7 setting (4conv1fc box head, single-scale
# 800 / 1333). Any cell of the matrix is one command, e.g. GN+WS at 1 image per GPU, 9x:
#   tools/lazyconfig_train_net.py --config-file configs/lazy/COCO-scratch/mask_rcnn_R_101_FPN.py \
#       recipe.norm=GNWS recipe.ims_per_gpu=1 recipe.length=9x train.output_dir=output/x
# recipe.norm: BN, SyncBN, GN, GNWS, FRN, NF (or any registered name); recipe.ims_per_gpu: 1-8;
# recipe.num_gpus: the papers' 8 (d2_norms' trainer sets it to your process count).
from ..common.data.coco import dataloader
from ..common.models.mask_rcnn_fpn import model
from ..common.optim import SGD as optimizer
from ..common.schedule import lr_multiplier
from ..common.train import train

recipe = dict(detector="mask_rcnn", norm="GN", ims_per_gpu=2, num_gpus=8, length="3x")

model.backbone.bottom_up.depth = 101
train.output_dir = "output/lazy/COCO-scratch/mask_rcnn_R_101_FPN"
