# RetinaNet R101-FPN from scratch, FRN paper sec. 4.3 / Table 6 (the table's depth): the R50
# config with a 101-layer backbone. Any cell of the matrix is one command, e.g. BN at 4 images
# per GPU with base lr 0.1:
#   tools/lazyconfig_train_net.py --config-file configs/lazy/COCO-scratch/retinanet_R_101_FPN.py \
#       recipe.norm=BN recipe.ims_per_gpu=4 recipe.frn_base_lr=0.1 train.output_dir=output/x
from .retinanet_R_50_FPN import dataloader, lr_multiplier, model, optimizer, recipe, train

model.backbone.bottom_up.depth = 101
train.output_dir = "output/lazy/COCO-scratch/retinanet_R_101_FPN"
