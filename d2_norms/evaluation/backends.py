"""COCO AP computation with a choice of backend: faster-coco-eval (C++) or pycocotools (reference).

Both backends implement the official COCO protocol (10 IoU thresholds 0.50:0.05:0.95, 101 recall
points, area ranges small < 32^2 <= medium < 96^2 <= large, maxDets 1/10/100). pycocotools is the
reference implementation; faster-coco-eval runs the per-image matching and the accumulation in C++
and is expected to give the same numbers (tests/test_eval_backends.py checks this to 1e-4).

Detectron2's own ``COCOeval_opt`` is never used: it lives in ``detectron2._C``, which the
registry install of detectron2 lacks.
"""
import contextlib
import copy
import importlib.util
import io
import logging
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

logger = logging.getLogger(__name__)

FASTER_COCO_EVAL = "faster_coco_eval"
PYCOCOTOOLS = "pycocotools"
AUTO = "auto"
BACKENDS = (FASTER_COCO_EVAL, PYCOCOTOOLS)

# The six summary numbers of COCOeval.stats[0:6], in that order, for boxes and masks.
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")
DEFAULT_MAX_DETS = (1, 10, 100)


def backend_available(name: str) -> bool:
    """Whether the Python package of backend ``name`` can be imported."""
    if name not in BACKENDS:
        raise ValueError(f"unknown COCO evaluation backend {name!r}; choose one of {BACKENDS}")
    return importlib.util.find_spec(name) is not None


def resolve_backend(name: str) -> str:
    """Map a configured backend name to the one that will run.

    "auto" picks faster-coco-eval when it is installed and pycocotools otherwise; an explicit name
    must be installed, so that a requested reference run never silently becomes another backend.
    """
    name = (name or AUTO).strip()
    if name == AUTO:
        if backend_available(FASTER_COCO_EVAL):
            return FASTER_COCO_EVAL
        if backend_available(PYCOCOTOOLS):
            logger.warning(
                "faster-coco-eval is not installed; COCO evaluation falls back to pycocotools "
                "(same numbers, several times slower); `pip install faster-coco-eval` to speed it "
                "up."
            )
            return PYCOCOTOOLS
        raise ImportError(
            "no COCO evaluation backend is installed: pip install faster-coco-eval (or pycocotools)"
        )
    if name not in BACKENDS:
        raise ValueError(
            f"unknown COCO evaluation backend {name!r} (D2NORMS.EVAL.BACKEND); "
            f"choose one of {(AUTO,) + BACKENDS}"
        )
    if not backend_available(name):
        pip_name = {FASTER_COCO_EVAL: "faster-coco-eval", PYCOCOTOOLS: "pycocotools"}[name]
        raise ImportError(
            f"COCO evaluation backend {name!r} was requested but is not installed: "
            f"pip install {pip_name}, or set D2NORMS.EVAL.BACKEND to 'auto'"
        )
    return name


def _coco_class(backend: str):
    if backend == FASTER_COCO_EVAL:
        from faster_coco_eval import COCO
    else:
        from pycocotools.coco import COCO
    return COCO


