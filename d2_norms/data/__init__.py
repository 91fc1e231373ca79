"""Datasets for d2_norms: the synthetic COCO-format shapes set and dataset input validation.

Importing this package registers, without generating anything yet:

* ``synthetic_shapes_train`` / ``synthetic_shapes_val``: 1000 / 100 images of 128 px, 3 classes
  (circle, triangle, square), generated into ``$D2_NORMS_CACHE/datasets`` (default
  ``~/.cache/d2_norms/datasets``) on first use;
* ``synthetic_shapes_tiny_train`` / ``synthetic_shapes_tiny_val``: 24 / 8 images of 64 px, for
  quick end-to-end tests;
* ``synthetic_shapes_demo_train`` / ``synthetic_shapes_demo_val``: as the default set but 2
  classes (circle, triangle), for ``make demo``;
* ``synthetic_varied_train`` / ``synthetic_varied_val``: 2000 / 500 images of 160 px, 3 classes,
  whose per-image statistics vary (random background family and colours, brightness, contrast),
  for the batch study (``tools/reproduce.py batch-study``).

Other variants: ``register_synthetic(name_prefix, num_train, num_val, image_size, seed, root,
num_classes=..., **ShapesSpec options)``.

The trainer calls ``check_datasets(cfg)`` before building data loaders and uses
``SafeDatasetMapper(cfg, is_train)`` as the loaders' mapper (see ``checks``).
"""
# `import d2_norms.data` runs d2_norms/__init__ first, which applies the detectron2 shims.
from .checks import (CheckedMapper, DatasetError, DatasetSummary, MissingImageError,
                     SafeDatasetMapper, UnreadableImageError, check_coco_json, check_datasets,
                     expected_num_classes, load_json_checked, read_image_checked)
from .register import (DEFAULT_IMAGE_SIZE, DEFAULT_NUM_CLASSES, DEFAULT_NUM_TRAIN,
                       DEFAULT_NUM_VAL, DEFAULT_PREFIX, DEFAULT_SEED, DEMO_OPTIONS, DEMO_PREFIX,
                       TINY_PREFIX, TINY_SIZES, VARIED_OPTIONS, VARIED_PREFIX, VARIED_SIZES,
                       SyntheticMetadata, is_synthetic, register_synthetic,
                       register_synthetic_split, synthetic_paths, unregister_synthetic)
from .shapes import SHAPE_CLASSES
from .synthetic import (GENERATOR_VERSION, ShapesSpec, SyntheticPaths,
                        default_cache_dir, default_dataset_root, draw_image, ensure_synthetic,
                        validate_coco_dataset, write_coco_dataset)

register_synthetic()
register_synthetic(TINY_PREFIX, **TINY_SIZES)
register_synthetic(DEMO_PREFIX, **DEMO_OPTIONS)
register_synthetic(VARIED_PREFIX, **VARIED_SIZES, **VARIED_OPTIONS)

__all__ = [
    "CheckedMapper", "DatasetError", "DatasetSummary", "MissingImageError", "SafeDatasetMapper",
    "UnreadableImageError", "check_coco_json", "check_datasets", "expected_num_classes",
    "load_json_checked", "read_image_checked",
    "DEFAULT_IMAGE_SIZE", "DEFAULT_NUM_CLASSES", "DEFAULT_NUM_TRAIN", "DEFAULT_NUM_VAL",
    "DEFAULT_PREFIX", "DEFAULT_SEED", "DEMO_OPTIONS", "DEMO_PREFIX", "TINY_PREFIX", "TINY_SIZES",
    "VARIED_OPTIONS", "VARIED_PREFIX", "VARIED_SIZES",
    "SyntheticMetadata",
    "is_synthetic", "register_synthetic", "register_synthetic_split", "synthetic_paths",
    "unregister_synthetic", "SHAPE_CLASSES", "GENERATOR_VERSION", "ShapesSpec", "SyntheticPaths",
    "default_cache_dir", "default_dataset_root", "draw_image", "ensure_synthetic",
    "validate_coco_dataset", "write_coco_dataset",
]
