"""Detectron2 ``DatasetEvaluator`` for COCO-format sets, with a selectable AP backend.

Differences from detectron2's ``COCOEvaluator`` (v0.6):
- the AP computation runs in faster-coco-eval or pycocotools (``D2NORMS.EVAL.BACKEND``), never in
  detectron2's compiled ``COCOeval_opt`` (absent from the registry install);
- predictions are kept per image as arrays (boxes, scores, classes, mask RLEs) and turned into
  COCO result dicts once, on the main process, after gathering from all ranks;
- the ground truth is loaded lazily on the main process only.
The returned dict has detectron2's format ({"bbox": {"AP": .., "AP-<class>": ..}, "segm": ..},
0-100 scale, NaN where COCO cannot compute a number), so detectron2's hooks and
``print_csv_format`` work unchanged.
"""
import copy
import itertools
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
from detectron2.evaluation import DatasetEvaluator

from .backends import (
    AUTO,
    COCO_METRICS,
    IOU_TYPES,
    evaluate_coco_results,
    load_coco_gt,
    per_category_ap,
    resolve_backend,
)

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "coco_instances_results.json"
RAW_PREDICTIONS_FILE = "instances_predictions.pth"


@dataclass
class ImagePredictions:
    """One image's detections in compact form (what ``process`` keeps and ranks exchange)."""

    image_id: int
    boxes_xywh: np.ndarray  # float32 (N, 4), absolute XYWH as COCO wants
    scores: np.ndarray  # float32 (N,)
    classes: np.ndarray  # int64 (N,), contiguous model class indices
    mask_rles: Optional[List[dict]] = None  # compressed RLE, counts as str


def instances_to_image_predictions(instances, image_id: int, with_masks: bool) -> ImagePredictions:
    """Model ``Instances`` (on CPU) -> :class:`ImagePredictions`."""
    boxes = instances.pred_boxes.tensor.numpy().astype(np.float32, copy=True)
    boxes[:, 2:] -= boxes[:, :2]  # XYXY -> XYWH
    rles = None
    if with_masks and instances.has("pred_masks"):
        rles = encode_masks(instances.pred_masks.numpy())
    return ImagePredictions(
        image_id=int(image_id),
        boxes_xywh=boxes,
        scores=instances.scores.numpy().astype(np.float32, copy=False),
        classes=instances.pred_classes.numpy().astype(np.int64, copy=False),
        mask_rles=rles,
    )


