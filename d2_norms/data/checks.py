"""Dataset input validation: fail before training or evaluation starts, with a message that
names the file and the fix, instead of deep inside a data-loader worker.

``check_datasets(cfg)`` (the trainer calls it in every process before it builds data loaders,
so also before any loader worker exists) checks each dataset of ``DATASETS.TRAIN`` and
``DATASETS.TEST``:

* the name is registered (close matches are suggested for typos);
* for COCO-json datasets (metadata with ``json_file``; detectron2's builtin COCO/LVIS names,
  ``register_coco_instances`` sets, d2_norms' synthetic sets, which are generated here): the
  dataset root (``$DETECTRON2_DATASETS`` for builtin names), the annotation file and the image
  directory exist; the JSON parses (a truncated or corrupt file is reported with its path and the
  line/column/character of the error); ``images`` / ``categories`` / ``annotations`` have the
  COCO shape and annotations use listed categories; every image file listed exists;
* the number of categories equals the model's ``MODEL.ROI_HEADS.NUM_CLASSES`` (R-CNN
  architectures) or ``MODEL.RETINANET.NUM_CLASSES`` (RetinaNet).

Cost. The annotation file is parsed once more than detectron2 itself does (about as long as
detectron2's own ``json.load``: seconds for COCO val2017, tens of seconds for train2017). Image
files are checked with one directory listing per image directory and a set lookup per file, so
all 118k COCO train images are checked in well under a second on a local disk instead of 118k
``stat`` calls. Whether an existing file decodes is only known when it is read:
``SafeDatasetMapper`` turns a missing or unreadable image met during loading into an error that
names the file. ``check_datasets(cfg, deep=False)`` checks only names, paths and class counts
from metadata (no parsing), for processes that need not repeat the full check.
"""
import difflib
import json
import logging
import os
from collections import defaultdict
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as d2_utils
from detectron2.data.dataset_mapper import DatasetMapper
from detectron2.utils.file_io import PathManager

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """Bad dataset input; the message says what is wrong and how to fix it."""


class MissingImageError(DatasetError, FileNotFoundError):
    """An image listed by a dataset does not exist."""


class UnreadableImageError(DatasetError, OSError):
    """An image file exists but cannot be decoded (corrupt, truncated, not an image)."""


class DatasetSummary(NamedTuple):
    name: str
    json_file: Optional[str]
    image_root: Optional[str]
    num_images: Optional[int]
    num_annotations: Optional[int]
    num_classes: Optional[int]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _builtin_root() -> Tuple[str, str]:
    """(root detectron2 registered its builtin datasets under, how that root was chosen)."""
    try:
        from detectron2.data.datasets import builtin

        root = getattr(builtin, "_root", None)
    except ImportError:  # pragma: no cover
        root = None
    env_now = os.environ.get("DETECTRON2_DATASETS")
    if root is None:
        root = env_now or "datasets"
    if env_now is None:
        how = ("$DETECTRON2_DATASETS is not set, so detectron2 uses 'datasets' relative to the "
               f"working directory {os.getcwd()}")
    elif os.path.normpath(env_now) != os.path.normpath(root):
        how = (f"detectron2 read $DETECTRON2_DATASETS={root!r} when it was imported; it is now "
               f"{env_now!r}: set it before starting Python")
    else:
        how = f"from $DETECTRON2_DATASETS={env_now!r}"
    return root, how


