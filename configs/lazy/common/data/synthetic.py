# The tiny synthetic set (24 / 8 images of 64 px, 3 classes; d2_norms/data): the COCO loader
# nodes of coco.py with the set's names and sizes, CPU-sized for tests and quick checks with
# either trainer. Generated on first use.
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

from .coco import dataloader

dataloader.train.dataset.names = "synthetic_shapes_tiny_train"
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(64,), max_size=64, sample_style="choice"),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.num_workers = 0
dataloader.test.dataset.names = "synthetic_shapes_tiny_val"
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=64,
                                                                max_size=64)]
dataloader.test.num_workers = 0