def encode_masks(masks: np.ndarray) -> List[dict]:
    """(N, H, W) binary masks -> COCO compressed RLEs (counts decoded to str for JSON)."""
    from pycocotools import mask as mask_util

    if len(masks) == 0:
        return []
    # One call for all masks: pycocotools wants (H, W, N) uint8 in Fortran order.
    rles = mask_util.encode(np.asfortranarray(np.transpose(masks, (1, 2, 0)).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("utf-8")
    return rles


def to_coco_results(predictions: Sequence[ImagePredictions],
                    class_to_category: Optional[np.ndarray]) -> List[dict]:
    """COCO result-format dicts (dataset category ids) for all images."""
    results = []
    for pred in predictions:
        classes = pred.classes
        if class_to_category is not None and len(classes):
            if classes.max() >= len(class_to_category) or classes.min() < 0:
                raise ValueError(
                    f"image {pred.image_id}: predicted class {int(classes.max())} but the dataset "
                    f"has {len(class_to_category)} classes; MODEL.*.NUM_CLASSES does not match "
                    "the evaluated dataset"
                )
            classes = class_to_category[classes]
        cats = classes.tolist()
        boxes = pred.boxes_xywh.tolist()
        scores = pred.scores.tolist()
        image_id = pred.image_id
        if pred.mask_rles is None:
            results.extend({"image_id": image_id, "category_id": c, "bbox": b, "score": s}
                           for c, b, s in zip(cats, boxes, scores))
        else:
            results.extend({"image_id": image_id, "category_id": c, "bbox": b, "score": s,
                            "segmentation": m}
                           for c, b, s, m in zip(cats, boxes, scores, pred.mask_rles))
    return results


class D2NormsCOCOEvaluator(DatasetEvaluator):
    """COCO AP (bbox, segm) of a registered COCO-format dataset; see the module docstring.

    Args:
        dataset_name: a name in ``DatasetCatalog`` whose metadata has ``json_file`` (or that can
            be converted to COCO JSON into ``output_dir``).
        tasks: subset of ("bbox", "segm").
        backend: "auto", "faster_coco_eval" or "pycocotools".
        distributed: gather predictions from all ranks and evaluate on rank 0 (others return {}).
        output_dir: where to write coco_instances_results.json and instances_predictions.pth
            (when dump_predictions).
        max_dets_per_image: the COCO maxDets limit used for AP (default 100).
        num_threads: faster-coco-eval mask-IoU threads (None/0: library default).
    """

    def __init__(self, dataset_name: str, tasks: Sequence[str] = ("bbox",), *,
                 backend: str = AUTO, distributed: bool = True, output_dir: Optional[str] = None,
                 max_dets_per_image: int = 100, num_threads: Optional[int] = None,
                 dump_predictions: bool = True):
        from detectron2.data import MetadataCatalog

        tasks = tuple(tasks)
        bad = [t for t in tasks if t not in IOU_TYPES]
        if bad or not tasks:
            raise ValueError(f"tasks must be a non-empty subset of {IOU_TYPES}, got {tasks}")
        self._dataset_name = dataset_name
        self._tasks = tasks
        self._backend = resolve_backend(backend)
        self._distributed = distributed
        self._output_dir = output_dir
        self._max_dets = (1, 10, int(max_dets_per_image))
        self._num_threads = int(num_threads) if num_threads else None
        self._dump = dump_predictions
        self._metadata = MetadataCatalog.get(dataset_name)
        self._json_file = self._ensure_json_file(dataset_name)
        self._coco_gt = None
        self._predictions: List[ImagePredictions] = []

    @property
    def backend(self) -> str:
        return self._backend

    def _ensure_json_file(self, dataset_name: str) -> str:
        from detectron2.data import DatasetCatalog
        from detectron2.utils.file_io import PathManager

        if not hasattr(self._metadata, "json_file"):
            if dataset_name not in DatasetCatalog.list():
                raise KeyError(
                    f"dataset {dataset_name!r} is not registered; registered: "
                    f"{sorted(DatasetCatalog.list())[:20]}... (register it with "
                    "detectron2.data.datasets.register_coco_instances, or "
                    "d2_norms.data.register_synthetic for the synthetic set)"
                )
            if self._output_dir is None:
                raise ValueError(
                    f"dataset {dataset_name!r} has no COCO json_file in its metadata; pass an "
                    "output_dir so that it can be converted to COCO format there"
                )
            from detectron2.data.datasets.coco import convert_to_coco_json

            cache_path = os.path.join(self._output_dir, f"{dataset_name}_coco_format.json")
            convert_to_coco_json(dataset_name, cache_path)
            self._metadata.json_file = cache_path
        local = PathManager.get_local_path(self._metadata.json_file)
        if not os.path.exists(local):
            raise FileNotFoundError(
                f"ground truth of {dataset_name!r} not found at {local} (metadata json_file); "
                "for COCO set DETECTRON2_DATASETS to the folder holding coco/annotations"
            )
        return local

    def _gt(self):
        if self._coco_gt is None:
            self._coco_gt = load_coco_gt(self._json_file, self._backend)
        return self._coco_gt

    def reset(self):
        self._predictions = []

    def process(self, inputs, outputs):
        import torch

        with_masks = "segm" in self._tasks
        cpu = torch.device("cpu")
        for inp, out in zip(inputs, outputs):
            if "instances" not in out:
                continue
            instances = out["instances"].to(cpu)
            self._predictions.append(
                instances_to_image_predictions(instances, inp["image_id"], with_masks))

    def _gathered(self) -> Optional[List[ImagePredictions]]:
        if not self._distributed:
            return self._predictions
        from detectron2.utils import comm

        comm.synchronize()
        parts = comm.gather(self._predictions, dst=0)
        if not comm.is_main_process():
            return None
        return list(itertools.chain(*parts))

    def _class_to_category(self) -> np.ndarray:
        """Model class index -> dataset category id (detectron2's contiguous id mapping)."""
        mapping = getattr(self._metadata, "thing_dataset_id_to_contiguous_id", None)
        if mapping is None:
            # load_coco_json maps sorted category ids to 0..K-1; derive the same from the GT.
            mapping = {cat: i for i, cat in enumerate(sorted(self._gt().getCatIds()))}
        inverse = np.zeros(len(mapping), dtype=np.int64)
        for dataset_id, contiguous in mapping.items():
            inverse[contiguous] = dataset_id
        return inverse

    def _dump_predictions(self, predictions: List[ImagePredictions], coco_results: List[dict]):
        """The two files detectron2's COCOEvaluator leaves in its output folder.

        instances_predictions.pth: per image {"image_id", "instances": COCO dicts with the model's
        class indices} (torch.save); coco_instances_results.json: COCO result format with the
        dataset's category ids (what COCO tools and detectron2's visualize_json_results read).
        """
        import torch

        os.makedirs(self._output_dir, exist_ok=True)
        per_image = [{"image_id": p.image_id, "instances": to_coco_results([p], None)}
                     for p in predictions]
        with open(os.path.join(self._output_dir, RAW_PREDICTIONS_FILE), "wb") as f:
            torch.save(per_image, f)
        path = os.path.join(self._output_dir, PREDICTIONS_FILE)
        logger.info("Saving %d detections to %s", len(coco_results), path)
        with open(path, "w") as f:
            json.dump(coco_results, f)

    def evaluate(self, img_ids=None):
        predictions = self._gathered()
        if predictions is None:
            return {}
        if not predictions:
            logger.warning("[D2NormsCOCOEvaluator] no predictions received for %s",
                           self._dataset_name)
            return {}
        if "segm" in self._tasks and any(p.mask_rles is None for p in predictions):
            raise ValueError(
                f"segm evaluation of {self._dataset_name!r}: the model outputs have no pred_masks; "
                "evaluate masks only for a model with MODEL.MASK_ON"
            )
        coco_results = to_coco_results(predictions, self._class_to_category())
        if self._output_dir and self._dump:
            self._dump_predictions(predictions, coco_results)

        gt = self._gt()
        class_names = self._metadata.get("thing_classes")
        results = OrderedDict()
        logger.info("Evaluating %s (%s) with %s", self._dataset_name, ", ".join(self._tasks),
                    self._backend)
        for task in self._tasks:
            # coco_results are this call's own dicts (already dumped): no defensive copies.
            out = evaluate_coco_results(gt, coco_results, task, self._backend, img_ids=img_ids,
                                        max_dets=self._max_dets, num_threads=self._num_threads,
                                        results_owned=True)
            task_res = dict(out.metrics)
            if class_names and len(class_names) > 1:
                per_cat = per_category_ap(out)
                mapping = self._class_to_category()
                for idx, name in enumerate(class_names):
                    if idx < len(mapping):
                        task_res[f"AP-{name}"] = per_cat.get(int(mapping[idx]), float("nan"))
            results[task] = task_res
            logger.info("%s %s: %s", self._dataset_name, task,
                        "  ".join(f"{m} {task_res[m]:.3f}" for m in COCO_METRICS))
        return copy.deepcopy(results)


def build_evaluator(cfg, dataset_name: str, output_dir: Optional[str] = None):
    """The evaluator d2_norms' trainer uses: bbox AP, plus segm AP when MODEL.MASK_ON.

    Backend and options from ``cfg.D2NORMS.EVAL`` (keys in :mod:`d2_norms.config`; defaults
    apply when the keys are absent). ``output_dir`` defaults to OUTPUT_DIR/inference.
    """
    from detectron2.data import MetadataCatalog

    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
    if evaluator_type not in ("coco",):
        raise NotImplementedError(
            f"dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; d2_norms evaluates "
            "COCO-format instance detection / segmentation sets only"
        )
    eval_cfg = cfg.get("D2NORMS", {}).get("EVAL", {})
    tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    if output_dir is None:
        output_dir = os.path.join(cfg.OUTPUT_DIR, "inference")
    return D2NormsCOCOEvaluator(
        dataset_name,
        tasks,
        backend=eval_cfg.get("BACKEND", AUTO),
        distributed=True,
        output_dir=output_dir,
        max_dets_per_image=eval_cfg.get("MAX_DETS_PER_IMAGE", 100),
        num_threads=eval_cfg.get("NUM_THREADS", 0),
        dump_predictions=eval_cfg.get("DUMP_PREDICTIONS", True),
    )
