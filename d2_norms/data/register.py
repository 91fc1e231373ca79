"""Registration of the synthetic shapes splits with detectron2's catalogs.

Registering is cheap: nothing is generated until the data is first needed. The dataset function
(``DatasetCatalog.get``) and the metadata fields ``json_file`` / ``image_root`` (read by
``COCOEvaluator`` and by ``check_datasets``) all call ``ensure_synthetic``, which generates the
split into the cache on first use and reuses it afterwards. ``as_dict()`` of the metadata shows
the same paths without generating anything.
"""
import os
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data.datasets.coco import load_coco_json

from .synthetic import (ShapesSpec, SyntheticPaths, dataset_dir, default_dataset_root,
                        ensure_synthetic)

DEFAULT_PREFIX = "synthetic_shapes"
# Sized for `make demo` (Mask R-CNN R18-FPN from scratch, about 10 CPU minutes): 1000 training
# images give ~2100 objects, 100 validation images ~210 objects for a stable AP estimate.
DEFAULT_NUM_TRAIN = 1000
DEFAULT_NUM_VAL = 100
DEFAULT_IMAGE_SIZE = 128
DEFAULT_NUM_CLASSES = 3
DEFAULT_SEED = 0
# A small variant for end-to-end tests that train in a subprocess (registered on import too).
TINY_PREFIX = "synthetic_shapes_tiny"
TINY_SIZES = dict(num_train=24, num_val=8, image_size=64)
# `make demo`'s set: the default one with 2 classes (circle, triangle). With 3 classes the demo
# schedule (400 iterations x 4 images) reached box AP50 44; with 2 it reaches 75-77.
DEMO_PREFIX = "synthetic_shapes_demo"
DEMO_OPTIONS = dict(num_classes=2)
# The batch study's set (issue 23, docs/study_batch.md): per-image statistics that vary, so that
# statistics over 1, 2, 4 or 8 images differ: a random background family (waves, checks,
# stripes, blobs) and colours, per-image brightness (+-50 levels) and contrast (x0.5-2). 160 px
# (RetinaNet's P7 is 2x2), 3 classes; 500 validation images (~1100 objects) for a low-noise AP.
VARIED_PREFIX = "synthetic_varied"
VARIED_SIZES = dict(num_train=2000, num_val=500, image_size=160)
VARIED_OPTIONS = dict(textures=True, brightness=50.0, contrast=2.0)


class _Registration(NamedTuple):
    spec: ShapesSpec
    root: Path


_REGISTERED: Dict[str, _Registration] = {}


class SyntheticMetadata(Metadata):
    """Metadata whose ``json_file`` / ``image_root`` generate the split on first access, so that
    COCOEvaluator (which opens ``json_file``) works before any training data was loaded."""

    def _paths(self) -> SyntheticPaths:
        reg = _REGISTERED[self.name]
        return ensure_synthetic(self.name, reg.spec, reg.root)

    @property
    def json_file(self) -> str:
        return str(self._paths().json_file)

    @property
    def image_root(self) -> str:
        return str(self._paths().image_root)


def _resolve_root(root: Optional[os.PathLike]) -> Path:
    return (Path(root).expanduser() if root is not None else default_dataset_root()).absolute()


def _already_registered(name: str, reg: _Registration) -> bool:
    """True if ``name`` is registered with exactly ``reg``; raises if taken otherwise."""
    if name in _REGISTERED:
        if _REGISTERED[name] == reg:
            return True
        raise ValueError(
            f"dataset '{name}' is already registered as a synthetic set with other parameters "
            f"({_REGISTERED[name].spec} under {_REGISTERED[name].root}); use another name_prefix "
            "or call d2_norms.data.unregister_synthetic first")
    if name in DatasetCatalog.list():
        raise ValueError(f"dataset '{name}' is already registered in detectron2's DatasetCatalog "
                         "(not by d2_norms); choose another name")
    return False


def register_synthetic_split(name: str, spec: ShapesSpec, root: Optional[os.PathLike] = None
                             ) -> str:
    """Register one split ``name`` generated from ``spec`` under ``root`` (default: the cache,
    resolved now from ``$D2_NORMS_CACHE``). Re-registering the same name with the same spec and
    root is a no-op; with anything else it is an error."""
    reg = _Registration(spec, _resolve_root(root))
    if _already_registered(name, reg):
        return name
    _REGISTERED[name] = reg

    def load():
        paths = ensure_synthetic(name, reg.spec, reg.root)
        return load_coco_json(str(paths.json_file), str(paths.image_root), name)

    DatasetCatalog.register(name, load)
    meta = SyntheticMetadata(name=name)
    directory = dataset_dir(name, spec, reg.root)
    # Plain copies for as_dict(); attribute access goes through the generating properties.
    meta.__dict__["json_file"] = str(directory / "annotations.json")
    meta.__dict__["image_root"] = str(directory / "images")
    meta.set(
        thing_classes=spec.class_names,
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(spec.num_classes)},
        evaluator_type="coco",
        synthetic_spec=spec.to_dict(),
    )
    MetadataCatalog[name] = meta
    return name


def register_synthetic(name_prefix: str = DEFAULT_PREFIX, num_train: int = DEFAULT_NUM_TRAIN,
                       num_val: int = DEFAULT_NUM_VAL, image_size: int = DEFAULT_IMAGE_SIZE,
                       seed: int = DEFAULT_SEED, root: Optional[os.PathLike] = None, *,
                       num_classes: int = DEFAULT_NUM_CLASSES, **spec_options
                       ) -> Tuple[str, str]:
    """Register ``<name_prefix>_train`` and ``<name_prefix>_val`` and return their names.

    The splits share every parameter but draw different images (the split name enters the
    seed). ``spec_options`` are further ``ShapesSpec`` fields (max_objects, empty_fraction,
    min_object_size, max_object_size, max_aspect, min_visible_fraction, object_noise,
    background_noise, textures, brightness, contrast). Parameters are checked now; images are generated on first use.
    """
    common = dict(image_size=image_size, num_classes=num_classes, seed=seed, **spec_options)
    try:
        train_spec = ShapesSpec(num_images=num_train, split="train", **common)
        val_spec = ShapesSpec(num_images=num_val, split="val", **common)
    except TypeError as e:  # an unknown keyword
        known = sorted(f.name for f in ShapesSpec.__dataclass_fields__.values()
                       if f.name not in ("num_images", "split"))
        raise TypeError(f"register_synthetic: {e}; known options: {', '.join(known)}") from e
    names = (f"{name_prefix}_train", f"{name_prefix}_val")
    for name, spec in zip(names, (train_spec, val_spec)):  # check both before registering either
        _already_registered(name, _Registration(spec, _resolve_root(root)))
    register_synthetic_split(names[0], train_spec, root)
    register_synthetic_split(names[1], val_spec, root)
    return names


def unregister_synthetic(name_prefix: str) -> None:
    """Remove ``<name_prefix>_train`` / ``_val`` from the catalogs (the cached files stay)."""
    for name in (f"{name_prefix}_train", f"{name_prefix}_val"):
        if _REGISTERED.pop(name, None) is not None:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def synthetic_paths(name: str) -> SyntheticPaths:
    """Generate (if needed) the registered synthetic split ``name`` and return its paths."""
    if name not in _REGISTERED:
        raise KeyError(f"'{name}' is not a registered synthetic dataset; registered: "
                       f"{', '.join(sorted(_REGISTERED)) or 'none'}")
    reg = _REGISTERED[name]
    return ensure_synthetic(name, reg.spec, reg.root)


def is_synthetic(name: str) -> bool:
    return name in _REGISTERED