def _is_under(path: str, root: str) -> bool:
    path, root = os.path.abspath(path), os.path.abspath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def load_json_checked(path: str) -> Any:
    """``json.load`` with errors that name the file, the position and the likely cause."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"annotation file {path} is not UTF-8 text (bad byte at offset {e.start}): it is "
            "corrupt or not a JSON file. Re-download or regenerate it.") from e
    except OSError as e:
        raise DatasetError(f"cannot read annotation file {path}: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if not text.strip():
            cause = "the file is empty"
        elif e.pos >= len(text.rstrip()):
            cause = ("the JSON ends early, so the file is probably truncated (an interrupted "
                     "download, copy or write)")
        else:
            cause = "the file is corrupt"
        raise DatasetError(
            f"annotation file {path} is not valid JSON: {e.msg} at line {e.lineno}, column "
            f"{e.colno} (character {e.pos} of {len(text)}); {cause}. Re-download or regenerate "
            "it.") from None


def _missing_files(image_root: str, file_names: Iterable[str]) -> List[str]:
    """Listed files absent under ``image_root``: one listing per directory, not one stat each."""
    by_dir: Dict[str, List[str]] = defaultdict(list)
    for file_name in file_names:
        full = os.path.join(image_root, file_name)
        by_dir[os.path.dirname(full)].append(os.path.basename(full))
    missing = []
    for directory, names in by_dir.items():
        try:
            present = set(os.listdir(directory))
        except OSError:
            present = set()
        missing.extend(os.path.join(directory, n) for n in names if n not in present)
    return missing


def _first(items: List[str], n: int = 5) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


_SUMMARY_CACHE: Dict[Tuple[str, int, int], Tuple[int, int, List[str]]] = {}


def check_coco_json(json_file: str, image_root: str) -> Tuple[int, int, List[str]]:
    """Parse a COCO instances file and check its structure and that its images exist.

    Returns (number of images, number of annotations, category names by id); raises
    DatasetError naming the file and the problem."""
    st = os.stat(json_file)
    key = (os.path.abspath(json_file), st.st_size, st.st_mtime_ns)
    if key in _SUMMARY_CACHE:
        return _SUMMARY_CACHE[key]
    data = load_json_checked(json_file)
    where = f"annotation file {json_file}"
    if not isinstance(data, dict):
        raise DatasetError(f"{where} holds a JSON {type(data).__name__}, not a COCO object with "
                           "'images', 'annotations' and 'categories'")
    for key_name in ("images", "categories"):
        if not isinstance(data.get(key_name), list):
            raise DatasetError(f"{where} has no '{key_name}' list: it is not a COCO instances "
                               "file")
    categories = data["categories"]
    if not categories:
        raise DatasetError(f"{where} lists no categories")
    if not all(isinstance(c, dict) and "id" in c and "name" in c for c in categories):
        raise DatasetError(f"{where}: every category needs an 'id' and a 'name'")
    cat_ids = [c["id"] for c in categories]
    if len(set(cat_ids)) != len(cat_ids):
        raise DatasetError(f"{where}: category ids are not unique")
    images = data["images"]
    bad = [i for i, img in enumerate(images)
           if not (isinstance(img, dict) and "id" in img and "file_name" in img)]
    if bad:
        raise DatasetError(f"{where}: image entries without 'id' or 'file_name' at positions "
                           f"{_first(bad)}")
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise DatasetError(f"{where}: 'annotations' is not a list")
    known = set(cat_ids)
    unknown = sorted({a.get("category_id") for a in annotations
                      if a.get("category_id") not in known}, key=str)
    if unknown:
        raise DatasetError(f"{where}: annotations use category ids {_first(unknown)} that are "
                           f"not in its 'categories' (ids {_first(sorted(cat_ids))})")
    image_ids = {img["id"] for img in images}
    orphans = sum(1 for a in annotations if a.get("image_id") not in image_ids)
    if orphans:
        logger.warning("%s: %d annotations refer to images not listed in the file; detectron2 "
                       "ignores them.", where, orphans)
    missing = _missing_files(image_root, (img["file_name"] for img in images))
    if missing:
        raise DatasetError(
            f"{len(missing)} of the {len(images)} images listed in {json_file} are missing under "
            f"the image directory {image_root}: {_first(missing)}. Copy/extract the images "
            "completely, or point the dataset at the right image directory.")
    names = [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
    result = (len(images), len(annotations), names)
    del data
    _SUMMARY_CACHE[key] = result
    return result


def expected_num_classes(cfg) -> Optional[Tuple[str, int]]:
    """(config key, value) of the model's class count, or None for architectures without one."""
    from d2_norms.config import meta_architecture_family

    arch = meta_architecture_family(cfg.MODEL.META_ARCHITECTURE)
    if arch == "RetinaNet":
        return "MODEL.RETINANET.NUM_CLASSES", int(cfg.MODEL.RETINANET.NUM_CLASSES)
    if arch in ("GeneralizedRCNN", "PanopticFPN"):
        return "MODEL.ROI_HEADS.NUM_CLASSES", int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    return None


# --------------------------------------------------------------------------------------------
# check_datasets
# --------------------------------------------------------------------------------------------
def _path_problems(name: str, json_file: str, image_root: Optional[str]) -> List[str]:
    root, how = _builtin_root()
    builtin = _is_under(json_file, root)
    hint = (f" detectron2 looks for its builtin datasets under $DETECTRON2_DATASETS ({how}); "
            "set DETECTRON2_DATASETS to the folder that holds coco/ (coco/annotations/*.json, "
            "coco/train2017/, coco/val2017/) before starting." if builtin else
            f" (registered with json_file={json_file!r}, image_root={image_root!r}; "
            "$DETECTRON2_DATASETS only locates detectron2's builtin dataset names)")
    if builtin and not os.path.isdir(root):
        return [f"dataset '{name}': the dataset root {root!r} (absolute: "
                f"{os.path.abspath(root)}) does not exist.{hint}"]
    problems = []
    if not os.path.isfile(json_file):
        problems.append(f"dataset '{name}': annotation file {json_file} "
                        f"{'is not a file' if os.path.exists(json_file) else 'does not exist'}."
                        f"{hint}")
    if image_root is not None and not os.path.isdir(image_root):
        problems.append(f"dataset '{name}': image directory {image_root} does not exist.{hint}")
    return problems