def load_coco_gt(annotations: Union[str, Mapping], backend: str):
    """Ground truth as the ``COCO`` object of ``backend`` (from a JSON path or a loaded dict).

    A dict is deep-copied: both libraries write into the annotation dicts while evaluating
    (``ignore`` flags, cached RLEs), which must not leak into the caller's data.
    """
    backend = resolve_backend(backend)
    COCO = _coco_class(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(annotations, Mapping):
            coco = COCO()
            coco.dataset = copy.deepcopy(dict(annotations))
            coco.createIndex()
            return coco
        return COCO(str(annotations))


@dataclass
class CocoEvalOutput:
    """Summary of one COCOeval run.

    metrics: AP, AP50, AP75, APs, APm, APl on a 0-100 scale; NaN where COCO reports -1 (no ground
        truth in that area range) or when there were no detections at all.
    precision: COCOeval's ``eval["precision"]`` array [iou, recall, category, area, maxDets]
        (None when there were no detections); used for per-category AP.
    category_ids: the category ids along the precision array's category axis.
    """

    iou_type: str
    backend: str
    metrics: Dict[str, float]
    precision: Optional[np.ndarray]
    category_ids: List[int]


def _check_image_ids(coco_gt, results: Sequence[Mapping]) -> None:
    known = set(coco_gt.getImgIds())
    unknown = {r["image_id"] for r in results} - known
    if unknown:
        some = sorted(unknown)[:5]
        raise ValueError(
            f"{len(unknown)} image id(s) in the predictions are not in the ground truth "
            f"(e.g. {some}); the predictions were made on another dataset than the one evaluated. "
            "Evaluate on the dataset the model was run on (DATASETS.TEST)."
        )


def _results_for_task(results: Iterable[Mapping], iou_type: str, copy_boxes: bool = True
                      ) -> List[dict]:
    """Per-task copies of the result dicts (both libraries' loadRes write into them).

    For masks the box is dropped, as Detectron2 does: with a box present, loadRes would take the
    box area (not the mask area) for the small/medium/large split. Boxes are used as they are
    when ``copy_boxes`` is False (the caller owns the dicts).
    """
    if iou_type == "segm":
        out = []
        for r in results:
            if "segmentation" not in r:
                raise ValueError(
                    "segm evaluation needs a 'segmentation' (RLE) in every prediction; the model "
                    "produced boxes only (MODEL.MASK_ON is off?)"
                )
            d = dict(r)
            d.pop("bbox", None)
            out.append(d)
        return out
    return [dict(r) for r in results] if copy_boxes else list(results)


def evaluate_coco_results(
    coco_gt,
    results: Sequence[Mapping],
    iou_type: str,
    backend: str,
    *,
    img_ids: Optional[Sequence[int]] = None,
    max_dets: Sequence[int] = DEFAULT_MAX_DETS,
    num_threads: Optional[int] = None,
    results_owned: bool = False,
) -> CocoEvalOutput:
    """Run COCO evaluation of ``results`` (COCO result-format dicts) against ``coco_gt``.

    ``coco_gt`` must be the COCO object of the same backend (see :func:`load_coco_gt`).
    ``num_threads`` bounds faster-coco-eval's mask-IoU thread pool (None: library default).
    ``results_owned``: the caller lets box evaluation add COCO's bookkeeping keys (area, id,
    iscrowd; pycocotools also a box polygon) to its dicts instead of copying 100k's of them, as
    detectron2's COCOEvaluator does; mask evaluation always works on copies.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    backend = resolve_backend(backend)
    if len(max_dets) < 3:
        raise ValueError("COCOeval needs at least three maxDets values, e.g. (1, 10, 100)")
    category_ids = sorted(coco_gt.getCatIds())
    if len(results) == 0:
        # Neither library can load an empty result list; COCO would report no detections as -1.
        nan = {m: float("nan") for m in COCO_METRICS}
        return CocoEvalOutput(iou_type, backend, nan, None, category_ids)
    _check_image_ids(coco_gt, results)

    with contextlib.redirect_stdout(io.StringIO()):
        if backend == FASTER_COCO_EVAL:
            from faster_coco_eval import COCOeval_faster

            if iou_type == "bbox":
                coco_dt = _faster_bbox_detections(coco_gt, results, results_owned)
            else:
                coco_dt = coco_gt.loadRes(_results_for_task(results, iou_type))
            kwargs = {"print_function": logger.debug}
            if num_threads:
                kwargs["rle_iou_max_workers"] = int(num_threads)
            coco_eval = COCOeval_faster(coco_gt, coco_dt, iou_type, **kwargs)
        else:
            from pycocotools.cocoeval import COCOeval

            coco_dt = coco_gt.loadRes(_results_for_task(results, iou_type, not results_owned))
            coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
        coco_eval.params.maxDets = list(max_dets)
        if img_ids is not None:
            coco_eval.params.imgIds = list(img_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()

    precision = np.asarray(coco_eval.eval["precision"])
    metrics = summarize_precision(precision, coco_eval.params)
    return CocoEvalOutput(iou_type, backend, metrics, precision, list(coco_eval.params.catIds))


def _faster_bbox_detections(coco_gt, results: Sequence[Mapping], in_place: bool = False):
    """faster-coco-eval ``COCO`` of box detections, built in one pass.

    Same content as ``loadRes`` gives for boxes (area = w * h, ids from 1, iscrowd 0) without the
    polygon it fabricates for every box (unused by box IoU). With ``in_place`` the keys are added
    to the given dicts, otherwise to copies.
    """
    from faster_coco_eval import COCO

    if in_place:
        anns = results if isinstance(results, list) else list(results)
        for i, r in enumerate(anns, start=1):
            bb = r["bbox"]
            r["area"] = bb[2] * bb[3]
            r["id"] = i
            r["iscrowd"] = 0
    else:
        anns = []
        for i, r in enumerate(results, start=1):
            bb = r["bbox"]
            anns.append({"image_id": r["image_id"], "category_id": r["category_id"], "bbox": bb,
                         "score": r["score"], "area": bb[2] * bb[3], "id": i, "iscrowd": 0})
    dt = COCO()
    dt.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": anns,
                  "categories": copy.deepcopy(coco_gt.dataset["categories"])}
    dt.createIndex()
    return dt


def summarize_precision(precision: np.ndarray, params) -> Dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl (0-100, NaN for COCO's -1) from COCOeval's precision array.

    The same reduction as COCOeval.summarize (mean over the entries > -1 of precision[T, R, K, A,
    M] at the largest maxDets), done here so that any maxDets limit works with both libraries
    (pycocotools' summarize assumes 100). Tests check it against pycocotools' own stats.
    """
    iou_thrs = np.asarray(params.iouThrs)
    area_labels = list(params.areaRngLbl)

    def mean_valid(p: np.ndarray) -> float:
        p = p[p > -1]
        return float(np.mean(p)) * 100.0 if p.size else float("nan")

    def at_iou(thr: float) -> np.ndarray:
        idx = np.flatnonzero(np.isclose(iou_thrs, thr))
        return precision[idx]

    all_area = area_labels.index("all")
    out = {
        "AP": mean_valid(precision[:, :, :, all_area, -1]),
        "AP50": mean_valid(at_iou(0.5)[:, :, :, all_area, -1]),
        "AP75": mean_valid(at_iou(0.75)[:, :, :, all_area, -1]),
    }
    for name, label in (("APs", "small"), ("APm", "medium"), ("APl", "large")):
        out[name] = mean_valid(precision[:, :, :, area_labels.index(label), -1])
    return out


def per_category_ap(output: CocoEvalOutput) -> Dict[int, float]:
    """AP (0-100) of each category id, area "all", largest maxDets; NaN without ground truth."""
    if output.precision is None:
        return {c: float("nan") for c in output.category_ids}
    out = {}
    for k, cat_id in enumerate(output.category_ids):
        p = output.precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[cat_id] = float(np.mean(p) * 100.0) if p.size else float("nan")
    return out


def metrics_close(a: Mapping[str, float], b: Mapping[str, float], atol: float) -> bool:
    """Equal within ``atol`` for every COCO metric, NaN matching NaN."""
    for m in COCO_METRICS:
        x, y = a[m], b[m]
        if math.isnan(x) or math.isnan(y):
            if not (math.isnan(x) and math.isnan(y)):
                return False
        elif abs(x - y) > atol:
            return False
    return True
