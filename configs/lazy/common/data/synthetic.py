# The tiny synthetic set (24 / 8 images of 64 px, 3 classes; d2_norms/data): CPU-sized loaders
# for tests and quick checks with either trainer. Generated on first use.
from omegaconf import OmegaConf

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import (build_detection_test_loader, build_detection_train_loader,
                             get_detection_dataset_dicts)

from d2_norms.data import SafeDatasetMapper
from d2_norms.evaluation.coco_evaluator import D2NormsCOCOEvaluator

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="synthetic_shapes_tiny_train"),
    mapper=L(SafeDatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=(64,), max_size=64, sample_style="choice"),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="BGR",
        use_instance_mask=True,
    ),
    total_batch_size="${d2n_recipe:total_batch}",
    num_workers=0,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="synthetic_shapes_tiny_val", filter_empty=False),
    mapper=L(SafeDatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=64, max_size=64)],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=0,
)

dataloader.evaluator = L(D2NormsCOCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    tasks=["bbox", "segm"],
    output_dir="${train.output_dir}/inference",
)