def check_datasets(cfg, deep: bool = True) -> List[DatasetSummary]:
    """Check every dataset in ``cfg.DATASETS.TRAIN`` and ``cfg.DATASETS.TEST`` (see the module
    docstring); raise one DatasetError listing every problem found, else return summaries.

    Synthetic d2_norms sets are generated by this call if the cache lacks them, so that
    training ranks and loader workers find them complete."""
    names = list(dict.fromkeys(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)))
    expected = expected_num_classes(cfg)
    registered = DatasetCatalog.list()
    problems: List[str] = []
    summaries: List[DatasetSummary] = []
    for name in names:
        if name not in registered:
            close = difflib.get_close_matches(name, registered, n=3, cutoff=0.6)
            problems.append(
                f"dataset '{name}' (in DATASETS.TRAIN/TEST) is not registered"
                + (f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else
                   "; register it first (e.g. detectron2's register_coco_instances) or fix the "
                   "name"))
            continue
        meta = MetadataCatalog.get(name)
        json_file = meta.get("json_file")  # generates a synthetic set on first access
        image_root = meta.get("image_root")
        num_images = num_annotations = None
        classes = meta.get("thing_classes")
        if json_file is not None:
            json_file = PathManager.get_local_path(json_file)
            path_problems = _path_problems(name, json_file, image_root)
            if path_problems:
                problems.extend(path_problems)
                continue
            if deep and meta.get("evaluator_type", "coco") in ("coco", "lvis"):
                try:
                    num_images, num_annotations, classes = check_coco_json(
                        json_file, image_root if image_root is not None else "")
                except DatasetError as e:
                    problems.append(f"dataset '{name}': {e}")
                    continue
        num_classes = len(classes) if classes is not None else None
        if expected is not None and num_classes is not None and num_classes != expected[1]:
            key, value = expected
            problems.append(
                f"dataset '{name}' has {num_classes} categories ({_first(list(classes), 8)}) but "
                f"{key} is {value} for {cfg.MODEL.META_ARCHITECTURE}: set {key} {num_classes} "
                "(or train on a dataset with that many categories)")
        summaries.append(DatasetSummary(name, json_file, image_root, num_images, num_annotations,
                                        num_classes))
    if problems:
        raise DatasetError("dataset check failed:\n  - " + "\n  - ".join(problems)
                           if len(problems) > 1 else problems[0])
    return summaries


# --------------------------------------------------------------------------------------------
# Image reading errors during loading
# --------------------------------------------------------------------------------------------
def image_read_error(dataset_dict: Dict) -> Optional[DatasetError]:
    """The reason the image of ``dataset_dict`` cannot be loaded, as an error naming the file;
    None if it reads fine (then a failure came from elsewhere)."""
    file_name = dataset_dict.get("file_name")
    if file_name is None:
        return None
    where = f"image file {file_name} (image_id {dataset_dict.get('image_id')!r})"
    if not PathManager.exists(file_name):
        return MissingImageError(
            f"{where} does not exist. The dataset lists it, but it is not in the image directory: "
            "copy/extract the images completely next to the annotations (for detectron2's "
            "builtin sets both live under $DETECTRON2_DATASETS), or remove its entry from the "
            "annotation file.")
    try:
        d2_utils.read_image(file_name)
    except Exception as e:  # PIL raises several types for undecodable data
        return UnreadableImageError(
            f"{where} cannot be read as an image ({type(e).__name__}: {e}); the file is "
            "corrupt, truncated or not an image. Replace it (re-download / regenerate the set) "
            "or remove its entry from the annotation file.")
    return None


def read_image_checked(file_name: str, format: Optional[str] = None, image_id: Any = None):
    """detectron2's ``read_image`` with MissingImageError / UnreadableImageError naming the
    file instead of a bare FileNotFoundError / PIL error."""
    try:
        return d2_utils.read_image(file_name, format=format)
    except Exception:
        err = image_read_error({"file_name": file_name, "image_id": image_id})
        if err is not None:
            raise err from None
        raise


def _call_checked(mapper, dataset_dict: Dict):
    try:
        return mapper(dataset_dict)
    except DatasetError:
        raise
    except Exception as e:
        err = image_read_error(dataset_dict)
        if err is not None:
            raise err from e
        e.add_note(f"(while mapping the dataset entry of image {dataset_dict.get('file_name')})")
        raise


class SafeDatasetMapper(DatasetMapper):
    """detectron2's DatasetMapper whose failures on a missing or unreadable image raise
    MissingImageError / UnreadableImageError naming the file (also across loader worker
    processes: the message travels in the worker's traceback). Other errors get a note naming
    the image. Build it like DatasetMapper: ``SafeDatasetMapper(cfg, is_train=True)``, and pass
    it as ``mapper=`` to build_detection_train_loader / build_detection_test_loader."""

    def __call__(self, dataset_dict):
        return _call_checked(super().__call__, dataset_dict)


class CheckedMapper:
    """Wraps any mapper callable with SafeDatasetMapper's error reporting (picklable)."""

    def __init__(self, mapper):
        self.mapper = mapper

    def __call__(self, dataset_dict):
        return _call_checked(self.mapper, dataset_dict)
