# RetinaNet R101-FPN from scratch, FRN paper sec. 4.3 / Table 6 (101 layers; Table 6 uses R101).
# Any cell of the matrix is one command, e.g. BN at 4 images per GPU with base lr 0.1:
#   tools/lazyconfig_train_net.py --config-file configs/lazy/COCO-scratch/retinanet_R_101_FPN.py \
#       recipe.norm=BN recipe.ims_per_gpu=4 recipe.frn_base_lr=0.1 train.output_dir=output/x
# recipe.norm: BN, SyncBN, GN, GNWS, FRN, NF (or any registered name); recipe.ims_per_gpu: 1-8;
# recipe.num_gpus: the papers' 8 (d2_norms' trainer sets it to your process count).
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

from ..common.data.coco import dataloader
from ..common.models.retinanet import model
from ..common.optim import SGD as optimizer
from ..common.schedule import lr_multiplier
from ..common.train import train

recipe = dict(detector="retinanet", norm="FRN", ims_per_gpu=2, num_gpus=8, frn_base_lr=0.05)

model.backbone.bottom_up.depth = 101
# the paper resizes to 1024 x 1024; here the longer side is 1024 (aspect ratio kept)
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(1024,), max_size=1024, sample_style="choice"),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.mapper.use_instance_mask = False
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=1024,
                                                                 max_size=1024)]
dataloader.evaluator.tasks = ["bbox"]
train.output_dir = "output/lazy/COCO-scratch/retinanet_R_101_FPN"
