# COCO loaders as detectron2's configs/common/data/coco.py, with d2_norms' mapper (a missing or
# unreadable image is an error naming the file) and evaluator (pycocotools / faster-coco-eval).
# The total batch follows the recipe (ims_per_gpu x num_gpus). Input sizes: the top-level
# config sets its detector's (RetinaNet 1024 px, Mask R-CNN 800 / 1333 single-scale).
from omegaconf import OmegaConf

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import (build_detection_test_loader, build_detection_train_loader,
                             get_detection_dataset_dicts)

from d2_norms.data import SafeDatasetMapper
from d2_norms.evaluation.coco_evaluator import D2NormsCOCOEvaluator

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),
    mapper=L(SafeDatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=(800,), max_size=1333,
                                    sample_style="choice"),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="BGR",
        use_instance_mask=True,
    ),
    total_batch_size="${d2n_recipe:total_batch}",
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(SafeDatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=4,
)

dataloader.evaluator = L(D2NormsCOCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    tasks=["bbox", "segm"],
    output_dir="${train.output_dir}/inference",
)
