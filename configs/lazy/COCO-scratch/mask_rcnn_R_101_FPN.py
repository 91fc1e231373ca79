# Mask R-CNN R101-FPN from scratch, GN paper Table 7 setting: the R50 config with a 101-layer
# backbone. Any cell of the matrix is one command, e.g. GN+WS at 1 image per GPU:
#   tools/lazyconfig_train_net.py --config-file configs/lazy/COCO-scratch/mask_rcnn_R_101_FPN.py \
#       recipe.norm=GNWS recipe.ims_per_gpu=1 train.output_dir=output/x
from .mask_rcnn_R_50_FPN import dataloader, lr_multiplier, model, optimizer, recipe, train

model.backbone.bottom_up.depth = 101
train.output_dir = "output/lazy/COCO-scratch/mask_rcnn_R_101_FPN"
